"""PNG figures: comparison plots of runs and contour overlays of predictions.

Figures are drawn on ``matplotlib.figure.Figure`` objects, not through ``pyplot``, so nothing
here touches the global backend (a notebook keeps its inline display) and files are written
atomically.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from imgx3d.config import DataConfig
from imgx3d.data.io import read_label, read_volume
from imgx3d.evaluation.records import Comparison, RunRecord
from imgx3d.files import atomic_write

CLASS_COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
                 "#fabed4", "#469990", "#dcbeff", "#9a6324", "#fffac8", "#800000", "#aaffc3", "#808000"]


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    return path


def metric_boxplots(records: list[RunRecord], metric: str, path: Path) -> Path:
    """One panel per class: the per-case ``metric`` of every run as a box plot."""
    classes = list(dict.fromkeys(c for rec in records for c in rec.classes))
    fig = Figure(figsize=(max(4.0, 1.1 * len(records)) * min(len(classes), 4), 3.6 * math.ceil(len(classes) / 4)),
                 layout="constrained")  # no y-label over the neighbouring panel
    for k, class_name in enumerate(classes):
        ax = fig.add_subplot(math.ceil(len(classes) / 4), min(len(classes), 4), k + 1)
        data = [[v for v in rec.values(metric, class_name).values() if not math.isnan(v)] for rec in records]
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(records) + 1), [rec.name for rec in records], rotation=30, ha="right", fontsize=8)
        ax.set_title(class_name)
        ax.set_ylabel(metric)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"per-case {metric} on the test cases")
    return _save(fig, path)


def quality_vs_time(comparison: Comparison, path: Path) -> Path:
    """Foreground-mean Dice against inference seconds per volume, one point per run."""
    fig = Figure(figsize=(5.5, 4.0))
    ax = fig.add_subplot()
    for i, row in enumerate(comparison.rows):
        seconds, (dice, std) = float(row["seconds_per_volume"]), row["dice mean"]
        if math.isnan(seconds) or math.isnan(dice):
            continue
        ax.errorbar(seconds, dice, yerr=std, fmt="o", color=CLASS_COLOURS[i % len(CLASS_COLOURS)], capsize=3)
        ax.annotate(str(row["run"]), (seconds, dice), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("inference seconds per volume (log)")
    ax.set_ylabel("Dice, foreground mean (± std over cases)")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def validation_curves(records: list[RunRecord], path: Path) -> Path:
    """Validation Dice against training step, one line per run."""
    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.add_subplot()
    for i, rec in enumerate(records):
        if rec.val_curve:
            steps, values = zip(*rec.val_curve)
            ax.plot(steps, values, marker=".", label=rec.name, color=CLASS_COLOURS[i % len(CLASS_COLOURS)])
    ax.set_xlabel("training step")
    ax.set_ylabel("validation Dice (foreground mean)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _slice_indices(masks: list[np.ndarray], depth: int, count: int) -> list[int]:
    """Representative slices along the last axis: spread over the extent of the foreground."""
    occupied = np.flatnonzero(np.any(np.stack([m.reshape(-1, depth) for m in masks]) > 0, axis=(0, 1)))
    if occupied.size == 0:
        return [depth // 2]
    picks = np.quantile(occupied, np.linspace(0.2, 0.8, count) if count > 1 else [0.5])
    return sorted({int(occupied[np.abs(occupied - p).argmin()]) for p in picks})


def overlay_montage(image: np.ndarray, prediction: np.ndarray, labels: dict[int, str], path: Path,
                    reference: np.ndarray | None = None, count: int = 3, title: str = "",
                    uncertainty: np.ndarray | None = None) -> Path:
    """A row of slices (last array axis) with the prediction's contours per class (solid) and the
    reference's (dashed); with ``uncertainty``, a second row of the same slices with it as a heat map.

    Args:
        image: ``(X, Y, Z)`` intensities on the prediction's grid; a 2D image is ``(rows, columns, 1)``.
        prediction, reference: label maps of the same shape, in class values.
        uncertainty: the same shape, normalised entropy (0 … 1), e.g. ``predict --uncertainty``'s first map
            divided by log K.
    """
    flat = image.shape[-1] == 1  # a 2D image: rows down, as the file shows it
    indices = _slice_indices([prediction] + ([reference] if reference is not None else []), image.shape[-1], count)
    rows = 1 if uncertainty is None else 2
    fig = Figure(figsize=(6.4, 6.8 * rows) if flat else (3.2 * len(indices), 3.6 * rows))
    low, high = np.percentile(image, [1, 99])
    origin = "upper" if flat else "lower"
    heat = None
    for k, z in enumerate(indices):
        ax = fig.add_subplot(rows, len(indices), k + 1)
        view = (lambda a: a[..., z]) if flat else (lambda a: a[..., z].T)
        ax.imshow(view(image), cmap="gray", vmin=low, vmax=high, origin=origin)
        for i, (value, name) in enumerate((v, n) for v, n in sorted(labels.items()) if v != 0):
            colour = CLASS_COLOURS[i % len(CLASS_COLOURS)]
            for mask, style in ((prediction, "solid"), (reference, "dashed")):
                if mask is not None and np.any(view(mask) == value):
                    ax.contour(view(mask) == value, levels=[0.5], colors=[colour], linestyles=style, linewidths=1.0,
                               origin=origin)
            ax.plot([], [], color=colour, label=name)
        ax.set_title(f"slice {z}" if not flat else "", fontsize=8)
        ax.axis("off")
        if uncertainty is not None:
            below = fig.add_subplot(rows, len(indices), len(indices) + k + 1)
            below.imshow(view(image), cmap="gray", vmin=low, vmax=high, origin=origin)
            shown = np.ma.masked_less(view(uncertainty), 0.02)  # certain voxels leave the image visible
            heat = below.imshow(shown, cmap="inferno", vmin=0.0, vmax=1.0, alpha=0.8, origin=origin)
            below.set_title("uncertainty" if not flat else "", fontsize=8)
            below.axis("off")
    handles = fig.axes[0].get_legend_handles_labels()
    if handles[0]:
        fig.legend(*handles, loc="lower center", ncol=min(6, len(handles[0])), fontsize=8, frameon=False)
    if heat is not None:
        # the bar takes its room from both rows alike, so the heat maps stay the size of the slices above them
        fig.colorbar(heat, ax=fig.axes, shrink=0.35, label="entropy / log K")
    fig.suptitle(title + ("  (solid: prediction, dashed: reference)" if reference is not None else ""), fontsize=9)
    return _save(fig, path)


def overlay_folder(pred_dir: str | Path, ref_dir: str | Path, output: str | Path, images_dir: str | Path | None = None,
                   data_cfg: DataConfig | None = None) -> list[Path]:
    """A montage per prediction with a same-named reference, on the same-named image of
    ``images_dir`` (or on the reference region, faint, without images)."""
    from imgx3d.evaluation.metrics import label_files

    preds, refs = label_files(Path(pred_dir)), label_files(Path(ref_dir))
    images = label_files(Path(images_dir)) if images_dir else {}
    names = dict(data_cfg.labels) if data_cfg and data_cfg.labels else {}
    written = []
    for case in sorted(set(preds) & set(refs)):
        pred, ref = read_label(preds[case], data_cfg).array, read_label(refs[case], data_cfg).array
        values = sorted(set(np.unique(pred).tolist()) | set(np.unique(ref).tolist()))
        labels = {v: names.get(v, f"label_{v}") for v in values}
        image = read_volume(images[case]).array if case in images else (ref > 0) * 0.3
        written.append(overlay_montage(image, pred, labels, Path(output) / f"{case}.png", reference=ref, title=case))
    return written
