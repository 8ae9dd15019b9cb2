"""Memory-bounded sliding window: the same label maps as MONAI's full-volume sliding window."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet

from imgx3d.config import Config, DataConfig, InferConfig
from imgx3d.inference.predictor import InferSettings, Predictor
from imgx3d.inference.windows import streaming_argmax
from imgx3d.methods.unet import UNetConfig, UNetMethod
from tests.conftest import save_nifti


@pytest.mark.parametrize("shape, roi, overlap, batch", [
    ((40, 36, 50), (16, 16, 16), 0.25, 3),
    ((20, 30, 9), (16, 16, 16), 0.5, 2),   # thinner than the window: padded like MONAI
    ((33, 17, 40), (32, 16, 24), 0.5, 1),
    ((24, 24, 24), (24, 24, 24), 0.5, 4),  # one window
])
def test_streaming_argmax_equals_monai_sliding_window(shape, roi, overlap, batch):
    torch.manual_seed(0)
    net = UNet(3, 2, 6, channels=[8, 16, 32], strides=[2, 2], num_res_units=0).eval()

    def fn(x):
        return torch.softmax(net(x), 1)

    x = torch.randn(1, 2, *shape)
    with torch.no_grad():
        reference = sliding_window_inference(x, roi, batch, fn, overlap=overlap, mode="gaussian")[0].max(0).indices
        streamed = streaming_argmax(fn, x, roi, batch, overlap)
    assert streamed.dtype == torch.uint8 and streamed.shape == shape
    assert torch.equal(streamed.long(), reference)


def _predictor(streaming: str) -> Predictor:
    torch.manual_seed(0)
    method = UNetMethod(UNetConfig(channels=[4, 8, 16], strides=[2, 2], num_res_units=0), 3, 1).eval()
    cfg = Config(data=DataConfig(preset="none", patch_size=[16, 16, 16]), infer=InferConfig(streaming=streaming))
    return Predictor(method, cfg, {0: "background", 1: "a", 2: "b"}, InferSettings.from_config(cfg.infer, device="cpu"))


def test_predictor_streams_large_volumes_with_the_same_labels(tmp_path):
    affine = np.array([[0, 0, -1.5, 10.0], [-0.8, 0, 0, 5.0], [0, -0.9, 0, 1.0], [0, 0, 0, 1]])  # PIR
    path = save_nifti(tmp_path / "v.nii.gz", np.random.default_rng(0).normal(size=(30, 26, 21)).astype(np.float32),
                      affine)
    on, off = _predictor("on"), _predictor("off")
    assert on._streams(torch.zeros(1, 30, 26, 21)) and not off._streams(torch.zeros(1, 30, 26, 21))
    streamed = on.predict_files([path]).labels.array
    full = off.predict_files([path]).labels.array
    assert streamed.shape == full.shape == (30, 26, 21)
    np.testing.assert_array_equal(streamed, full)
    auto = _predictor("auto")
    assert not auto._streams(torch.zeros(1, 30, 26, 21))  # 3 x 16k voxels: far below 1 GiB
    lower = Predictor(auto.method, auto.config, auto.labels, dataclasses.replace(auto.settings, streaming_above_gib=1e-4))
    assert lower._streams(torch.zeros(1, 30, 26, 21))
