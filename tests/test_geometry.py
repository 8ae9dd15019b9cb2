"""Predictions land exactly on the input's grid: shape, affine (1e-5), header codes, and content."""

from dataclasses import dataclass

import nibabel as nib
import numpy as np
import pytest
import torch

from imgx3d.config import Config, DataConfig
from imgx3d.data.io import read_volume
from imgx3d.inference.folder import predict_to_folder
from imgx3d.inference.predictor import InferSettings, Predictor
from imgx3d.methods.base import Method
from tests.conftest import oblique_affine, save_nifti
from tests.test_io import write_dicom_series


@dataclass
class _NoConfig:
    pass


class ThresholdMethod(Method):
    """Class 1 wherever the (un-normalised) image is > 0.5: the truth is known exactly."""

    name = "test-threshold"
    spatial_dims = 3
    Config = _NoConfig

    def predict(self, image, window):
        return window(lambda x: torch.cat([(x[:, :1] <= 0.5).float(), (x[:, :1] > 0.5).float()], 1), image)


class SliceThresholdMethod(ThresholdMethod):
    """The same rule, per slice through the slice adapter (which maps each volume to [-1, 1])."""

    name = "test-slice-threshold"
    spatial_dims = 2

    def predict(self, image, window):
        return window(lambda x: torch.cat([(x[:, :1] <= 0.0).float(), (x[:, :1] > 0.0).float()], 1), image)


METHODS = {"3d": ThresholdMethod, "2d-per-slice": SliceThresholdMethod}


def _predictor(spacing=None, kind: str = "3d") -> Predictor:
    cfg = Config(data=DataConfig(preset="none", spacing=spacing, patch_size=[8, 8, 8]))
    return Predictor(METHODS[kind](_NoConfig(), 2, 1), cfg, {0: "background", 1: "fg"},
                     InferSettings.from_config(cfg.infer, device="cpu"))


def _pattern(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.random(tuple(max(1, s // 3) for s in shape)) > 0.5
    return np.kron(coarse, np.ones((3, 3, 3)))[: shape[0], : shape[1], : shape[2]].astype(np.float32)


GRIDS = {
    "RAS": np.diag([1.0, 1.0, 1.0, 1.0]),
    "LPS": np.diag([-0.9, -0.9, 2.5, 1.0]),
    "PIR": np.array([[0, 0, -1.2, 30.0], [-0.8, 0, 0, 10.0], [0, -2.0, 0, -4.0], [0, 0, 0, 1]]),
    "oblique": oblique_affine(),
    "anisotropic": np.diag([0.5, 0.7, 4.0, 1.0]),
    "one-slice": np.diag([0.8, -0.8, 3.0, 1.0]),
}


@pytest.mark.parametrize("kind", list(METHODS))
@pytest.mark.parametrize("name", list(GRIDS))
def test_round_trip_nifti(tmp_path, name, kind):
    shape = (12, 9, 1) if name == "one-slice" else (13, 10, 7)
    image = _pattern((12, 9, 3))[:, :, :1] if name == "one-slice" else _pattern(shape)
    src = save_nifti(tmp_path / "in" / f"{name}.nii.gz", image, GRIDS[name])
    (out,) = predict_to_folder(_predictor(kind=kind), [src], tmp_path / "out")
    written, original = nib.load(str(out)), nib.load(str(src))
    assert written.shape == original.shape
    np.testing.assert_allclose(written.affine, original.affine, atol=1e-5)
    assert int(written.header["qform_code"]) == int(original.header["qform_code"])
    assert int(written.header["sform_code"]) == int(original.header["sform_code"])
    np.testing.assert_array_equal(np.asarray(written.dataobj), image > 0.5)


def test_round_trip_with_resampling_keeps_grid_and_content(tmp_path):
    image = _pattern((24, 24, 8))
    src = save_nifti(tmp_path / "in" / "v.nii.gz", image, GRIDS["LPS"])
    (out,) = predict_to_folder(_predictor(spacing=[1.5, 1.5, 1.5]), [src], tmp_path / "out")
    written = nib.load(str(out))
    assert written.shape == image.shape
    np.testing.assert_allclose(written.affine, GRIDS["LPS"], atol=1e-5)
    assert (np.asarray(written.dataobj) == (image > 0.5)).mean() > 0.9


@pytest.mark.parametrize("kind", list(METHODS))
def test_round_trip_dicom_series(tmp_path, kind):
    image = (_pattern((10, 9, 6)) * 100).astype(np.int16)
    folder = write_dicom_series(tmp_path / "in" / "ct_series", image)
    (out,) = predict_to_folder(_predictor(kind=kind), [folder], tmp_path / "out")
    written, source = nib.load(str(out)), read_volume(folder)
    assert out.name == "ct_series.nii.gz" and written.shape == image.shape
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(written.dataobj), image > 0.5)
