"""Postprocessing learned from validation: keep the largest connected component where it helps.

nnU-Net's rule (``nnunetv2/postprocessing/remove_connected_components.py``): on the validation
predictions, first try keeping only the largest connected component of the foreground as a
whole; keep that step when it raises the mean foreground Dice. Then, on top of it, try each
class alone; keep it for the classes whose Dice it raises. Only what helped is applied at
prediction. With cross-validation the decision is taken on every fold's validation cases
together (:func:`learn_postprocessing` over pooled :class:`CaseCandidates`), as nnU-Net does.

A region-based run (``data.regions``) decides per region, as nnU-Net does: a region's step keeps the
largest component of the union of its labels and sets the rest of that union to background.

The components come from MONAI's ``KeepLargestConnectedComponent`` (full connectivity).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.transforms import KeepLargestConnectedComponent

from imgx3d.data.labels import Regions
from imgx3d.evaluation.metrics import score_case

MIN_GAIN = 1e-4  # a step must raise the mean Dice by more than this (ties and noise keep the raw map)


@dataclass(frozen=True)
class Postprocessing:
    """What to apply to a predicted label map (dataset label values).

    Attributes:
        foreground: keep the largest connected component of all foreground classes together.
        classes: then keep the largest component of each of these classes (region keys ``r + 1`` of a
            region-based run: the largest component of each region's union).
    """

    foreground: bool = False
    classes: tuple[int, ...] = ()

    def __bool__(self) -> bool:
        return self.foreground or bool(self.classes)

    def to_json(self) -> dict:
        return {"foreground": self.foreground, "classes": list(self.classes)}

    @classmethod
    def from_json(cls, data: dict | None) -> "Postprocessing":
        data = data or {}
        return cls(bool(data.get("foreground", False)), tuple(int(c) for c in data.get("classes", [])))

    def apply(self, labels: np.ndarray, foreground: Sequence[int], regions: Regions | None = None) -> np.ndarray:
        """``labels`` with the kept steps applied (a new array; the input is not modified).

        Args:
            labels: a label map ``(X, Y, Z)`` (or 2D) of dataset label values.
            foreground: the label values that are foreground (every class but background).
            regions: the run's regions, when ``classes`` are region keys.
        """
        out = keep_largest(labels, list(foreground), together=True) if self.foreground else labels.copy()
        for c in self.classes:
            out = keep_largest_of(out, c, regions)
        return out


def keep_largest(labels: np.ndarray, classes: list[int], together: bool) -> np.ndarray:
    """``labels`` with every component of ``classes`` but the largest set to background (0).

    ``together``: the classes form one foreground (a component may mix them), else each class
    keeps its own largest component.
    """
    transform = KeepLargestConnectedComponent(applied_labels=classes, is_onehot=False, independent=not together)
    kept = transform(torch.from_numpy(labels.copy())[None])[0]  # MONAI edits its input in place
    return np.asarray(kept).astype(labels.dtype, copy=False)


def keep_largest_of(labels: np.ndarray, key: int, regions: Regions | None = None) -> np.ndarray:
    """One postprocessing step: the largest component of class ``key``, or of region ``key``'s union of labels."""
    if regions is None:
        return keep_largest(labels, [key], together=False)
    return keep_largest(labels, list(regions.members[key - 1]), together=True)


@dataclass
class CaseCandidates:
    """One validation case's Dice per class for the raw prediction and each postprocessing step.

    Attributes:
        raw: class → Dice of the prediction as it is.
        foreground: class → Dice after keeping the largest foreground component.
        per_class: class → (Dice of that class after its own step, on the ``foreground`` map when
            that step is kept, else on the raw map) for both bases: ``{"raw": ..., "foreground": ...}``.
    """

    raw: dict[int, float]
    foreground: dict[int, float]
    per_class: dict[str, dict[int, float]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"raw": self.raw, "foreground": self.foreground, "per_class": self.per_class}

    @classmethod
    def from_json(cls, data: dict) -> "CaseCandidates":
        def ints(d: dict) -> dict[int, float]:
            return {int(k): float(v) for k, v in d.items()}

        return cls(ints(data["raw"]), ints(data["foreground"]), {k: ints(v) for k, v in data["per_class"].items()})


def case_candidates(pred: np.ndarray, ref: np.ndarray, classes: list[int],
                    ignore_label: int | None = None, regions: Regions | None = None) -> CaseCandidates:
    """Score one validation case's prediction raw and under every candidate step (the reference's
    ``ignore_label`` voxels not scored). With ``regions``, ``classes`` are region keys and Dice is per region."""
    def dice(labels: np.ndarray, which: list[int]) -> dict[int, float]:
        return {c: row["dice"] for c, row in score_case(labels, ref, which, metrics=("dice",),
                                                         ignore_label=ignore_label, regions=regions).items()}

    values = classes if regions is None else sorted({v for m in regions.members for v in m})
    fg_map = keep_largest(pred, values, together=True)
    per_class: dict[str, dict[int, float]] = {}
    for base_name, base in (("raw", pred), ("foreground", fg_map)):
        per_class[base_name] = {c: dice(keep_largest_of(base, c, regions), [c])[c] for c in classes}
    return CaseCandidates(dice(pred, classes), dice(fg_map, classes), per_class)


def _mean(cases: list[CaseCandidates], pick) -> float:
    return float(np.mean([pick(case) for case in cases]))


def learn_postprocessing(cases: list[CaseCandidates], classes: list[int]) -> tuple[Postprocessing, dict[str, float]]:
    """nnU-Net's decision on validation cases (pooled over folds when they come from several runs).

    Returns:
        The steps that raised the mean validation Dice, and the mean foreground Dice before and
        after them (``raw``, ``postprocessed``).
    """
    if not cases:
        return Postprocessing(), {}

    def fg_mean(scores: dict[int, float]) -> float:
        return float(np.mean([scores[c] for c in classes]))

    raw = _mean(cases, lambda case: fg_mean(case.raw))
    foreground = len(classes) > 0 and _mean(cases, lambda case: fg_mean(case.foreground)) > raw + MIN_GAIN
    base = "foreground" if foreground else "raw"
    kept, after = [], {}
    for c in classes:
        before = _mean(cases, lambda case: getattr(case, base)[c])
        with_step = _mean(cases, lambda case: case.per_class[base][c])
        helps = with_step > before + MIN_GAIN
        kept += [c] if helps else []
        after[c] = with_step if helps else before
    postprocessed = float(np.mean(list(after.values())))
    return Postprocessing(bool(foreground), tuple(kept)), {"raw": raw, "postprocessed": postprocessed}
