"""Shared helpers of the benchmark scripts: JSON lines on stdout."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch


def emit(name: str, value: float | int | str | None, unit: str, **extra) -> None:
    """Print one benchmark figure as a JSON line."""
    print(json.dumps({"name": name, "value": value, "unit": unit, **extra}), flush=True)


def machine() -> dict[str, str | int]:
    """What the figures were measured on."""
    return {"python": sys.version.split()[0], "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine()}


def emit_test_summary(prefix: str, summary: dict, **extra) -> None:
    """Per-class Dice and HD95 (mean, std) of a test summary, then its foreground-mean Dice with ``extra``."""
    for cls, stats in summary["per_class"].items():
        emit(f"{prefix}.test.dice.{cls}", round(stats["dice"]["mean"], 4), "dice", std=round(stats["dice"]["std"], 4))
        emit(f"{prefix}.test.hd95.{cls}", round(stats["hd95"]["mean"], 3), "mm", std=round(stats["hd95"]["std"], 3))
    emit(f"{prefix}.test.dice.foreground_mean", round(summary["foreground_mean"]["dice"], 4), "dice", **extra)


def train_in_children(script: str, names: list[str], forwarded: list[str], out: Path, parallel: int,
                      threads: int) -> dict[str, dict]:
    """Train named runs ``parallel`` at a time, each a child ``script --train-one NAME`` of ``threads`` threads.

    Each child writes ``<out>/<name>/bench_result.json`` (:func:`save_train_result`) and logs to
    ``<out>/<name>.log``; a failed child stops the benchmark with its log's path.

    Args:
        forwarded: the child's other arguments (data, budget, clock, ...).
    """
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    pending, running = list(names), []
    out.mkdir(parents=True, exist_ok=True)
    while pending or running:
        while pending and len(running) < parallel:
            name = pending.pop(0)
            log = open(out / f"{name}.log", "w", encoding="utf-8")
            cmd = [sys.executable, script, "--train-one", name, "--threads", str(threads), *forwarded]
            running.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
        time.sleep(5)
        for item in [r for r in running if r[1].poll() is not None]:
            running.remove(item)
            item[2].close()
            if item[1].returncode:
                raise SystemExit(f"run {item[0]} failed (exit {item[1].returncode}); see {out}/{item[0]}.log")
    return {name: json.loads((out / name / "bench_result.json").read_text(encoding="utf-8")) for name in names}


def save_train_result(result, **extra) -> dict:
    """The figures of a ``train_run`` result, also written to ``<run_dir>/bench_result.json``."""
    record = {"run_dir": str(result.run_dir), "run_id": result.run_id, "steps": result.steps,
              "stop_reason": result.stop_reason, "test_summary": result.test_summary,
              "threads": torch.get_num_threads(), **extra}
    (result.run_dir / "bench_result.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    return record


REPO = Path(__file__).resolve().parents[1]
HIPPOCAMPUS = REPO.parent / "shared" / "data" / "hippocampus"
HIPPOCAMPUS_UNET = REPO / "configs" / "hippocampus" / "unet.yaml"


def add_hippocampus_args(parser, config: bool = True) -> None:
    """``--data`` (default: the shared hippocampus dataset) and ``--config`` (default: its U-Net config)."""
    parser.add_argument("--data", default=str(HIPPOCAMPUS))
    if config:
        parser.add_argument("--config", default=str(HIPPOCAMPUS_UNET))
