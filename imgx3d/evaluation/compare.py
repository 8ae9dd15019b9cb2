"""``imgx3d compare``: which run of an experiment is better, by how much, per class, at what cost.

Runs are read from any mlflow tracking URI: tags (method), params (parameter count), metrics
(inference seconds per volume, training minutes, the validation-Dice history) and the
per-case ``test_metrics/metrics.csv`` artifact every finished ``imgx3d train`` logs. Means and
standard deviations are over test cases; a run is compared with a reference run by paired
per-case differences and the Wilcoxon signed-rank test (scipy), so a half-point gap between
two runs on 40 cases is not read as a win when it is noise.
"""

from __future__ import annotations

import csv
import io
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.stats import wilcoxon

from imgx3d.errors import Imgx3dError
from imgx3d.evaluation.records import Comparison, RunRecord
from imgx3d.evaluation.uncertainty import UNCERTAINTY_METRICS
from imgx3d.files import atomic_write_text, csv_text
from imgx3d.tracking import resolve_uri

COMPARISON_TAG = "imgx3d.kind"  # comparison runs carry it and are never compared themselves
# the uncertainty's Spearman correlation with Dice is better the more negative: unsure where Dice is low
LOWER_IS_BETTER = {"hd95", "seconds_per_volume", "train_minutes", "n_parameters", "ece", "spearman_dice"}


def _parse_metrics_csv(text: str) -> dict[tuple[str, str], dict[str, float]]:
    rows = {}
    for row in csv.DictReader(io.StringIO(text)):
        rows[(row["case"], row["name"])] = {m: float(row[m]) if row[m] not in ("", "nan") else math.nan
                                            for m in ("dice", "iou", "hd95", "nsd")}
    return rows


def load_runs(uri: str, experiment: str, runs: list[str] | None = None) -> list[RunRecord]:
    """Finished runs of ``experiment`` with test metrics (all, or those whose id or name is in ``runs``).

    Raises:
        Imgx3dError: unknown experiment, no finished runs with test metrics, or a named run missing.
    """
    from mlflow.artifacts import download_artifacts
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = resolve_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    try:
        exp = client.get_experiment_by_name(experiment)
    except Exception as err:
        raise Imgx3dError(f"mlflow tracking URI '{uri}' unusable ({type(err).__name__}); fix --tracking-uri") from None
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise Imgx3dError(f"experiment '{experiment}' not found at '{uri}'; experiments there: {', '.join(names) or 'none'}")
    found = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'",
                               order_by=["attributes.start_time ASC"], max_results=1000)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in found:
            name = run.data.tags.get("mlflow.runName", run.info.run_id[:8])
            if run.data.tags.get(COMPARISON_TAG) or (runs and run.info.run_id not in runs and name not in runs):
                continue
            try:
                path = download_artifacts(run_id=run.info.run_id, artifact_path="test_metrics/metrics.csv",
                                          dst_path=str(Path(tmp) / run.info.run_id), tracking_uri=uri)
            except Exception:  # a codec run, or a run trained without test cases
                continue
            metrics = run.data.metrics
            history = client.get_metric_history(run.info.run_id, "val/dice_mean")
            records.append(RunRecord(
                run_id=run.info.run_id, name=name, method=run.data.tags.get("method", "?"),
                seconds_per_volume=metrics.get("test/seconds_per_volume", math.nan),
                train_minutes=metrics.get("train/minutes", math.nan),
                n_parameters=float(run.data.params.get("n_parameters", "nan")),
                best_val_dice=metrics.get("val/best_dice_mean", math.nan),
                cases=_parse_metrics_csv(Path(path).read_text(encoding="utf-8")),
                val_curve=sorted((m.step, m.value) for m in history),
                uncertainty={k: metrics[f"test/uncertainty/{k}"] for k in UNCERTAINTY_METRICS
                             if f"test/uncertainty/{k}" in metrics}))
    if runs:
        missing = [r for r in runs if not any(r in (rec.run_id, rec.name) for rec in records)]
        if missing:
            raise Imgx3dError(f"run '{missing[0]}' is not a finished run with test metrics in experiment '{experiment}'")
    if not records:
        raise Imgx3dError(f"experiment '{experiment}' has no finished runs with test metrics; train with test cases first")
    return records


def select_runs(records: list[RunRecord], by: str) -> list[RunRecord]:
    """``run``: every run; ``method``: per method, the run with the best validation Dice
    (chosen on validation, never on the test metrics being compared)."""
    if by == "run":
        return records
    best: dict[str, RunRecord] = {}
    for rec in records:
        current = best.get(rec.method)
        if current is None or (rec.best_val_dice > current.best_val_dice) or math.isnan(current.best_val_dice):
            best[rec.method] = rec
    return list(best.values())


def _mean_std(values: list[float]) -> tuple[float, float]:
    finite = np.array([v for v in values if not math.isnan(v)], dtype=float)
    return (float(finite.mean()), float(finite.std())) if finite.size else (math.nan, math.nan)


def compare(records: list[RunRecord], metric: str = "dice", reference: str | None = None) -> Comparison:
    """Per-class ``metric`` (mean ± std over test cases), foreground means of Dice / HD95 / NSD,
    the uncertainty's scores (where any run logged them: calibration error, error AUC, Spearman
    correlation with Dice), cost columns, and paired per-case tests of every run against ``reference`` (a run id or name;
    default: the first ``unet`` run, else the first run).

    Seconds per volume are those the run logged for its own test prediction (on the machine and
    under the load it trained with); time runs on one quiet machine for a speed claim.
    """
    classes = list(dict.fromkeys(c for rec in records for c in rec.classes))
    ref = next((r for r in records if reference in (r.run_id, r.name)), None) if reference else \
        next((r for r in records if r.method == "unet"), records[0])
    if ref is None:
        raise Imgx3dError(f"--reference '{reference}' is not among the compared runs ({', '.join(r.name for r in records)})")
    records = [ref] + [r for r in records if r is not ref]  # the reference is the first row
    uncertainty = [k for k in UNCERTAINTY_METRICS if any(k in r.uncertainty for r in records)]
    columns = [f"{metric} {c}" for c in classes] + ["dice mean", "hd95 mean", "nsd mean", *uncertainty,
                                                    "seconds_per_volume", "train_minutes", "n_parameters"]
    rows = []
    for rec in records:
        row: dict[str, object] = {"run": rec.name, "method": rec.method, "run_id": rec.run_id}
        for c in classes:
            row[f"{metric} {c}"] = _mean_std(list(rec.values(metric, c).values()))
        for m in ("dice", "hd95", "nsd"):
            row[f"{m} mean"] = _mean_std(list(rec.case_means(m).values()))
        row.update({k: rec.uncertainty.get(k, math.nan) for k in uncertainty})
        row.update(seconds_per_volume=rec.seconds_per_volume, train_minutes=rec.train_minutes,
                   n_parameters=rec.n_parameters)
        rows.append(row)
    paired = []
    for rec in records:
        if rec is ref:
            continue
        for c in [*classes, "mean"]:
            ours = rec.case_means(metric) if c == "mean" else rec.values(metric, c)
            theirs = ref.case_means(metric) if c == "mean" else ref.values(metric, c)
            common = [k for k in ours if k in theirs and not math.isnan(ours[k]) and not math.isnan(theirs[k])]
            diff = np.array([ours[k] - theirs[k] for k in common])
            p = math.nan if not diff.size else float(wilcoxon(diff).pvalue) if np.any(diff) else 1.0
            paired.append({"run": rec.name, "reference": ref.name, "class": c, "metric": metric, "n_cases": len(common),
                           "mean_difference": float(diff.mean()) if diff.size else math.nan, "p_value": p})
    return Comparison(metric, columns, rows, paired, ref.name)


def _best_index(comparison: Comparison, column: str) -> int | None:
    values = [row[column][0] if isinstance(row[column], tuple) else row[column] for row in comparison.rows]
    finite = [(v, i) for i, v in enumerate(values) if not math.isnan(float(v))]
    if len(finite) < 2:
        return None
    lower = column.split()[0] in LOWER_IS_BETTER or column in LOWER_IS_BETTER
    return (min(finite) if lower else max(finite))[1]


def _cell(value: object, column: str) -> str:
    if isinstance(value, tuple):
        mean, std = value
        return "n/a" if math.isnan(mean) else f"{mean:.4f} ± {std:.3f}"
    if column == "n_parameters":
        return "n/a" if math.isnan(float(value)) else f"{float(value) / 1e6:.2f} M"
    if column in UNCERTAINTY_METRICS:
        return "n/a" if math.isnan(float(value)) else f"{float(value):.4f}"
    return "n/a" if math.isnan(float(value)) else f"{float(value):.3f}"


def to_markdown(comparison: Comparison) -> str:
    """The table (best value per column in bold) and the paired tests, as Markdown."""
    head = ["run", "method", *comparison.columns]
    best = {c: _best_index(comparison, c) for c in comparison.columns}
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, row in enumerate(comparison.rows):
        cells = [str(row["run"]), str(row["method"])]
        for c in comparison.columns:
            text = _cell(row[c], c)
            cells.append(f"**{text}**" if best[c] == i else text)
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Paired per-case differences in {comparison.metric} against `{comparison.reference}` "
              "(Wilcoxon signed-rank; p < 0.05 marked *):", "",
              "| run | class | cases | mean difference | p |", "|---|---|---|---|---|"]
    for p in comparison.paired:
        mark = " *" if p["p_value"] < 0.05 else ""
        lines.append(f"| {p['run']} | {p['class']} | {p['n_cases']} | {p['mean_difference']:+.4f} | "
                     f"{p['p_value']:.2g}{mark} |")
    return "\n".join(lines)


def write_csv(comparison: Comparison, table_path: Path, paired_path: Path) -> None:
    """The table (means and stds in separate columns) and the paired tests as CSV."""
    fields = ["run", "method", "run_id"]
    for c in comparison.columns:
        fields += [c, f"{c} std"] if isinstance(comparison.rows[0][c], tuple) else [c]
    flat_rows = []
    for row in comparison.rows:
        flat = {}
        for key, value in row.items():
            if isinstance(value, tuple):
                flat[key], flat[f"{key} std"] = value
            else:
                flat[key] = value
        flat_rows.append(flat)
    atomic_write_text(table_path, csv_text(fields, flat_rows))
    atomic_write_text(paired_path, csv_text(list(comparison.paired[0]) if comparison.paired else ["run"],
                                            comparison.paired))


def write_comparison(uri: str, experiment: str, output: str | Path, runs: list[str] | None = None,
                     metric: str = "dice", by: str = "run", reference: str | None = None,
                     log: bool = True) -> tuple[Comparison, list[Path]]:
    """Compare runs, write ``table.md``, ``table.csv``, ``paired.csv`` and the plots to ``output``,
    and (``log``) keep them as artifacts of a comparison run in the same experiment."""
    from imgx3d.evaluation import plots
    from imgx3d.tracking import Tracker

    records = select_runs(load_runs(uri, experiment, runs), by)
    comparison = compare(records, metric, reference)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output / "table.md", to_markdown(comparison) + "\n")
    write_csv(comparison, output / "table.csv", output / "paired.csv")
    files = [output / "table.md", output / "table.csv", output / "paired.csv",
             plots.metric_boxplots(records, metric, output / f"{metric}_boxplots.png"),
             plots.quality_vs_time(comparison, output / "dice_vs_time.png"),
             plots.validation_curves(records, output / "validation_curves.png")]
    if log:
        tracker = Tracker(uri, experiment, run_name=f"compare-{time.strftime('%Y%m%d-%H%M%S')}",
                          tags={COMPARISON_TAG: "comparison", "reference": comparison.reference,
                                "compared_runs": ",".join(r.run_id for r in records)[:5000]})
        tracker.log_artifact(output, "comparison")
        tracker.end("FINISHED")
    return comparison, files
