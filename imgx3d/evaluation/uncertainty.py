"""How good is a prediction's uncertainty? Scores of ``imgx3d predict --uncertainty`` maps against the
reference labels (``imgx3d evaluate --uncertainty DIR``), and the per-case score a folder is sorted by.

- **Expected calibration error** (ECE, 15 equal-width confidence bins) of the class probabilities
  (``<case>_probabilities.nii.gz``, written by ``predict --probabilities``): the confidence of a
  voxel is its largest class probability, correct when that class is the reference's.
- **Error AUC**: the area under the ROC curve of the voxel entropy as a detector of the voxels the
  prediction gets wrong (0.5: chance; 1: every error more uncertain than every correct voxel).
- **Spearman correlation** between each case's foreground uncertainty and its Dice: a useful
  score is high where Dice is low (a negative correlation).

Voxel scores are pooled over each case's region of interest: the bounding box of the predicted and
reference foreground, grown by :data:`MARGIN` voxels. Over a whole volume the easy background (certain
and correct) would dominate both ECE and AUC.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.metrics.calibration import calibration_binning
from scipy.stats import rankdata, spearmanr

from imgx3d.data.io import read_label
from imgx3d.evaluation.metrics import label_files

UNCERTAIN = 0.5  # normalised entropy above which a voxel counts as uncertain
MARGIN = 5  # voxels around the foreground's bounding box that the voxel scores cover
BINS = 15  # confidence bins of the ECE
UNCERTAINTY_METRICS = ("ece", "error_auc", "spearman_dice")  # what a run logs (test/uncertainty/...) and compare shows


@dataclass(frozen=True)
class CaseUncertainty:
    """A case's uncertainty in two numbers (and how many members it came from).

    Attributes:
        foreground_entropy: mean entropy / log K inside the predicted foreground (0 … 1; 0 with no
            foreground predicted).
        uncertain_ml: volume of voxels whose entropy / log K exceeds :data:`UNCERTAIN`, in ml.
        members: predictions averaged (mirrorings × shifts × ensemble members × samples; 0: unknown).
    """

    foreground_entropy: float
    uncertain_ml: float
    members: int

    def to_json(self) -> dict[str, float | int]:
        return {"foreground_entropy": round(self.foreground_entropy, 5), "uncertain_ml": round(self.uncertain_ml, 4),
                "members": self.members}


def case_uncertainty(entropy_map: np.ndarray, foreground: np.ndarray, num_classes: int, voxel_ml: float,
                     members: int) -> CaseUncertainty:
    """The per-case score of a native-grid entropy map (nats) and the predicted foreground mask."""
    normalised = entropy_map / math.log(max(num_classes, 2))
    inside = float(normalised[foreground].mean()) if foreground.any() else 0.0
    return CaseUncertainty(inside, float((normalised > UNCERTAIN).sum()) * voxel_ml, members)


def region_of_interest(pred: np.ndarray, ref: np.ndarray, margin: int = MARGIN) -> tuple[slice, ...]:
    """The bounding box of ``pred`` and ``ref`` foreground, grown by ``margin`` (the whole volume when both are empty)."""
    where = np.argwhere((pred != 0) | (ref != 0))
    if len(where) == 0:
        return tuple(slice(None) for _ in pred.shape)
    low, high = where.min(0) - margin, where.max(0) + margin + 1
    return tuple(slice(max(int(a), 0), min(int(b), n)) for a, b, n in zip(low, high, pred.shape))


def error_auc(uncertainty: np.ndarray, error: np.ndarray) -> float:
    """ROC AUC of ``uncertainty`` as a score for ``error`` (ties count half); NaN without both kinds."""
    error = error.astype(bool).ravel()
    n_pos, n_neg = int(error.sum()), int((~error).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(uncertainty.ravel())
    return float((ranks[error].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = BINS) -> float:
    """``Σ_b (n_b / n) |accuracy_b − confidence_b|`` over equal-width confidence bins (MONAI's
    ``calibration_binning`` of the top-label confidence: its ``CalibrationErrorMetric`` scores each class's
    channel instead)."""
    as_tensor = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64).ravel())[None, None]  # noqa: E731
    mean_p, mean_correct, counts = calibration_binning(as_tensor(confidence), as_tensor(correct), num_bins=bins)
    filled = counts > 0
    return float((counts[filled] * (mean_correct[filled] - mean_p[filled]).abs()).sum() / counts.sum().clamp_min(1))


def case_dice(rows: list[dict]) -> dict[str, float]:
    """case → mean foreground Dice, from :func:`~imgx3d.evaluation.metrics.evaluate_folders`' per-class rows."""
    dice: dict[str, list[float]] = {}
    for row in rows:
        dice.setdefault(row["case"], []).append(row["dice"])
    return {case: float(np.nanmean(values)) for case, values in dice.items()}


def _load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)


class UncertaintyScores:
    """Case by case, what the scores of :func:`evaluate_uncertainty` pool; :meth:`result` computes them.

    Only each case's region of interest is kept (the entropy, the errors and, with probabilities, the
    confidence and whether it was right), so a test split's worth fits in memory.
    """

    def __init__(self, class_values: list[int], ignore_label: int | None = None):
        self.values = np.asarray(class_values)
        self.ignore_label = ignore_label  # the reference's not-annotated voxels: neither right nor wrong
        self.scores: list[np.ndarray] = []
        self.errors: list[np.ndarray] = []
        self.confidences: list[np.ndarray] = []
        self.corrects: list[np.ndarray] = []
        self.case_entropy: dict[str, float] = {}

    def add(self, case: str, pred: np.ndarray, ref: np.ndarray, entropy_map: np.ndarray,
            probabilities: np.ndarray | None = None) -> None:
        """One case: label maps in class values, its entropy map (nats) and, for the ECE, its ``(..., K)``
        class probabilities (channels in ``class_values`` order). Reference voxels of the ignore label are
        left out of the voxel scores."""
        annotated = np.ones(ref.shape, bool) if self.ignore_label is None else ref != self.ignore_label
        roi = region_of_interest(pred, np.where(annotated, ref, 0))
        keep = annotated[roi]
        self.scores.append(entropy_map[roi][keep])
        self.errors.append((pred != ref)[roi][keep])
        if probabilities is not None:
            probs = probabilities[roi][keep]
            self.confidences.append(probs.max(-1))
            self.corrects.append(self.values[probs.argmax(-1)] == ref[roi][keep])
        self.case_entropy[case] = case_uncertainty(entropy_map, pred != 0, len(self.values), 1.0, 0).foreground_entropy

    def result(self, dice: dict[str, float]) -> dict[str, Any]:
        """``ece`` (None without probabilities), ``error_auc``, ``spearman_dice`` (per-case foreground entropy
        against ``dice``, case → mean foreground Dice) and its p value, the number of cases, per-case rows."""
        rows = [{"case": case, "foreground_entropy": h, "dice": dice.get(case, float("nan"))}
                for case, h in sorted(self.case_entropy.items())]
        finite = [r for r in rows if math.isfinite(r["dice"])]
        rho, p = spearmanr([r["foreground_entropy"] for r in finite], [r["dice"] for r in finite]) \
            if len(finite) > 2 else (float("nan"), float("nan"))
        ece = expected_calibration_error(np.concatenate(self.confidences), np.concatenate(self.corrects)) \
            if self.confidences else None
        return {"cases": len(rows), "ece": ece,
                "error_auc": error_auc(np.concatenate(self.scores), np.concatenate(self.errors)),
                "spearman_dice": float(rho), "spearman_p": float(p), "per_case": rows}


def evaluate_uncertainty(cases: dict[str, tuple[np.ndarray, np.ndarray]], dice: dict[str, float], folder: Path,
                         class_values: list[int], ignore_label: int | None = None) -> dict[str, Any]:
    """Score the uncertainty maps in ``folder`` against the references (their ``ignore_label`` voxels left out).

    Args:
        cases: case → (predicted, reference) label maps in class values.
        dice: case → mean foreground Dice of the prediction.
        folder: where ``<case>_uncertainty.nii.gz`` (and, for the ECE, ``<case>_probabilities.nii.gz``) are.
        class_values: the class values in probability-channel order (sorted, background first).

    Returns:
        :meth:`UncertaintyScores.result`.
    """
    scores = UncertaintyScores(class_values, ignore_label)
    for case, (pred, ref) in sorted(cases.items()):
        path = folder / f"{case}_uncertainty.nii.gz"
        if not path.is_file():
            continue
        maps = _load(path)
        probabilities = folder / f"{case}_probabilities.nii.gz"
        scores.add(case, pred, ref, maps[..., 0] if maps.ndim == pred.ndim + 1 else maps,
                   _load(probabilities) if probabilities.is_file() else None)
    if not scores.case_entropy:
        raise FileNotFoundError(f"{folder}: no <case>_uncertainty.nii.gz; predict with --uncertainty into it")
    return scores.result(dice)


def evaluate_uncertainty_folders(pred_dir: str | Path, ref_dir: str | Path, uncertainty_dir: str | Path,
                                 rows: list[dict], data_cfg: Any = None) -> dict[str, Any]:
    """:func:`evaluate_uncertainty` of the predictions in ``pred_dir`` (scored as ``rows`` by
    :func:`~imgx3d.evaluation.metrics.evaluate_folders`) against ``ref_dir``, with the maps in ``uncertainty_dir``."""
    preds, refs = label_files(Path(pred_dir)), label_files(Path(ref_dir))
    cases = {case: (read_label(preds[case], data_cfg).array, read_label(refs[case], data_cfg).array) for case in preds}
    values = sorted({0, *(int(row["class"]) for row in rows)})
    return evaluate_uncertainty(cases, case_dice(rows), Path(uncertainty_dir),
                                values, data_cfg.ignore_label if data_cfg is not None else None)
