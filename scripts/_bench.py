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
