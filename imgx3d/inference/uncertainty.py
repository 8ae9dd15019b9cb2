"""Where a prediction is unsure: per-voxel uncertainty from the spread of the run's own members.

A prediction averages members: test-time mirrorings and shifts, the members of an ensemble, the
samples of a diffusion segmenter (ImgX's ``method.num_samples``). :class:`Spread` keeps, beside
their mean, the mean of their entropies, which gives the two standard maps (in nats):

- predictive entropy ``H[p̄] = −Σ_k p̄_k log p̄_k`` of the averaged probabilities: high wherever
  the prediction is unsure, for whatever reason (an ambiguous boundary, an unfamiliar image);
- mutual information ``I = H[p̄] − mean_m H[p_m]`` (the expected disagreement between members,
  BALD's score): high where the members disagree; zero with a single member.

A case's score for sorting a folder (which cases to check first) and the scores of the maps
against reference labels are in :mod:`imgx3d.evaluation.uncertainty`.

Hand-written: MONAI and nnU-Net average the members and keep no spread.
"""

from __future__ import annotations

import torch

def entropy(probs: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``−Σ p log p`` over the class axis ``dim`` (nats; 0 where p = 0: torch's ``special.entr``)."""
    return torch.special.entr(probs.float()).sum(dim)


class Spread:
    """The running mean of member probability maps ``(K, ...)`` and of their entropies."""

    def __init__(self) -> None:
        self.count = 0
        self._sum: torch.Tensor | None = None
        self._entropy_sum: torch.Tensor | None = None

    def add(self, probs: torch.Tensor) -> None:
        """One member's class probabilities ``(K, ...)``."""
        probs = probs.float()
        h = entropy(probs)
        self._sum = probs.clone() if self._sum is None else self._sum.add_(probs)
        self._entropy_sum = h if self._entropy_sum is None else self._entropy_sum.add_(h)
        self.count += 1

    @property
    def mean(self) -> torch.Tensor:
        """The members' mean probabilities ``(K, ...)``."""
        if self._sum is None:
            raise ValueError("no member was added")
        return self._sum / self.count

    def maps(self) -> torch.Tensor:
        """``(1, ...)`` predictive entropy with one member; ``(2, ...)`` predictive entropy and mutual
        information with several."""
        h = entropy(self.mean)
        if self.count == 1:
            return h[None]
        mutual = (h - self._entropy_sum / self.count).clamp_min(0)  # ≥ 0 up to rounding (Jensen)
        return torch.stack([h, mutual])
