"""A race between candidate plans: the trade-off a plan cannot know in advance, measured on the user's data.

A thin-slab dataset can be learnt by a 3D network on patches or by a 2D network on whole slices (nnU-Net
trains both and keeps the better); which learns more within a short budget depends on the data, not on a
constant read off another dataset. ``imgx3d train --data DIR --budget 20m`` on such data trains each
candidate plan for :data:`~imgx3d.planning.planner.RACE_SHARE` of the budget — the same schedule it would
follow to the end, paused — and the candidate with the best validation Dice continues from its checkpoint,
so its race steps are not thrown away. What the losers cost — their share, their loading and their
validation, as measured — is taken off the winner's training minutes, so the whole run keeps to the budget.

The run folder holds the winner's run; the candidates' paused runs stay under ``race/<name>`` and the
scores in ``race.json``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from imgx3d.config import Config
from imgx3d.files import atomic_write_text
from imgx3d.training.workflow import TrainResult, train_run

if TYPE_CHECKING:
    from imgx3d.planning.planner import Plan
    from imgx3d.planning.resolve import Resolved

RACE_FILE = "race.json"


def default_run_dir(cfg: Config) -> Path:
    """``runs/<dataset>/<method>-<time>``, as :func:`~imgx3d.training.workflow.train_run` names a run."""
    return Path("runs") / cfg.dataset / f"{cfg.method.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def race_minutes(budgets: dict[str, float], share: float) -> tuple[dict[str, float], dict[str, float]]:
    """Per candidate (name → its planned training minutes): the minutes it trains before the decision, and
    the training minutes it plans for in all — its own less the other candidates' race minutes, so that
    the race and the winner's run together keep to the budget (the schedule each candidate follows; the
    winner's final minutes subtract what the losers measured, their loading and validation included)."""
    pauses = {name: share * minutes for name, minutes in budgets.items()}
    return pauses, {name: minutes - sum(p for other, p in pauses.items() if other != name)
                    for name, minutes in budgets.items()}


def race_run(configs: dict[str, Config], data_root: str | Path, run_dir: str | Path, share: float,
             records: dict[str, dict[str, str]] | None = None) -> TrainResult:
    """Race the candidate ``configs`` (name → config with its planned ``train.max_minutes``) and train the
    winner to the end in ``run_dir``.

    Args:
        share: each candidate's share of the budget before the decision.
        records: per candidate, files for its run folder (its ``plan.yaml``, the fingerprint).
    """
    run_dir = Path(run_dir)
    budgets = {name: cfg.train.max_minutes for name, cfg in configs.items()}
    pauses, totals = race_minutes(budgets, share)
    scores: dict[str, dict[str, float | int | None]] = {}
    for name, cfg in configs.items():
        print(f"race: candidate {name} trains {pauses[name]:.1f} of its {totals[name]:.1f} minutes", flush=True)
        clock = time.process_time if cfg.train.budget_clock == "cpu" else time.monotonic
        started = clock()
        result = train_run(replace(cfg, train=replace(cfg.train, max_minutes=totals[name])), data_root,
                           run_dir / "race" / name, records=(records or {}).get(name), pause_after_minutes=pauses[name])
        dice = result.best_val_dice if math.isfinite(result.best_val_dice) else None
        scores[name] = {"val_dice": dice, "steps": result.steps, "minutes": round((clock() - started) / 60, 2)}
        print(f"race: {name} reached validation Dice {dice if dice is None else round(dice, 4)} in "
              f"{result.steps} steps", flush=True)
    winner = max(scores, key=lambda n: -math.inf if scores[n]["val_dice"] is None else scores[n]["val_dice"])
    # the losers' whole cost (loading, training, their validation), measured, comes off the winner's minutes
    minutes = budgets[winner] - sum(float(s["minutes"]) for n, s in scores.items() if n != winner)
    atomic_write_text(run_dir / RACE_FILE, json.dumps({"share": share, "winner": winner, "winner_minutes": minutes,
                                                       "candidates": scores}, indent=1))
    print(f"race: {winner} continues to {minutes:.1f} minutes of training", flush=True)
    _move_run(run_dir / "race" / winner, run_dir)
    return train_run(replace(configs[winner], train=replace(configs[winner].train, max_minutes=minutes)), data_root,
                     resume=run_dir)


def _move_run(source: Path, target: Path) -> None:
    """Move the files of the run folder ``source`` into ``target`` (the winner becomes the run)."""
    target.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        destination = target / entry.name
        if destination.is_dir():
            shutil.rmtree(destination)
        os.replace(entry, destination)
    source.rmdir()


def train(run: "Config | Plan", data_root: str | Path, run_dir: str | Path | None = None,
          **kwargs: object) -> TrainResult:
    """``imgx3d.train``: train a config, or a plan (``imgx3d.plan(...)``) as ``imgx3d train --budget`` does —
    racing its rivals when it has any (see the module docstring).

    Args:
        run: a :class:`~imgx3d.config.Config` or a :class:`~imgx3d.planning.planner.Plan`.
        run_dir: the run folder (default ``runs/<dataset>/<method>-<time>``).
        kwargs: passed to :func:`~imgx3d.training.workflow.train_run` (``resume``, ``test_at_end``, ...)
            when there is no race.
    """
    if isinstance(run, Config):
        return train_run(run, data_root, run_dir, **kwargs)
    from imgx3d.planning.resolve import resolve_planned

    return train_resolved(resolve_planned(run), data_root, run_dir, **kwargs)


def train_resolved(resolved: "Resolved", data_root: str | Path, run_dir: str | Path | None = None,
                   **kwargs: object) -> TrainResult:
    """Train a resolved run (``imgx3d train``'s and the API's): its config, or the race of it and its rivals."""
    from imgx3d.planning.planner import RACE_SHARE

    if not resolved.rivals:
        return train_run(resolved.config, data_root, run_dir, records=resolved.records, **kwargs)
    runs = {r.name: r for r in [resolved, *resolved.rivals.values()]}
    return race_run({n: r.config for n, r in runs.items()}, data_root, run_dir or default_run_dir(resolved.config),
                    RACE_SHARE, {n: r.records for n, r in runs.items()})
