"""One way from what a user gives (a dataset, maybe a config file, a method, a budget, ``key=value``
overrides) to a run's config: ``imgx3d train``, ``imgx3d plan``, the Python API (``imgx3d.plan``) and the
benchmarks all call these two functions, so the same inputs give the same config everywhere.

The order: the keys that say how to read the dataset → its fingerprint → the plan for the method and
budget → the config file's own keys over the plan (each recorded as a decision) → the overrides over that
(recorded too) → the checked config. Without a budget, a config file is used as it is (nothing planned).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgx3d.config import Config, load_config, load_yaml, parse_overrides
from imgx3d.planning import parse_budget, plan_folder, reading_config

if TYPE_CHECKING:
    from imgx3d.planning.fingerprint import Fingerprint
    from imgx3d.planning.planner import Plan


@dataclass
class Resolved:
    """A run's config, the files that record how it was planned (``plan.yaml``, ``fingerprint.json``; none
    for a config file used as it is), and the rival candidates a planned training races it against."""

    config: Config
    records: dict[str, str] = field(default_factory=dict)
    rivals: dict[str, "Resolved"] = field(default_factory=dict)
    name: str = ""  # the candidate's name in a race


def budget_clock_of(overrides: list[str], given: dict[str, Any] | None = None) -> str:
    """The ``train.budget_clock`` the overrides (else the config tree ``given``) set: a CPU-time budget, for runs
    sharing a machine, is planned on CPU time too (:func:`~imgx3d.planning.planner.planning_clock`)."""
    clock = dict(parse_overrides(overrides)).get("train.budget_clock") or ((given or {}).get("train") or {}).get(
        "budget_clock")
    return clock or "wall"


def resolve_plan(data: str | Path, method: str | None = None, budget: str | float = "30m", device: str = "auto",
                 config_file: str | Path | None = None, overrides: list[str] | None = None,
                 cache_dir: str | Path | None = None) -> tuple["Plan", "Fingerprint"]:
    """The plan of ``data`` for ``method`` (default: the config file's, else ``unet``) within ``budget``
    (``"30m"``, ``"2h"`` or minutes), with the config file's keys and then ``overrides`` over it."""
    from imgx3d.planning.fingerprint import fingerprint
    from imgx3d.planning.planner import plan

    overrides = list(overrides or [])
    given = load_yaml(config_file) if config_file else {}
    method = method or (given.get("method") or {}).get("name") or "unet"
    minutes = parse_budget(budget) if isinstance(budget, str) else float(budget)
    fp = fingerprint(data, reading_config(given, overrides), cache_dir=cache_dir or plan_folder(data))
    result = plan(fp, method, minutes, device, budget_clock=budget_clock_of(overrides, given))
    if config_file:  # the file's own keys, not a plan it extends (made for another machine or budget)
        result.override(load_yaml(config_file, above_plans=True), f"set by {config_file}")
    if overrides:
        result.override(parse_overrides(overrides), "set on the command line")
    return result, fp


def resolve_run(data: str | Path, config_file: str | Path | None = None, method: str | None = None,
                budget: str | float | None = None, device: str = "auto",
                overrides: list[str] | None = None) -> Resolved:
    """The config a run of ``data`` trains with: planned when there is no config file or a ``budget``
    is given (see the module docstring), else the file's with ``method`` swapped in and the overrides."""
    overrides = list(overrides or [])
    if not config_file or budget:
        result, fp = resolve_plan(data, method, budget or "30m", device, config_file, overrides)
        print("\n".join(["imgx3d plan:", *fp.summary(), *result.explain()]), file=sys.stderr, flush=True)
        return _resolved(result, overrides, json.dumps(fp.to_json(), indent=1))
    tree = load_yaml(config_file)
    if method and (tree.get("method") or {}).get("name") != method:
        from imgx3d.registry import method_class

        shared = {f.name for f in dataclasses.fields(method_class(method).Config)}
        tree["method"] = {**{k: v for k, v in (tree.get("method") or {}).items() if k in shared}, "name": method}
    return Resolved(load_config(None, overrides, base=tree))


def resolve_planned(result: "Plan", overrides: list[str] | None = None) -> Resolved:
    """A plan (from :func:`resolve_plan` or ``imgx3d.plan``) as a :class:`Resolved` run, rivals included."""
    return _resolved(result, list(overrides or []), "")


def _resolved(result: "Plan", overrides: list[str], fingerprint_json: str) -> Resolved:
    records = {"plan.yaml": result.to_yaml(), **({"fingerprint.json": fingerprint_json} if fingerprint_json else {})}
    rivals = {name: _resolved(rival, overrides, fingerprint_json) for name, rival in result.rivals.items()}
    return Resolved(load_config(None, overrides, base=result.tree), records, rivals, result.name)
