"""Label maps as the mask inputs and targets of the 2D generative methods (shared by sdseg, vae,
pig and siamese, so that no method imports a sibling)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masks_to_channels(label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(B, 1, H, W)`` class indices → ``(B, K − 1, H, W)`` foreground one-hot in {-1, 1}."""
    return 2 * F.one_hot(label[:, 0].long(), num_classes)[..., 1:].movedim(-1, 1).float() - 1


def present_class_masks(label: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One foreground class per sample, drawn among the classes *present* in it, and its binary mask.

    SDSeg's multi-class training (``ldm/data/synapse.py``: a class drawn among those in the slice):
    drawing over all classes instead makes most targets empty masks when classes are small. A
    slice without foreground draws uniformly (its target is the empty mask, which teaches the
    model that an absent class stays absent). The authors also draw the background, as "every
    foreground class"; the class embedding here has foreground classes only, as has prediction.

    Args:
        label: ``(B, 1, H, W)`` class indices.
        num_classes: K, background included.

    Returns:
        (classes ``(B,)`` in 1 … K − 1, masks ``(B, H, W)`` as 0/1 floats).
    """
    present = F.one_hot(label[:, 0].long(), num_classes).flatten(1, -2).amax(1)[:, 1:].float()  # (B, K - 1)
    weights = torch.where(present.sum(1, keepdim=True) > 0, present, torch.ones_like(present))
    classes = torch.multinomial(weights, 1)[:, 0] + 1
    return classes, (label[:, 0] == classes[:, None, None]).float()
