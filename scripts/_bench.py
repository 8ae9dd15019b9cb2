"""Shared helpers of the benchmark scripts: JSON lines on stdout."""

from __future__ import annotations

import json
import platform
import sys

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
