"""DBT volumes: NIfTI and multi-frame DICOM, air cropping, breast normalisation, lesion slices,
and predictions mapped back to the native grid.

No real tomosynthesis data exists in ../shared/data: every test here uses a DBT-shaped volume
generated below (a half-elliptic breast against the detector, fibroglandular texture, one
mass spanning a few slices, air around it), which is a geometry and pipeline check, not a
claim about real DBT accuracy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.ndimage import gaussian_filter

from imgx3d.config import load_config
from imgx3d.data.geometry import grid_map, image_to_model, label_to_model, to_native
from imgx3d.data.io import read_volume
from imgx3d.data.slices import slice_pool
from tests.conftest import save_nifti

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GIT_PYTHON_REFRESH": "quiet"}
SPACING = (0.2, 0.2, 1.0)


def dbt_volume(rng: np.random.Generator, shape=(72, 88, 10)) -> tuple[np.ndarray, np.ndarray]:
    """A DBT-shaped uint16 volume and its mass label: breast against the chest wall at x = 0."""
    x, y, z = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    cx, cy = 0.0, shape[1] / 2
    breast = ((x - cx) / (0.75 * shape[0])) ** 2 + ((y - cy) / (0.42 * shape[1])) ** 2 <= 1
    texture = gaussian_filter(rng.normal(size=shape), sigma=(3, 3, 1))
    image = np.where(breast, 1200 + 900 * texture / texture.std(), 40.0)
    centre = (shape[0] * 0.35 + rng.uniform(-3, 3), cy + rng.uniform(-5, 5), shape[2] / 2)
    mass = (((x - centre[0]) / 7) ** 2 + ((y - centre[1]) / 6) ** 2 + ((z - centre[2]) / 2.2) ** 2 <= 1) & breast
    image = image + 1500 * mass + rng.normal(0, 10, size=shape)
    return np.clip(image, 0, 65535).astype(np.uint16), mass.astype(np.uint8)


def write_multiframe_dicom(image: np.ndarray, path: Path) -> None:
    """One multi-frame DICOM file, as DBT systems write them (SimpleITK / GDCM)."""
    itk = sitk.GetImageFromArray(np.ascontiguousarray(image.transpose(2, 1, 0)))
    itk.SetSpacing(SPACING)
    sitk.WriteImage(itk, str(path))


@pytest.fixture
def dbt_dataset(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "dbt"
    training = []
    for i in range(6):
        image, label = dbt_volume(rng)
        affine = np.diag([*SPACING, 1.0])
        save_nifti(root / "imagesTr" / f"dbt_{i}.nii.gz", image, affine)
        save_nifti(root / "labelsTr" / f"dbt_{i}.nii.gz", label, affine)
        training.append({"image": f"./imagesTr/dbt_{i}.nii.gz", "label": f"./labelsTr/dbt_{i}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "mass"},
                                                   "modality": {"0": "DBT"}, "training": training}))
    return root


def test_multiframe_dicom_reads_as_the_same_volume_as_nifti(tmp_path):
    image, _ = dbt_volume(np.random.default_rng(1))
    save_nifti(tmp_path / "v.nii.gz", image, np.diag([*SPACING, 1.0]))
    write_multiframe_dicom(image, tmp_path / "v.dcm")
    from_dicom, from_nifti = read_volume(tmp_path / "v.dcm"), read_volume(tmp_path / "v.nii.gz")
    assert from_dicom.spatial_shape == image.shape
    np.testing.assert_allclose(from_dicom.spacing, SPACING, rtol=1e-5)
    # DICOM is LPS: its volume is the NIfTI one with x and y mirrored in world space, same voxels
    assert np.array_equal(np.asarray(from_dicom.array), np.asarray(from_nifti.array))


def test_dbt_preset_crops_air_normalises_the_breast_and_maps_back_exactly():
    image, label = dbt_volume(np.random.default_rng(2))
    cfg = load_config(CONFIGS / "dbt" / "pig.yaml").data
    from imgx3d.data.io import Volume

    ref = Volume(image[None].astype(np.float32), np.diag([*SPACING, 1.0]))
    grid = grid_map(ref, cfg)
    assert grid.crop is not None
    breast_x = np.flatnonzero((image > 500).any(axis=(1, 2)))
    breast_y = np.flatnonzero((image > 500).any(axis=(0, 2)))
    (x0, x1), (y0, y1), (z0, z1) = grid.crop
    assert x0 == 0 and x1 >= breast_x.max() + 1 and x1 < image.shape[0], "air beyond the nipple is cut"
    assert y0 > 0 and y1 < image.shape[1] and y0 <= breast_y.min() and y1 >= breast_y.max() + 1
    assert (z0, z1) == (0, image.shape[2])
    model = image_to_model(image[None], grid, cfg)
    assert tuple(model.shape[1:]) == grid.model_shape == grid.cropped_shape
    assert float(model.min()) == 0.0 and float(model.max()) == 1.0
    breast = model[0][torch.from_numpy(image[x0:x1, y0:y1] > 500)]
    assert 0.1 < float(breast.median()) < 0.9, "breast percentiles, not air, set the scale"

    model_label = label_to_model(label, grid)
    back = to_native(model_label, grid)[0].numpy()
    assert back.shape == label.shape and np.array_equal(back, label)
    probs = torch.stack([1 - model_label[0].float(), model_label[0].float()])
    native = to_native(probs, grid)
    assert torch.allclose(native.sum(0), torch.ones(label.shape)), "outside the crop: background probability 1"
    pool = slice_pool([model_label], axis=2, keep_empty=0.0, seed=0)
    assert {s for _, s in pool} == set(np.flatnonzero(label.any(axis=(0, 1))).tolist()), "lesion slices only"


def _cli(*argv: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "imgx3d", *argv], env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc


SMALL = ["data.slices.size=[32,32]", "data.batch_size=4", "data.num_workers=0", "data.split.test_fraction=0.2",
         "data.split.val_fraction=0.2", "train.max_steps=4", "train.val_every=2", "train.warmup_steps=0"]


def test_dbt_pig_and_segmenter_run_end_to_end_on_native_grids(dbt_dataset, tmp_path):
    pig = ["method.channels=[8,16]", "method.attention_levels=[false,false]", "method.num_res_blocks=1",
           "method.norm_groups=8", "method.num_head_channels=8", "method.val_steps=2",  # latent space, as configured:
           "method.codec.widths=[8,16]", "method.codec.norm_groups=4", "method.codec.layers_per_block=1",
           "method.codec_steps=1", "method.stage1_steps=2"]
    _cli("train", "--config", str(CONFIGS / "dbt" / "pig.yaml"), "--data", str(dbt_dataset), "--run-dir",
         str(tmp_path / "pig"), "--no-track", *pig, *SMALL)
    _cli("synth", "--run", str(tmp_path / "pig"), "--n", "2", "--batch", "2", "--steps", "3", "--output",
         str(tmp_path / "synth"))
    pair = nib.load(str(tmp_path / "synth" / "imagesTr" / "synth_00000.nii.gz"))
    assert pair.shape == (32, 32, 1)
    crop = grid_map(read_volume(dbt_dataset / "imagesTr" / "dbt_0.nii.gz"),
                    load_config(CONFIGS / "dbt" / "pig.yaml").data).cropped_shape
    # the slices' pixels: the cropped breast box over 32 pixels (median over the training volumes)
    assert abs(pair.affine[0, 0] - SPACING[0] * crop[0] / 32) < 0.05 and pair.affine[2, 2] == pytest.approx(1.0)

    _cli("train", "--config", str(CONFIGS / "dbt" / "pig.yaml"), "--data", str(dbt_dataset), "--run-dir",
         str(tmp_path / "seg"), "--no-track", "--method", "unet", "method.spatial_dims=2", "method.channels=[8,16]",
         "method.strides=[2]", "method.num_res_units=0", *SMALL)
    image, _ = dbt_volume(np.random.default_rng(9))
    write_multiframe_dicom(image, tmp_path / "new.dcm")
    _cli("predict", "--run", str(tmp_path / "seg"), "--input", str(tmp_path / "new.dcm"), "--output",
         str(tmp_path / "pred"), "--probabilities")
    out = nib.load(str(tmp_path / "pred" / "new.nii.gz"))
    source = read_volume(tmp_path / "new.dcm")
    assert out.shape == image.shape and np.allclose(out.affine, source.affine, atol=1e-5)
    pred = np.asarray(out.dataobj)
    above = image > image.min() + 0.05 * (float(image.max()) - image.min())  # the dbt preset's air threshold
    box = np.zeros_like(above)
    box[tuple(slice(max(int(i.min()) - 4, 0), int(i.max()) + 5) for i in np.nonzero(above))] = True
    assert box.sum() < 0.9 * box.size and not pred[~box].any(), "outside the breast box the prediction is background"
    # ... because the crop put it there, not because the model predicts background everywhere: the
    # padded-back region is background with probability exactly 1, the box holds the model's softmax
    background = np.asarray(nib.load(str(tmp_path / "pred" / "new_probabilities.nii.gz")).dataobj)[..., 0]
    assert background.shape == image.shape and np.all(background[~box] == 1.0)
    assert np.mean(background[box] < 1.0) > 0.99, "inside the box every voxel is the model's own estimate"
