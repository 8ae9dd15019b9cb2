"""The CPU weight layout at prediction: measured on the prediction's own calls (``infer.cpu_layout``)."""

from __future__ import annotations

import time

import pytest
import torch

from imgx3d.config import load_config
from imgx3d.errors import ConfigError
from imgx3d.inference.predictor import Predictor
from imgx3d.methods.base import build_method
from imgx3d.resources import CpuLayoutTuner

LABELS = {0: "background", 1: "a", 2: "b"}


class LayoutSensitiveConv(torch.nn.Conv3d):
    """A convolution that takes ``slow_s`` longer when its weight has the layout ``slow_when_channels_last``
    names, and records the layout of every call."""

    def __init__(self, slow_when_channels_last: bool, slow_s: float = 0.03):
        super().__init__(2, 3, 3, padding=1)
        self.slow_when_channels_last, self.slow_s = slow_when_channels_last, slow_s
        self.layouts: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels_last = self.weight.is_contiguous(memory_format=torch.channels_last_3d)
        self.layouts.append(channels_last)
        if channels_last == self.slow_when_channels_last:
            time.sleep(self.slow_s)
        return super().forward(x)


@pytest.mark.parametrize("slow_when_channels_last", [True, False])
def test_the_tuner_keeps_the_layout_that_ran_faster_and_every_output_is_the_networks(slow_when_channels_last):
    net = LayoutSensitiveConv(slow_when_channels_last)
    tuner = CpuLayoutTuner(net, rounds=2)
    x = torch.randn(2, 2, 6, 6, 6)
    reference = torch.nn.functional.conv3d(x, net.weight.detach().contiguous(), net.bias.detach(), padding=1)
    with torch.inference_mode():
        outputs = [net(x) for _ in range(8)]
        smaller_batch = net(x[:1])  # another shape: run, not timed, not counted
        outputs += [net(x) for _ in range(2)]
    assert all(torch.allclose(out, reference, atol=1e-5) for out in outputs)
    assert torch.allclose(smaller_batch, reference[:1], atol=1e-5)
    assert tuner.channels_last is (not slow_when_channels_last)
    # the six counted calls took turns (warm-up pair, two timed pairs), the rest ran in the faster layout
    assert net.layouts[:6] == [True, False] * 3
    assert set(net.layouts[6:]) == {not slow_when_channels_last}
    assert len(tuner.seconds[True]) == len(tuner.seconds[False]) == 2
    assert not net._forward_hooks and not net._forward_pre_hooks  # decided: the hooks are gone


def test_a_call_of_another_shape_during_tuning_does_not_advance_it():
    net = LayoutSensitiveConv(slow_when_channels_last=True, slow_s=0.0)
    tuner = CpuLayoutTuner(net, rounds=1)
    with torch.inference_mode():
        net(torch.randn(2, 2, 6, 6, 6))
        net(torch.randn(1, 2, 6, 6, 6))
        net(torch.randn(2, 2, 6, 6, 6))
        assert tuner.channels_last is None and len(net.layouts) == 3
        net(torch.randn(2, 2, 6, 6, 6))
        net(torch.randn(2, 2, 6, 6, 6))
    assert tuner.channels_last is not None


@pytest.mark.parametrize("setting, tuned, channels_last", [("auto", True, True), ("channels_last", False, True),
                                                           ("default", False, False)])
def test_the_predictor_applies_infer_cpu_layout(setting, tuned, channels_last):
    cfg = load_config(None, ["method.name=unet", "method.channels=[4,8]", "method.strides=[2]",
                             "data.patch_size=[8,8,8]", f"infer.cpu_layout={setting}"])
    method = build_method(cfg.method, num_classes=3, in_channels=1)
    predictor = Predictor(method, cfg, LABELS)
    assert bool(predictor.layout_tuners) is tuned
    weight = next(p for p in method.parameters() if p.ndim == 5 and p.shape[1] > 1)
    assert weight.is_contiguous(memory_format=torch.channels_last_3d) is channels_last
    image = torch.randn(1, 20, 20, 12)
    first = predictor.model_space_classes(image)
    assert torch.equal(predictor.model_space_classes(image), first) or setting == "auto"
    if tuned:  # 4 x 4 x 2 windows, 8 batches of 4 a pass: the tuning (6 calls) ends within the first pass
        assert predictor.layout_tuners[0].channels_last is not None


def test_an_unknown_cpu_layout_is_a_config_error():
    with pytest.raises(ConfigError, match="infer.cpu_layout' must be one of auto, channels_last, default"):
        load_config(None, ["infer.cpu_layout=blocked"])
