"""What every benchmark shares: the JSON-lines writer, the machine it ran on, training runs in children.

Every figure is one JSON line on stdout (:func:`emit`), stamped with the date, the commit and the
machine, so ``python -m benchmarks.NAME ... >> benchmarks/results/NAME.jsonl`` keeps a record
``python -m benchmarks.tables`` renders into ``docs/benchmark-results.md``.
"""

from __future__ import annotations

import json
import datetime
import functools
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.children import REPO, Child, module, run_children


@functools.cache
def stamp() -> dict[str, str]:
    """When, on which code and on what the figures of this process are measured."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        commit += "+changes" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    from imgx3d.resources import choose_precision, precision_name

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    auto = precision_name(choose_precision("auto", torch.device("cuda" if torch.cuda.is_available() else "cpu")))
    return {"date": datetime.date.today().isoformat(), "commit": commit,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {device} (auto: {auto}), "
                       f"torch {torch.__version__}"}


def emit(name: str, value: float | int | str | None, unit: str, **extra) -> None:
    """Print one benchmark figure as a JSON line, stamped with :func:`stamp`."""
    if isinstance(extra.get("machine"), dict):  # a setup line's machine() keeps its details beside the stamp's
        extra["machine_details"] = extra.pop("machine")
    print(json.dumps({"name": name, "value": value, "unit": unit, **extra, **stamp()}), flush=True)


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


def train_in_children(module_name: str, names: list[str], forwarded: list[str], out: Path, parallel: int,
                      threads: int, after: dict[str, list[str]] | None = None, resume: bool = False
                      ) -> dict[str, dict]:
    """Train named runs ``parallel`` at a time, each a child ``python -m MODULE --train-one NAME`` of ``threads`` threads.

    Each child writes ``<out>/<name>/bench_result.json`` (:func:`save_train_result`) and logs to
    ``<out>/<name>.log``; a failed child stops the benchmark with its log's path.

    Args:
        module_name: the benchmark's module (its ``__spec__.name``).
        forwarded: the child's other arguments (data, budget, clock, ...).
        after: name → the runs that must finish before it starts (e.g. a cascade's first stage).
        resume: skip the runs an earlier call finished (their ``.done`` marks in ``out``).
    """
    run_children([Child(name, module(module_name, "--train-one", name, "--threads", str(threads), *forwarded),
                        threads=threads, after=(after or {}).get(name, [])) for name in names],
                 parallel=parallel, logs=out, resume=resume)
    return {name: json.loads((out / name / "bench_result.json").read_text(encoding="utf-8")) for name in names}


def save_train_result(result, **extra) -> dict:
    """The figures of a ``train_run`` result, also written to ``<run_dir>/bench_result.json``."""
    record = {"run_dir": str(result.run_dir), "run_id": result.run_id, "steps": result.steps,
              "stop_reason": result.stop_reason, "test_summary": result.test_summary,
              "threads": torch.get_num_threads(), **extra}
    (result.run_dir / "bench_result.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    return record


HIPPOCAMPUS = REPO.parent / "shared" / "data" / "hippocampus"
HIPPOCAMPUS_UNET = REPO / "configs" / "hippocampus" / "unet.yaml"


def add_hippocampus_args(parser, config: bool = True) -> None:
    """``--data`` (default: the shared hippocampus dataset) and ``--config`` (default: its U-Net config)."""
    parser.add_argument("--data", default=str(HIPPOCAMPUS))
    if config:
        parser.add_argument("--config", default=str(HIPPOCAMPUS_UNET))


def add_arm_args(parser, name: str, runs: tuple[str, ...]) -> None:
    """The arguments of a benchmark whose arms train as children (:func:`train_in_children`): ``--clock``,
    ``--out`` / ``--experiment`` (``bench-NAME``), ``--set KEY=VALUE`` for every arm, and the child's own
    ``--train-one ARM`` / ``--threads``."""
    parser.add_argument("--clock", choices=["wall", "cpu"], default="cpu")
    parser.add_argument("--out", default=f"runs/bench-{name}")
    parser.add_argument("--experiment", default=f"bench-{name}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--train-one", choices=runs, help="(internal) train one arm in this process")
    parser.add_argument("--threads", type=int, default=1)


def train_arm_if_child(args, train_one) -> bool:
    """In a child (``--train-one ARM``): train that arm with ``train_one(arm, args)`` on ``--threads`` and say so."""
    if not args.train_one:
        return False
    torch.set_num_threads(args.threads)
    train_one(args.train_one, args)
    return True
