"""The slice adapter's training side: how 2D methods train on slices of 3D volumes.

Volumes arrive in model space (RAS, preset-normalised, ``(C, X, Y, Z)``). A 2D method sees them
through the slice view of :mod:`imgx3d.data.geometry` (slices along ``data.slices.axis``,
resized to ``data.slices.size``, intensities per volume in [-1, 1]); at inference the slice
window of :mod:`imgx3d.inference.windows` restacks its predictions. Training draws slices from
the training volumes (all foreground slices, a ``keep_empty`` fraction of the others);
validation and evaluation stay in 3D.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from imgx3d.config import SliceConfig
from imgx3d.data.geometry import resize_slices, to_slice_range, volume_to_slices
from imgx3d.data.transforms import PatchBatches, draw_indices
from imgx3d.errors import ConfigError


def slice_spacing(native_grids: Sequence[tuple[Sequence[int], np.ndarray]], model_shapes: Sequence[Sequence[int]],
                  cfg: SliceConfig, target_spacing: Sequence[float] | None = None) -> list[float]:
    """Pixel spacing (mm) of the method's slices and the slice thickness: the median over volumes.

    Args:
        native_grids: ``(shape, affine)`` of each source volume.
        model_shapes: each volume's model-space (RAS) shape.
        target_spacing: ``data.spacing`` (None: the native spacing, reordered to RAS).

    Returns:
        ``[row spacing, column spacing, thickness]`` of a slice ``(H, W)`` of ``cfg.size``.
    """
    import nibabel as nib

    found = []
    for (_, affine), model_shape in zip(native_grids, model_shapes):
        native = np.linalg.norm(affine[:3, :3], axis=0)
        axes = nib.orientations.io_orientation(affine)[:, 0].astype(int)  # native axis i → RAS axis axes[i]
        ras = np.empty(3)
        ras[axes] = native
        model = np.asarray(target_spacing, dtype=float) if target_spacing else ras
        in_plane = [a for a in range(3) if a != cfg.axis]
        found.append([model[a] * model_shape[a] / size for a, size in zip(in_plane, cfg.size)] + [model[cfg.axis]])
    return [float(v) for v in np.median(np.asarray(found), axis=0)] if found else [1.0, 1.0, 1.0]


def foreground_slices(cases: Sequence[dict[str, Any]], cfg: SliceConfig, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``limit`` slices with foreground of model-space cases, as a 2D method sees them:
    images ``(N, C, H, W)`` in [-1, 1] and labels ``(N, 1, H, W)`` (generators' validation)."""
    images, labels = [], []
    for case in cases:
        image = volume_to_slices(to_slice_range(case["image"], cfg.percentiles), cfg.axis, cfg.size)
        label = volume_to_slices(case["label"], cfg.axis, cfg.size, label=True)
        keep = label.flatten(1).amax(1) > 0
        images.append(image[keep])
        labels.append(label[keep])
    if not images:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.cat(images)[:limit], torch.cat(labels)[:limit]


def slice_pool(labels: Sequence[torch.Tensor], axis: int, keep_empty: float, seed: int) -> list[tuple[int, int]]:
    """``(volume, slice)`` pairs for training: every slice with foreground, ``keep_empty`` of the rest."""
    rng = np.random.default_rng([seed, 7919])
    pool = []
    for v, label in enumerate(labels):
        has_fg = (label[0] > 0).any(dim=[a for a in range(3) if a != axis]).tolist()
        pool += [(v, s) for s, fg in enumerate(has_fg) if fg or rng.random() < keep_empty]
    return pool


class SliceBatches(PatchBatches):
    """Batches of 2D slices ``(B, C, H, W)`` drawn from volumes, a pure function of (seed, step).

    Images are in [-1, 1] (per volume), labels ``(B, 1, H, W)`` integer class indices; random
    flips along ``flip_axes`` that lie in the slice plane.
    """

    def __init__(self, items: list[dict[str, Any]], cfg: SliceConfig, flip_axes: Sequence[int], batch_size: int,
                 seed: int, start_step: int, stop_step: int, extra_fraction: float | None = None):
        super().__init__(items, None, batch_size, seed, start_step, stop_step, extra_fraction)
        self.cfg = cfg
        self.images = [to_slice_range(item["image"], cfg.percentiles) for item in items]
        # label-free items (self-supervised methods): all-background labels, every slice drawn
        self.labels = [item["label"] if "label" in item else torch.zeros_like(item["image"][:1], dtype=torch.long)
                       for item in items]
        keep_empty = cfg.keep_empty if all("label" in item for item in items) else 1.0
        self.pool = slice_pool(self.labels, cfg.axis, keep_empty, seed)
        if not self.pool:
            raise ConfigError("no training slices: every slice is empty and data.slices.keep_empty is 0; raise it")
        self.pool_is_extra = np.array([bool(items[v].get("extra")) for v, _ in self.pool])
        in_plane = [a for a in range(3) if a != cfg.axis]
        self.flip_dims = [in_plane.index(a) - 2 for a in flip_axes if a in in_plane]  # -2: H, -1: W

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """The batch of training step ``step``."""
        rng = np.random.default_rng([self.seed, step])
        images, labels = [], []
        for index in draw_indices(rng, self.batch_size, self.pool_is_extra, self.extra_fraction):
            v, s = self.pool[int(index)]
            image = self.images[v].select(self.cfg.axis + 1, s)[None]
            label = self.labels[v].select(self.cfg.axis + 1, s)[None]
            image, label = resize_slices(image, self.cfg.size, "bilinear")[0], resize_slices(label, self.cfg.size, "nearest-exact")[0]
            dims = [d for d in self.flip_dims if rng.random() < 0.5]
            images.append(image.flip(dims) if dims else image)
            labels.append(label.flip(dims) if dims else label)
        return {"image": torch.stack(images), "label": torch.stack(labels).long()}
