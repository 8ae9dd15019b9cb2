"""Per-class segmentation metrics (MONAI), shared by validation and ``imgx3d evaluate``.

Conventions for empty structures: both reference and prediction empty → Dice/IoU/NSD 1
and HD95 0; exactly one empty → Dice/IoU/NSD 0 and HD95 NaN (undefined, left out of means).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from monai.metrics import (
    compute_dice,
    compute_hausdorff_distance,
    compute_iou,
    compute_surface_dice,
)

from imgx3d.config import DataConfig
from imgx3d.data.io import is_image_path, is_volume_path, read_label, strip_suffix
from imgx3d.data.labels import Regions
from imgx3d.errors import InputError
from imgx3d.files import atomic_write_text, csv_text

ALL_METRICS = ("dice", "iou", "hd95", "nsd")


def _crop_to_objects(pred: np.ndarray, ref: np.ndarray, margin: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Crop both maps to the union bounding box of their foreground (distances are unchanged)."""
    fg = np.argwhere((pred > 0) | (ref > 0))
    if fg.size == 0:
        corner = tuple(slice(0, 1) for _ in pred.shape)
        return pred[corner], ref[corner]
    lo = np.maximum(fg.min(0) - margin, 0)
    hi = np.minimum(fg.max(0) + margin + 1, pred.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    return pred[box], ref[box]


def score_case(pred: np.ndarray, ref: np.ndarray, classes: list[int], spacing: tuple[float, ...] = (1.0, 1.0, 1.0),
               metrics: tuple[str, ...] = ALL_METRICS, nsd_tolerance_mm: float = 1.0,
               ignore_label: int | None = None, regions: Regions | None = None) -> dict[int, dict[str, float]]:
    """Metrics per foreground class (or per region) of one case.

    Axes of size 1 are dropped first, so a 2D image (or a one-slice volume) is scored in 2D:
    its surfaces are contours, not the whole slice.

    Args:
        pred, ref: integer label maps of the same shape.
        classes: label values to score (normally all but background).
        spacing: voxel size in mm, for HD95 and NSD.
        metrics: any of ``dice``, ``iou``, ``hd95``, ``nsd``.
        nsd_tolerance_mm: surface tolerance of the normalised surface Dice.
        ignore_label: the reference's value for voxels not annotated (``data.ignore_label``): scored as
            neither class, whatever the prediction there.
        regions: score regions instead (the BraTS way): ``classes`` are then region keys (``r + 1`` for
            region ``r``, as in :attr:`Regions.scored`), each a union of label values in both maps.
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    if ignore_label is not None:
        annotated = ref != ignore_label
        pred, ref = np.where(annotated, pred, 0), np.where(annotated, ref, 0)
    axes = [a for a, n in enumerate(pred.shape) if n > 1] or [0]
    spacing = tuple(spacing[a] for a in axes)
    pred, ref = _crop_to_objects(pred.reshape([pred.shape[a] for a in axes]), ref.reshape([ref.shape[a] for a in axes]))
    if regions is None:
        p = torch.from_numpy(np.stack([pred == c for c in classes])[None].astype(np.float32))
        r = torch.from_numpy(np.stack([ref == c for c in classes])[None].astype(np.float32))
    else:
        pred_masks, ref_masks = regions.masks(pred), regions.masks(ref)
        p = torch.from_numpy(np.stack([pred_masks[c - 1] for c in classes])[None].astype(np.float32))
        r = torch.from_numpy(np.stack([ref_masks[c - 1] for c in classes])[None].astype(np.float32))
    out: dict[str, torch.Tensor] = {}
    if "dice" in metrics:
        out["dice"] = compute_dice(p, r, include_background=True, ignore_empty=False)[0]
    if "iou" in metrics:
        out["iou"] = compute_iou(p, r, include_background=True, ignore_empty=False)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns on empty structures; handled below
        if "hd95" in metrics:
            out["hd95"] = compute_hausdorff_distance(p, r, include_background=True, percentile=95, spacing=list(spacing))[0]
        if "nsd" in metrics:
            out["nsd"] = compute_surface_dice(p, r, [nsd_tolerance_mm] * len(classes), include_background=True,
                                              spacing=list(spacing))[0]
    result: dict[int, dict[str, float]] = {}
    for i, c in enumerate(classes):
        p_empty, r_empty = not p[0, i].any(), not r[0, i].any()
        row = {}
        for name, values in out.items():
            value = float(values[i])
            if p_empty and r_empty:
                value = 0.0 if name == "hd95" else 1.0
            elif p_empty or r_empty:
                value = math.nan if name == "hd95" else 0.0
            row[name] = value
        result[c] = row
    return result


def summarize(rows: list[dict], labels: dict[int, str], metrics: tuple[str, ...] = ALL_METRICS) -> dict:
    """Mean and std per class and metric over cases (NaNs left out), and foreground means."""
    summary: dict = {"cases": len({r["case"] for r in rows}), "per_class": {}, "foreground_mean": {}}
    for c, name in labels.items():
        if c == 0:
            continue
        class_rows = [r for r in rows if r["class"] == c]
        stats = {}
        for m in metrics:
            values = np.array([r[m] for r in class_rows if m in r], dtype=float)
            values = values[~np.isnan(values)]
            stats[m] = {"mean": float(values.mean()) if values.size else math.nan,
                        "std": float(values.std()) if values.size else math.nan}
        summary["per_class"][name] = stats
    for m in metrics:
        means = [s[m]["mean"] for s in summary["per_class"].values() if not math.isnan(s[m]["mean"])]
        summary["foreground_mean"][m] = float(np.mean(means)) if means else math.nan
    return summary


def label_files(folder: Path) -> dict[str, Path]:
    """Label maps (volumes or 2D images) of a folder by case name (probability and uncertainty maps left out)."""
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder; pass a folder of label maps")
    return {strip_suffix(p.name): p for p in sorted(folder.iterdir())
            if (is_volume_path(p) or is_image_path(p)) and not p.name.startswith(".")
            and not strip_suffix(p.name).endswith(("_probabilities", "_uncertainty"))}


def evaluate_folders(pred_dir: str | Path, ref_dir: str | Path, labels: dict[int, str] | None = None,
                     output_dir: str | Path | None = None, nsd_tolerance_mm: float = 1.0,
                     data_cfg: DataConfig | None = None) -> tuple[list[dict], dict]:
    """Score every prediction in ``pred_dir`` against the same-named reference in ``ref_dir``.

    Label maps are volumes or 2D images (scored in 2D). With ``data_cfg``, both folders' values
    pass through its ``mask_threshold`` / ``label_map`` first (files in the dataset's own values,
    as ``imgx3d predict`` writes them), reference voxels of its ``ignore_label`` are not scored, and with
    its ``regions`` the scores are per region (whole tumour, tumour core, ...), not per label. Writes
    ``metrics.csv`` (per case, per class or region) and ``summary.json`` into ``output_dir``.

    Raises:
        InputError: missing folders/files, or a prediction not on its reference's grid.
    """
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    preds, refs = label_files(pred_dir), label_files(ref_dir)
    if not preds:
        raise InputError(f"{pred_dir}: no predictions (.nii/.nii.gz/.nrrd/.mha or 2D images) found")
    missing = sorted(set(preds) - set(refs))
    if missing:
        raise InputError(f"{ref_dir}: no reference for case '{missing[0]}' (from {preds[missing[0]]}); add it or remove the prediction")
    loaded = {}
    for case in preds:
        pred, ref = read_label(preds[case], data_cfg), read_label(refs[case], data_cfg)
        if pred.spatial_shape != ref.spatial_shape or not np.allclose(pred.affine, ref.affine, atol=1e-3):
            raise InputError(f"{preds[case]}: not on the grid of its reference {refs[case]} (shape or affine differ); "
                             "predict on the original image")
        loaded[case] = (pred, ref)
    if labels is None:
        values = sorted({int(v) for p, r in loaded.values() for v in np.union1d(np.unique(p.array), np.unique(r.array))}
                        - {data_cfg.ignore_label if data_cfg else None})
        labels = {v: ("background" if v == 0 else f"label_{v}") for v in values} | {0: "background"}
    regions = Regions.of(data_cfg, labels) if data_cfg is not None else None
    if regions is not None:
        labels = regions.scored
    classes = [c for c in sorted(labels) if c != 0]
    rows = []
    for case, (pred, ref) in loaded.items():
        scores = score_case(pred.array, ref.array, classes, ref.spacing, nsd_tolerance_mm=nsd_tolerance_mm,
                            ignore_label=data_cfg.ignore_label if data_cfg else None, regions=regions)
        rows += [{"case": case, "class": c, "name": labels[c], **scores[c]} for c in classes]
    summary = summarize(rows, labels)
    if output_dir is not None:
        write_metrics(rows, summary, Path(output_dir))
    return rows, summary


def write_metrics(rows: list[dict], summary: dict, output_dir: Path) -> None:
    """Write ``metrics.csv`` and ``summary.json``."""
    atomic_write_text(output_dir / "metrics.csv", csv_text(["case", "class", "name", *ALL_METRICS], rows))
    atomic_write_text(output_dir / "summary.json", json.dumps(summary, indent=2))


def format_table(summary: dict) -> str:
    """A plain-text (ASCII) table of per-class means +/- std."""
    metrics = list(summary["foreground_mean"])
    lines = [f"{'class':<24}" + "".join(f"{m:>18}" for m in metrics)]
    for name, stats in summary["per_class"].items():
        lines.append(f"{name:<24}" + "".join(f"{stats[m]['mean']:>10.4f} +/- {stats[m]['std']:<5.3f}" for m in metrics))
    lines.append(f"{'foreground mean':<24}" + "".join(f"{summary['foreground_mean'][m]:>18.4f}" for m in metrics))
    if summary.get("uncertainty"):
        u = summary["uncertainty"]
        ece = "n/a" if u.get("ece") is None else f"{u['ece']:.4f}"
        lines.append(f"uncertainty ({u['cases']} cases): calibration error {ece}, error AUC {u['error_auc']:.4f}, "
                     f"Spearman of foreground entropy with Dice {u['spearman_dice']:.3f}")
    return "\n".join(lines)
