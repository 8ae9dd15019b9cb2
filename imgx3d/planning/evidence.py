"""The measurements behind the planner's rules, kept as data (``evidence.yaml`` beside this module).

A rule in :mod:`imgx3d.planning.planner` stays short; its decision's reason quotes the entry that
justifies it, so a new measurement edits the table, not the planner.
"""

from __future__ import annotations

from functools import lru_cache
from importlib.resources import files
from typing import Any

import yaml

FIELDS = ("dataset", "budget", "finding", "bench")  # every entry has them (and ``seeds``, 1 when left out)


@lru_cache(maxsize=1)
def table() -> dict[str, dict[str, Any]]:
    """Every entry of ``evidence.yaml`` by key."""
    return yaml.safe_load(files("imgx3d.planning").joinpath("evidence.yaml").read_text(encoding="utf-8"))


def evidence(key: str) -> str:
    """One entry as a reason's clause: ``on DATASET at BUDGET (N seeds): FINDING``."""
    entry = table()[key]
    seeds = int(entry.get("seeds", 1))
    return f"on {entry['dataset']} at {entry['budget']}{f' ({seeds} seeds)' if seeds > 1 else ''}: {entry['finding']}"
