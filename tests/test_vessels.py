"""Label-free vessel inputs: fractal vessel masks and vessel-free backgrounds."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from imgx3d.data.vessels import fractal_vessels, remove_vessels


def test_fractal_vessels_are_thin_connected_trees_that_depend_on_the_seed():
    masks = [fractal_vessels((128, 160), np.random.default_rng(s), trees=1) for s in (0, 0, 1)]
    assert masks[0].shape == (128, 160) and masks[0].dtype == bool
    assert np.array_equal(masks[0], masks[1]) and not np.array_equal(masks[0], masks[2])
    for mask in masks:
        assert 0.005 < mask.mean() < 0.25, "vessels cover a small part of the image"
        labelled, _ = ndimage.label(mask, structure=np.ones((3, 3)))
        assert np.bincount(labelled.ravel())[1:].max() > 0.9 * mask.sum(), "one tree: one connected component"
        # thin: eroding by the widest vessel's half-width leaves little
        assert ndimage.binary_erosion(mask, iterations=4).sum() < 0.1 * mask.sum()
    touches_border = [m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any() for m in masks]
    assert all(touches_border), "trees enter from the image border"


def test_closing_removes_dark_thin_vessels_and_keeps_large_structures():
    y, x = np.mgrid[0:96, 0:96]
    background = 0.6 + 0.3 * np.exp(-((y - 40) ** 2 + (x - 50) ** 2) / 400)  # a bright disc, vignetting-like
    vessels = fractal_vessels((96, 96), np.random.default_rng(2), trees=2, width=(2.0, 4.0))
    image = torch.from_numpy(np.where(vessels, background - 0.4, background)).float()[None, None]
    cleaned = remove_vessels(image, window=7)[0, 0].numpy()
    assert np.abs(cleaned - background)[vessels].mean() < 0.1 * 0.4, "vessel pixels take the surrounding value"
    assert np.abs(cleaned - background)[~vessels].mean() < 0.02, "the rest is (nearly) unchanged"
    bright = torch.from_numpy(np.where(vessels, background + 0.4, background)).float()[None, None]
    assert np.abs(remove_vessels(bright, 7, dark_vessels=False)[0, 0].numpy() - background)[vessels].mean() < 0.04
