"""The slice adapter: volumes to 2D slices and back, exactly on the native grid."""

from dataclasses import dataclass

import nibabel as nib
import numpy as np
import pytest
import torch

from imgx3d.config import Config, DataConfig, SliceConfig
from imgx3d.data.geometry import slices_to_volume, to_slice_range, volume_to_slices
from imgx3d.data.slices import SliceBatches, slice_pool
from imgx3d.errors import ConfigError
from imgx3d.inference.folder import predict_to_folder
from imgx3d.inference.predictor import InferSettings, Predictor
from imgx3d.methods.base import Method
from tests.conftest import save_nifti
from tests.test_geometry import GRIDS, _pattern


@dataclass
class _NoConfig:
    pass


class SliceThreshold(Method):
    """A 2D method: class 1 where the slice (mapped to [-1, 1]) is > 0; records what it saw."""

    name = "test-slice-threshold"
    spatial_dims = 2
    Config = _NoConfig
    seen: list = []

    def predict(self, image, window):
        self.seen.append(tuple(image.shape))
        return window(lambda x: torch.cat([(x[:, :1] <= 0).float(), (x[:, :1] > 0).float()], 1), image)


def test_slices_run_on_the_methods_device_and_come_back_to_the_volumes():
    """On CUDA the volume is on the host and the method on the GPU: each batch of slices must move
    (found by gpu_check: SDSeg and DARL failed on CUDA). The meta device stands in for the GPU."""
    from imgx3d.inference.windows import predict_by_slices

    class OnMeta(SliceThreshold):
        def __init__(self):
            super().__init__(_NoConfig(), 2, 1)
            self.weight = torch.nn.Parameter(torch.zeros(1, device="meta"))
            self.devices = []

        def predict(self, image, window):
            self.devices.append(image.device.type)
            return torch.zeros(image.shape[0], 2, *image.shape[2:], device="cpu" if image.is_meta else "cuda")

    method = OnMeta()
    out = predict_by_slices(method, torch.randn(1, 1, 8, 9, 5), SliceConfig(axis=2, size=[8, 9], predict_batch=2))
    assert method.devices == ["meta"] * 3 and out.device.type == "cpu" and out.shape == (1, 2, 8, 9, 5)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("grid", ["LPS", "PIR", "oblique"])
def test_slice_and_restack_is_exact_on_the_native_grid(tmp_path, grid, axis):
    image = _pattern((13, 10, 7))
    src = save_nifti(tmp_path / "in" / "v.nii.gz", image, GRIDS[grid])
    slices = SliceConfig(axis=axis, size=[24, 32], predict_batch=4)
    cfg = Config(data=DataConfig(preset="none", slices=slices))
    method = SliceThreshold(_NoConfig(), 2, 1)
    method.seen = []
    predictor = Predictor(method, cfg, {0: "background", 1: "fg"}, InferSettings.from_config(cfg.infer, device="cpu"))
    (out,) = predict_to_folder(predictor,
                               [src], tmp_path / "out")
    written = nib.load(str(out))
    assert written.shape == image.shape
    np.testing.assert_allclose(written.affine, GRIDS[grid], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(written.dataobj), image > 0.5)
    assert all(shape[1:] == (1, 24, 32) and shape[0] <= 4 for shape in method.seen)


def test_label_slices_round_trip_and_probabilities_go_back_bilinearly_when_upsampling():
    label = torch.from_numpy(np.random.default_rng(0).integers(0, 3, (1, 9, 11, 5)))
    for axis in range(3):
        plane = [s for a, s in enumerate(label.shape[1:]) if a != axis]
        up = volume_to_slices(label, axis, [2 * plane[0] + 1, 3 * plane[1]], label=True)
        assert up.dtype == label.dtype
        assert torch.equal(slices_to_volume(up, axis, label.shape[1:]), label)
    probs = torch.rand(5, 2, 4, 4)  # the method ran coarser than the volume: interpolated back
    back = slices_to_volume(probs, 2, (8, 8, 5))
    assert back.shape == (2, 8, 8, 5) and back.min() >= probs.min() and back.max() <= probs.max()
    assert len(torch.unique(back)) > len(torch.unique(probs))


def test_intensities_map_per_channel_to_minus_one_one():
    image = torch.stack([torch.linspace(0, 100, 1000), torch.linspace(-5, 5, 1000)]).reshape(2, 10, 10, 10)
    mapped = to_slice_range(image, [0, 100])
    assert mapped.min() == -1 and mapped.max() == 1
    torch.testing.assert_close(mapped[0], mapped[1])
    clipped = to_slice_range(image, [10, 90])
    assert (clipped == 1).float().mean() == pytest.approx(0.1, abs=0.01)


def test_training_slices_keep_every_foreground_slice_and_a_fraction_of_empty_ones():
    label = torch.zeros(1, 4, 4, 200, dtype=torch.uint8)
    label[0, 1, 1, 50:60] = 1
    pool = slice_pool([label], axis=2, keep_empty=0.25, seed=0)
    kept = {s for _, s in pool}
    assert set(range(50, 60)) <= kept
    assert 0.15 < (len(kept) - 10) / 190 < 0.35
    assert slice_pool([label], 2, 0.25, 0) == pool and slice_pool([label], 2, 0.25, 1) != pool
    assert {s for _, s in slice_pool([label], axis=2, keep_empty=0.0, seed=0)} == set(range(50, 60))


def test_slice_batches_are_a_function_of_seed_and_step():
    rng = np.random.default_rng(0)
    items = [{"image": torch.from_numpy(rng.normal(size=(1, 12, 10, 6)).astype(np.float32)),
              "label": torch.from_numpy((rng.random((1, 12, 10, 6)) > 0.7).astype(np.uint8))} for _ in range(3)]
    cfg = SliceConfig(axis=2, size=[16, 16])
    batches = SliceBatches(items, cfg, flip_axes=[0, 2], batch_size=4, seed=3, start_step=0, stop_step=10)
    a, b = batches.batch(5), SliceBatches(items, cfg, [0, 2], 4, 3, 0, 10).batch(5)
    assert a["image"].shape == (4, 1, 16, 16) and a["label"].shape == (4, 1, 16, 16)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert not torch.equal(a["image"], batches.batch(6)["image"])
    assert a["image"].min() >= -1 and a["image"].max() <= 1
    assert set(torch.unique(a["label"]).tolist()) <= {0, 1}
    empty = [{"image": items[0]["image"], "label": torch.zeros_like(items[0]["label"])}]
    with pytest.raises(ConfigError, match="keep_empty"):
        SliceBatches(empty, SliceConfig(keep_empty=0.0), [], 2, 0, 0, 1)
