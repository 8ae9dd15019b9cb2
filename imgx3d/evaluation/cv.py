"""``imgx3d cv``: the cross-validation summary nnU-Net users read after training all folds.

Per cross-validation (the folds sharing a ``cv_group``: the same method and config, see
:func:`imgx3d.training.workflow.cv_group`) a row per fold — its validation Dice (the best
validation of the run, ``val/best_dice_mean``), the same after the run's learned postprocessing,
its test Dice when the split kept a test set — and their mean and standard deviation. The runs
are read from an mlflow experiment or from a cross-validation folder's ``fold_*/result.json``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgx3d.errors import Imgx3dError
from imgx3d.tracking import resolve_uri


@dataclass
class FoldRecord:
    """One fold's run."""

    cv_group: str
    method: str
    fold: int
    folds: int
    run: str
    val_dice: float = math.nan
    val_dice_postprocessed: float = math.nan
    test_dice: float = math.nan


@dataclass
class CvSummary:
    """The folds of one cross-validation and their means."""

    cv_group: str
    method: str
    folds: int
    rows: list[FoldRecord] = field(default_factory=list)

    def mean_std(self, attribute: str) -> tuple[float, float]:
        """Mean and standard deviation over the folds that have ``attribute`` (NaN when none has)."""
        values = [v for v in (getattr(r, attribute) for r in self.rows) if math.isfinite(v)]
        return (float(np.mean(values)), float(np.std(values))) if values else (math.nan, math.nan)

    def to_json(self) -> dict:
        return {"cv_group": self.cv_group, "method": self.method, "folds": self.folds,
                "complete": sorted(r.fold for r in self.rows) == list(range(self.folds)),
                "rows": [r.__dict__ for r in self.rows],
                **{f"{a}_mean_std": self.mean_std(a) for a in ("val_dice", "val_dice_postprocessed", "test_dice")}}


def _number(value: object) -> float:
    return math.nan if value is None else float(value)


def records_from_folder(folder: str | Path) -> list[FoldRecord]:
    """The finished folds under a cross-validation folder (``fold_*/result.json``)."""
    records = []
    for path in sorted(Path(folder).glob("fold_*/result.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        if "cv_group" not in data:
            continue
        post = path.parent / "postprocessing.json"
        post_dice = json.loads(post.read_text(encoding="utf-8"))["validation_dice"].get("postprocessed") \
            if post.is_file() else None
        records.append(FoldRecord(data["cv_group"], data["method"], int(data["fold"]), int(data["folds"]),
                                  str(path.parent), _number(data.get("best_val_dice")), _number(post_dice),
                                  _number(data.get("test_dice_mean"))))
    if not records:
        raise Imgx3dError(f"{folder}: no finished folds (fold_*/result.json); train them with "
                          "imgx3d train ... --folds N --fold all --run-dir DIR")
    return records


def records_from_mlflow(uri: str, experiment: str) -> list[FoldRecord]:
    """The finished fold runs of an mlflow experiment (runs tagged with a ``cv_group``)."""
    from mlflow.tracking import MlflowClient

    uri = resolve_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise Imgx3dError(f"experiment '{experiment}' not found at '{uri}'; pass the experiment the folds were "
                          "logged to (--experiment)")
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time ASC"], max_results=5000)
    records = []
    for run in runs:
        tags, metrics = run.data.tags, run.data.metrics
        if "cv_group" not in tags:
            continue
        records.append(FoldRecord(tags["cv_group"], tags.get("method", "?"), int(tags["fold"]), int(tags["folds"]),
                                  tags.get("mlflow.runName", run.info.run_id),
                                  metrics.get("val/best_dice_mean", math.nan),
                                  metrics.get("val/postprocessing_dice_mean", math.nan),
                                  metrics.get("test/dice_mean", math.nan)))
    if not records:
        raise Imgx3dError(f"experiment '{experiment}' has no finished fold runs; train them with "
                          "imgx3d train ... --folds N --fold all")
    return records


def summarise(records: list[FoldRecord]) -> list[CvSummary]:
    """One summary per cross-validation; a fold trained twice counts once (its latest run)."""
    groups: dict[str, CvSummary] = {}
    for record in records:
        summary = groups.setdefault(record.cv_group, CvSummary(record.cv_group, record.method, record.folds))
        summary.rows = [r for r in summary.rows if r.fold != record.fold] + [record]
    for summary in groups.values():
        summary.rows.sort(key=lambda r: r.fold)
    return list(groups.values())


def _cell(value: float) -> str:
    return "—" if not math.isfinite(value) else f"{value:.4f}"


def to_markdown(summaries: list[CvSummary]) -> str:
    """A table per cross-validation: one row per fold, then mean ± std."""
    lines = []
    for s in summaries:
        done = len(s.rows)
        lines += [f"### {s.method}, {s.folds}-fold cross-validation ({s.cv_group}): {done}/{s.folds} folds", "",
                  "| fold | run | validation Dice | postprocessed | test Dice |", "|---|---|---|---|---|"]
        lines += [f"| {r.fold} | {r.run} | {_cell(r.val_dice)} | {_cell(r.val_dice_postprocessed)} | "
                  f"{_cell(r.test_dice)} |" for r in s.rows]
        cells = [s.mean_std(a) for a in ("val_dice", "val_dice_postprocessed", "test_dice")]
        lines += ["| mean ± std | | " + " | ".join(f"{_cell(m)} ± {_cell(sd)}" if math.isfinite(m) else "—"
                                               for m, sd in cells) + " |", ""]
    return "\n".join(lines)
