"""Every method's predict / generate under bf16 and fp16 autocast gives the fp32 answer.

The networks are stubbed to return confident values *in the autocast dtype*, as a trained network
under autocast does (probabilities of 0.9998, logits of ±20): the arithmetic a method does after
the network (logit, clamp, softmax, x0 from eps, thresholds) is what is under test, and with it the
one boundary (``imgx3d.nets.boundary``) that hands every network output on as float32.
"""

import warnings
from types import SimpleNamespace

import pytest
import torch

from imgx3d.config import load_config
from imgx3d.methods.base import GenerateSettings, build_method
from imgx3d.resources import autocast
from tests.test_darl import TINY as TINY_DARL
from tests.test_imgx import TINY as TINY_IMGX
from tests.test_pig import TINY as TINY_PIG
from tests.test_sdseg import TINY_SDSEG
from tests.test_siamese import TINY as TINY_SIAMESE

PRECISIONS = [torch.bfloat16, torch.float16]
CPU = torch.device("cpu")


def _as_network_output(values: torch.Tensor) -> torch.Tensor:
    """``values`` in the dtype a network under the current autocast returns."""
    return values.to(torch.get_autocast_dtype("cpu")) if torch.is_autocast_enabled("cpu") else values


def _confident_logits(x: torch.Tensor, num_classes: int) -> torch.Tensor:
    """±20 logits of a class read off the first input channel (0, 1 or 2 by thresholds)."""
    cls = ((x[:, 0] > 0.3).long() + (x[:, 0] > 1.0).long()).clamp(max=num_classes - 1)
    return 40 * torch.nn.functional.one_hot(cls, num_classes).movedim(-1, 1).float() - 20


def _image(*spatial: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randn(1, 1, *spatial, generator=g)


def _same_labels_at_every_precision(run) -> None:
    reference = run(None)
    assert torch.isfinite(reference).all()
    for dtype in PRECISIONS:
        with torch.no_grad():
            out = run(dtype)
        assert out.dtype == torch.float32, dtype
        assert torch.isfinite(out).all(), f"NaN or inf under {dtype}"
        assert torch.equal(out.argmax(1), reference.argmax(1)), f"labels differ under {dtype}"


def _predict(method, image, window=lambda fn, x: fn(x)):
    def run(dtype):
        with torch.no_grad(), autocast(CPU, dtype):
            return method.predict(image, window)
    return run


def test_unet_predicts_the_fp32_labels_under_bf16_and_fp16():
    method = build_method({"name": "unet", "channels": [4, 8], "strides": [2], "num_res_units": 0}, 3, 1).eval()
    method.net.forward = lambda x: _as_network_output(_confident_logits(x, 3))
    _same_labels_at_every_precision(_predict(method, _image(16, 16, 16)))


def test_imgx_predicts_the_fp32_labels_under_bf16_and_fp16():
    method = build_method({**TINY_IMGX, "num_samples": 1}, 3, 1).eval()
    method.net.forward = lambda joined, t: _as_network_output(_confident_logits(joined, 3))
    _same_labels_at_every_precision(_predict(method, _image(16, 16, 16)))


def test_sdseg_keeps_its_most_confident_foreground_under_bf16_and_fp16():
    """The decoder says 0.9998 (foreground) or -0.9998: bf16's ``clamp(1e-4, 1 - 1e-4)`` of p = 0.9999
    is 1, ``logit(1) = inf`` and the softmax NaN, which labelled exactly these voxels background."""
    cfg = load_config(None, TINY_SDSEG)
    method = build_method(cfg.method, 3, 1).eval()
    method.codec.scale.fill_(1.0)
    calls = []

    def decode(z):  # class 1 in the left third of the columns, class 2 in the middle third
        k = len(calls) % 2
        calls.append(k)
        size = [s * method.codec.factor for s in z.shape[-2:]]
        cols = torch.arange(size[1]) * 3 // size[1]
        mask = (cols == k).float().expand(z.shape[0], 3, *size)
        return SimpleNamespace(sample=_as_network_output(0.9998 * (2 * mask - 1)))

    method.codec.vae.decode = decode
    _same_labels_at_every_precision(_predict(method, _image(32, 32)))
    labels = _predict(method, _image(32, 32))(torch.bfloat16).argmax(1)
    assert (labels == 1).any() and (labels == 2).any(), "the confident foreground is kept"


def test_darl_predicts_the_fp32_vessels_under_bf16_and_fp16():
    method = build_method(dict(TINY_DARL), 2, 1).eval()
    method.generator.forward = lambda x, mask=None: _as_network_output(0.9999 * torch.sign(x[:, :1] - 0.2))
    _same_labels_at_every_precision(_predict(method, _image(32, 32)))


def _generate(method, masks=None):
    def run(dtype):
        with torch.no_grad(), autocast(CPU, dtype):
            return method.generate([0, 1], [32, 32], masks, GenerateSettings(seed=4))
    return run


@pytest.mark.parametrize("space", ["pixel", "latent"])
def test_pig_generates_the_fp32_pairs_under_bf16_and_fp16(space):
    torch.manual_seed(0)
    method = build_method({**TINY_PIG, "space": space, "codec": {"widths": [8, 16], "norm_groups": 4}}, 3, 1).eval()
    if space == "latent":
        method.space.codec.scale.fill_(1.0)
    for net, own in ((method.model_x, method.mask_channels), (method.model_y, method.space.image_channels)):
        net.forward = lambda x, t, own=own: _as_network_output(0.5 * x[:, :own])
    images, labels = _generate(method)(None)
    for dtype in PRECISIONS:
        got_images, got_labels = _generate(method)(dtype)
        assert got_images.dtype == torch.float32 and torch.isfinite(got_images).all()
        torch.testing.assert_close(got_images, images, atol=0.02, rtol=0)
        assert (got_labels == labels).float().mean() >= 0.99


def test_siamese_generates_the_fp32_images_under_bf16_and_fp16():
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    torch.manual_seed(0)
    method = build_method(dict(TINY_SIAMESE), 3, 1).eval()
    method.codec.scale.fill_(1.0)
    method.unet.forward = lambda z, t, context, **kw: UNet2DConditionOutput(sample=_as_network_output(0.5 * z))
    masks = (torch.arange(32 * 32).reshape(1, 1, 32, 32) % 3).repeat(2, 1, 1, 1)
    images, _ = _generate(method, masks)(None)
    for dtype in PRECISIONS:
        got, _ = _generate(method, masks)(dtype)
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        torch.testing.assert_close(got, images, atol=0.03, rtol=0)


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_auto_does_not_pick_bf16_for_a_method_whose_labels_it_moves(monkeypatch, device_type):
    """SDSeg's labels under bf16 agree with fp32 on 97 % of the foreground (benchmarks/precision.py), so ``auto``
    predicts it in fp16 on a GPU and fp32 on a CPU; the U-Net keeps bf16; an explicit bf16 is obeyed."""
    from imgx3d.inference.predictor import Predictor, InferSettings

    monkeypatch.setattr("imgx3d.inference.predictor.choose_precision",
                        lambda setting, device: {"auto": torch.bfloat16, "bf16": torch.bfloat16}[setting])
    cfg = load_config(None, TINY_SDSEG)
    sdseg, unet = build_method(cfg.method, 3, 1), build_method({"name": "unet"}, 3, 1)
    for method, auto in ((sdseg, torch.float16 if device_type == "cuda" else None), (unet, torch.bfloat16)):
        predictor = Predictor(method, cfg, {0: "background", 1: "a", 2: "b"})
        predictor.device = torch.device(device_type)
        for setting, expected in (("auto", auto), ("bf16", torch.bfloat16)):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                got = predictor.precision(InferSettings.from_config(cfg.infer, precision=setting))
            assert got == expected, (method.name, setting)
            # an explicit bf16 is obeyed, and the user is told what it costs the labels of such a method
            said = [str(w.message) for w in caught]
            if method is sdseg and setting == "bf16":
                assert len(said) == 1 and "sdseg" in said[0] and "fp32" in said[0], said
            else:
                assert not said, (method.name, setting, said)
