"""Procedural 3D demo dataset and the ``imgx3d demo`` job.

Each volume holds three labelled structures that differ in shape, texture and contrast:
1 ``blob``: a bright, smooth ellipsoid; 2 ``tube``: a dark curved tube; 3 ``box``: a rotated
box with a grainy texture at nearly background brightness (texture, not contrast, tells it
apart). On top: a smooth textured background, a multiplicative bias field and noise. The
grid is anisotropic (1 × 1 × 1.5 mm) and stored LPS-oriented, so the demo exercises the same
geometry path as clinical data.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.spatial import cKDTree

from imgx3d.files import atomic_write, atomic_write_text

DEMO_LABELS = {0: "background", 1: "blob", 2: "tube", 3: "box"}
DEMO_SHAPE = (48, 48, 32)
DEMO_AFFINE = np.array([[-1.0, 0, 0, 24.0], [0, -1.0, 0, 24.0], [0, 0, 1.5, -24.0], [0, 0, 0, 1]])


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def make_case(rng: np.random.Generator, shape: tuple[int, int, int] = DEMO_SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic (image, label) pair in voxel coordinates (z voxels are 1.5× longer)."""
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), -1)
    grid[..., 2] *= 1.5  # physical mm, so shapes are round in world space
    extent = np.array(shape) * np.array([1, 1, 1.5])
    label = np.zeros(shape, np.uint8)
    image = gaussian_filter(rng.normal(size=shape), 3.0) * 4.0  # smooth tissue texture

    def centre(margin: float) -> np.ndarray:
        return rng.uniform(margin, extent - margin)

    # 2: a tube along a random sine-bent curve
    c, radius = centre(12), rng.uniform(2.0, 3.0)
    direction = _rotation(rng)[:, 0]
    t = np.linspace(-14, 14, 120)
    bend = _rotation(rng)[:, 1] * (4 * np.sin(t / 6 + rng.uniform(0, 6)))[:, None]
    curve = c + t[:, None] * direction + bend
    dist, _ = cKDTree(curve).query(grid.reshape(-1, 3))
    tube = (dist.reshape(shape) < radius)
    # 3: a rotated box, grainy texture
    c, half = centre(10), rng.uniform(4, 7, size=3)
    local = np.abs((grid - c) @ _rotation(rng))
    box = np.all(local < half, axis=-1)
    # 1: an ellipsoid, bright
    c, axes = centre(10), rng.uniform(4, 8, size=3)
    local = ((grid - c) @ _rotation(rng)) / axes
    blob = (local ** 2).sum(-1) < 1
    label[box] = 3
    label[tube] = 2
    label[blob] = 1
    image = image + 6.0 * blob
    grain = rng.normal(size=shape) * 3.0
    image = np.where(label == 3, image + grain + 1.0, image)
    image = np.where(label == 2, image - 5.0, image)
    coords = grid / extent - 0.5
    bias = np.exp(0.3 * (coords @ rng.normal(size=3)) + 0.2 * rng.normal() * (coords ** 2).sum(-1))
    image = (image + 20.0) * bias + rng.normal(scale=1.0, size=shape)
    return (image * 10.0).astype(np.float32), label


def write_demo_dataset(root: Path, n_cases: int, seed: int = 0) -> Path:
    """Write an MSD-style dataset (imagesTr/, labelsTr/, dataset.json) of ``n_cases`` volumes."""
    root = Path(root)
    if (root / "dataset.json").exists() and len(list((root / "imagesTr").glob("*.nii.gz"))) == n_cases:
        return root
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    training = []
    for i in range(n_cases):
        image, label = make_case(rng)
        name = f"demo_{i:03d}.nii.gz"
        for folder, array in (("imagesTr", image), ("labelsTr", label)):
            img = nib.Nifti1Image(array, DEMO_AFFINE)
            img.set_qform(DEMO_AFFINE, code=1)
            img.set_sform(DEMO_AFFINE, code=1)
            atomic_write(root / folder / name, lambda tmp, img=img: nib.save(img, str(tmp)))
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = {"name": "imgx3d-demo", "description": "procedural volumes: blob, tube, box", "tensorImageSize": "3D",
            "modality": {"0": "MRI"}, "labels": {str(k): v for k, v in DEMO_LABELS.items()},
            "numTraining": n_cases, "training": training}
    atomic_write_text(root / "dataset.json", json.dumps(meta, indent=1))
    return root
