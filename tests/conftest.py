"""Shared fixtures: tiny synthetic volumes, the real-data folder, an isolated working directory."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path, monkeypatch):
    """Every test runs in its own folder, so mlflow.db and runs/ never land in the repo."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_PYTHON_REFRESH", "quiet")


@pytest.fixture
def shared_data() -> Path:
    """../shared/data; skipped when absent, a failure when IMGX3D_REQUIRE_DATA=1 (CI)."""
    if not SHARED_DATA.is_dir():
        message = f"real data folder {SHARED_DATA} is absent"
        if os.environ.get("IMGX3D_REQUIRE_DATA") == "1":
            pytest.fail(message + " but IMGX3D_REQUIRE_DATA=1")
        pytest.skip(message)
    return SHARED_DATA


def save_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """Write a NIfTI with qform and sform set to ``affine``."""
    affine = np.eye(4) if affine is None else affine
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def blob_case(rng: np.random.Generator, shape=(20, 24, 16)) -> tuple[np.ndarray, np.ndarray]:
    """A bright sphere (label 1) and a dark cube (label 2) in noise."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    centre = rng.uniform(6, np.array(shape) - 6)
    label = np.zeros(shape, np.uint8)
    label[np.linalg.norm(grid - centre, axis=-1) < 4] = 1
    corner = rng.integers(1, np.array(shape) - 6)
    box = tuple(slice(c, c + 4) for c in corner)
    label[box] = np.where(label[box] == 0, 2, label[box])
    image = rng.normal(0, 0.3, shape) + 2.0 * (label == 1) - 2.0 * (label == 2) + 5.0
    return image.astype(np.float32), label


@pytest.fixture
def msd_dataset(tmp_path) -> Path:
    """A tiny MSD-style dataset of 8 blob volumes with an anisotropic, LPS affine."""
    return write_msd_dataset(tmp_path / "msd")


def write_msd_dataset(root: Path) -> Path:
    """Write the 8-case MSD-style blob dataset of :func:`msd_dataset` to ``root``."""
    affine = np.diag([-1.0, -1.0, 1.5, 1.0])
    rng = np.random.default_rng(0)
    training = []
    for i in range(8):
        image, label = blob_case(rng)
        save_nifti(root / "imagesTr" / f"case_{i}.nii.gz", image, affine)
        save_nifti(root / "labelsTr" / f"case_{i}.nii.gz", label, affine)
        training.append({"image": f"./imagesTr/case_{i}.nii.gz", "label": f"./labelsTr/case_{i}.nii.gz"})
    import json

    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "sphere", "2": "cube"},
                                                   "modality": {"0": "MRI"}, "training": training}))
    return root


TINY_OVERRIDES = [
    "method.channels=[4,8,16]", "method.strides=[2,2]", "method.num_res_units=0",
    "data.patch_size=[16,16,16]", "data.batch_size=2", "data.num_workers=0",
    "data.split.test_fraction=0.25", "data.split.val_fraction=0.2",
    "train.max_steps=6", "train.val_every=3", "train.checkpoint_every=3", "train.warmup_steps=0",
    "infer.sw_batch_size=2",
]


def train_tiny_unet(root: Path) -> tuple[Path, Path]:
    """Train the tiny U-Net (``TINY_OVERRIDES``) on the blob dataset under ``root``: (run folder, dataset)."""
    from imgx3d.cli import main

    data = write_msd_dataset(root / "msd")
    config = root / "cfg.yaml"
    config.write_text("method: {name: unet}\n")
    assert main(["train", "--no-track", "--config", str(config), "--data", str(data), "--run-dir", str(root / "run"),
                 *TINY_OVERRIDES]) == 0
    return root / "run", data


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file below ``folder`` (to prove inputs are untouched)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def oblique_affine() -> np.ndarray:
    """Axes rotated 20° about z and 12° about x (orthogonal, as scanners write them), anisotropic."""
    a, b = np.radians(20), np.radians(12)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag([0.9, 1.1, 2.4])
    affine[:3, 3] = [10.0, -5.0, 3.0]
    return affine
