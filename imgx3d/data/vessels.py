"""Label-free inputs for self-supervised vessel segmentation (DARL, METHODS.md §5).

- :func:`fractal_vessels`: synthetic vessel-like masks (the ``F`` of DARL): random branching
  trees whose segments taper and fork, drawn as thick polylines, so no mask file is needed.
- :func:`remove_vessels`: a vessel-free background (``B``) made from an image with vessels when
  no pre-contrast frames exist: grey-level closing (dark vessels: fundus green channel,
  X-ray angiograms) or opening (bright vessels) with a window wider than the widest vessel
  fills thin tubular structures with the surrounding intensity and keeps the large-scale
  anatomy (optic disc, vignetting, the heart's shadow). Hand-written as max-pool based
  morphology so it runs batched on the training device.
- :func:`frangi_segmentation`: the classical label-free baseline: Frangi vesselness
  (scikit-image) and an Otsu threshold, both inside the field of view.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage


def _draw_segment(canvas: np.ndarray, p0: np.ndarray, p1: np.ndarray, width: float) -> None:
    """Set the pixels within ``width / 2`` of the segment p0–p1 (row, column coordinates)."""
    h, w = canvas.shape
    r = width / 2 + 1
    lo = np.floor(np.minimum(p0, p1) - r).astype(int).clip(0, [h - 1, w - 1])
    hi = np.ceil(np.maximum(p0, p1) + r).astype(int).clip(0, [h - 1, w - 1]) + 1
    rows, cols = np.mgrid[lo[0]:hi[0], lo[1]:hi[1]]
    d = p1 - p0
    length2 = max(float(d @ d), 1e-9)
    s = (((rows - p0[0]) * d[0] + (cols - p0[1]) * d[1]) / length2).clip(0, 1)
    dist2 = (rows - p0[0] - s * d[0]) ** 2 + (cols - p0[1] - s * d[1]) ** 2
    canvas[lo[0]:hi[0], lo[1]:hi[1]] |= dist2 <= (width / 2) ** 2


def fractal_vessels(size: tuple[int, int], rng: np.random.Generator, trees: int = 2, depth: int = 6,
                    width: tuple[float, float] = (4.0, 7.0)) -> np.ndarray:
    """A binary ``(H, W)`` mask of ``trees`` branching vessel trees entering from the border.

    Each segment runs a random length in a wiggling direction, then forks in two (angles
    20–45° off its direction), each child ~0.7 as wide and ~0.8 as long, down to ``depth`` levels.
    """
    h, w = size
    canvas = np.zeros(size, dtype=bool)
    scale = min(h, w)
    for _ in range(trees):
        side = rng.integers(4)  # enter from a random border, heading inwards
        along = rng.uniform(0.2, 0.8)
        start = [np.array([0.0, along * w]), np.array([h - 1.0, along * w]),
                 np.array([along * h, 0.0]), np.array([along * h, w - 1.0])][side]
        heading = [0.0, math.pi, math.pi / 2, -math.pi / 2][side] + rng.uniform(-0.4, 0.4)
        stack = [(start, heading, rng.uniform(*width), scale * rng.uniform(0.18, 0.3), 0)]
        while stack:
            p, angle, wd, length, level = stack.pop()
            for _ in range(4):  # a segment is a few short wiggling pieces
                angle += rng.normal(0, 0.15)
                q = p + (length / 4) * np.array([math.cos(angle), math.sin(angle)])
                _draw_segment(canvas, p, q, max(wd, 1.5))  # at least 1.5 px: thin branches stay connected
                p = q
            if level + 1 < depth and wd > 1.0 and 0 <= p[0] < h and 0 <= p[1] < w:
                for sign in (-1, 1):
                    stack.append((p, angle + sign * rng.uniform(0.35, 0.8), wd * rng.uniform(0.6, 0.8),
                                  length * rng.uniform(0.7, 0.9), level + 1))
    return canvas


def remove_vessels(image: torch.Tensor, window: int, dark_vessels: bool = True) -> torch.Tensor:
    """Grey-level closing (dark vessels) or opening (bright ones) of ``(B, C, H, W)`` with a square ``window``."""
    pad = window // 2

    def dilate(x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.pad(x, [pad] * 4, mode="replicate"), window, stride=1)

    def erode(x: torch.Tensor) -> torch.Tensor:
        return -dilate(-x)

    return erode(dilate(image)) if dark_vessels else dilate(erode(image))


def frangi_segmentation(image: np.ndarray, fov: np.ndarray | None = None, dark_vessels: bool = True,
                        sigmas: tuple[float, ...] = (1.0, 2.0, 3.0)) -> tuple[np.ndarray, np.ndarray]:
    """Frangi vesselness of a 2D image and its Otsu threshold inside the field of view.

    Otsu runs on the square root of the response: the raw response is so heavy-tailed that
    Otsu keeps only the widest vessels (on DRIVE image 21: Dice 0.21 raw vs 0.62).

    Returns:
        (vesselness in [0, 1], zero outside the FOV; binary vessel mask).
    """
    from skimage.filters import frangi, threshold_otsu

    fov = np.ones(image.shape, dtype=bool) if fov is None else fov.astype(bool)
    vesselness = frangi(image.astype(np.float64), sigmas=sigmas, black_ridges=dark_vessels)
    # the FOV rim is a strong ridge of its own: keep the response of the interior only
    inner = ndimage.binary_erosion(fov, iterations=int(2 * max(sigmas)))
    vesselness = np.where(inner, vesselness, 0.0)
    vesselness = vesselness / max(float(vesselness.max()), 1e-12)
    root = np.sqrt(vesselness)
    return vesselness, (root > threshold_otsu(root[inner])) & inner
