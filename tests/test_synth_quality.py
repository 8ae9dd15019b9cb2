"""Generation quality: Fréchet distance, KID, Inception features from a local TorchScript file
(a small one written here), and segmenter bottleneck features."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from imgx3d.errors import CheckpointError
from imgx3d.methods.base import build_method
from imgx3d.synthesis.quality import (
    extract,
    frechet_distance,
    inception_features,
    kernel_distance,
    segmenter_features,
)


def test_frechet_distance_of_shifted_gaussians_is_the_squared_mean_shift():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(20000, 4, generator=g, dtype=torch.float64)
    shifted = real + torch.tensor([1.0, 2.0, 0.0, 0.0], dtype=torch.float64)  # same covariance
    assert frechet_distance(shifted, real) == pytest.approx(5.0, rel=1e-3)
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-6)


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(400, 8, generator=g), torch.randn(400, 8, generator=g)
    same, _ = kernel_distance(a, b, subsets=20, subset_size=200)
    shifted, _ = kernel_distance(a + 1.0, b, subsets=20, subset_size=200)
    assert abs(same) < 0.05 and shifted > 10 * abs(same) and shifted > 0.1


class Probe(nn.Module):
    """Stands in for Inception: reports what it was fed (size, value range) as 'features'."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x.new_full((x.shape[0],), float(x.shape[1])), x.new_full((x.shape[0],), float(x.shape[2])),
                            x.amin(dim=(1, 2, 3)), x.amax(dim=(1, 2, 3))], 1)


def test_inception_features_load_a_local_torchscript_file_and_feed_it_299px_rgb_in_0_255(tmp_path):
    path = tmp_path / "inception.pt"
    torch.jit.script(Probe()).save(str(path))
    features = inception_features(path)
    slices = torch.linspace(-1, 1, 2 * 32 * 32).reshape(2, 1, 32, 32)
    out = extract(features, slices, batch=1)
    assert out.shape == (2, 4)
    assert out[:, 0].eq(3).all() and out[:, 1].eq(299).all()
    assert out[:, 2].min() >= -1e-3 and out[:, 3].max() <= 255 + 1e-3 and out[1, 3] == pytest.approx(255, abs=1e-3)
    with pytest.raises(CheckpointError, match="nothing is downloaded"):
        inception_features(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a module")
    with pytest.raises(CheckpointError, match="not a TorchScript module"):
        inception_features(tmp_path / "junk.pt")


def test_segmenter_features_are_the_pooled_unet_bottleneck():
    torch.manual_seed(0)
    method = build_method({"name": "unet", "spatial_dims": 2, "channels": [4, 8, 16], "strides": [2, 2],
                           "num_res_units": 0}, 3, 1)
    features = segmenter_features(method)
    x = torch.randn(5, 1, 32, 32)
    out = features(x)
    assert out.shape == (5, 16), "16 channels at the bottom of a [4, 8, 16] U-Net"
    assert not torch.allclose(out[0], out[1]), "features depend on the input"
    torch.testing.assert_close(features(x), out)
