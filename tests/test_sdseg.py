"""Latent codec (offline loading, scale_by_std), the vae method, and SDSeg's pieces."""

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from imgx3d.config import load_config
from imgx3d.diffusion.sampler import ddim_step
from imgx3d.diffusion.schedule import make_schedule
from imgx3d.errors import CheckpointError, ConfigError
from imgx3d.methods.base import build_method
from imgx3d.nets.latent_codec import (
    CodecConfig,
    LatentCodec,
    mask_to_rgb,
    rgb_to_probability,
)
from imgx3d.training.workflow import train_run

TINY_CODEC = {"widths": [8, 8, 16, 16], "norm_groups": 8, "layers_per_block": 1}
TINY_SDSEG = ["method.name=sdseg", "method.codec.widths=[8,8,16,16]", "method.codec.norm_groups=8",
              "method.channels=[16,32]", "method.attention_levels=[false,true]", "method.num_res_blocks=1",
              "method.norm_groups=8", "method.num_head_channels=16", "data.slices.size=[32,32]"]


def _tiny_vae(seed=0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def test_codec_loads_local_diffusers_folders_and_single_files_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    vae = _tiny_vae()
    vae.save_pretrained(tmp_path / "vae")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    expected = vae.decode(vae.encode(x).latent_dist.mode()).sample

    folder = LatentCodec.build(CodecConfig(path=str(tmp_path / "vae"), scale_by_std=False))
    assert float(folder.scale) == pytest.approx(0.18215) and folder.factor == 2
    torch.testing.assert_close(folder.decode(folder.encode(x)), expected)

    single = LatentCodec.build(CodecConfig(path=str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"),
                                           config=str(tmp_path / "vae" / "config.json")))
    assert float(single.scale) == 0.0  # scale_by_std: fitted on the first batch
    single.fit_scale(x)
    assert float(single.scale) == pytest.approx(1 / float(vae.encode(x).latent_dist.mode().std().detach()))
    single.fit_scale(-x)  # once only
    assert float(single.scale) == pytest.approx(1 / float(vae.encode(x).latent_dist.mode().std().detach()))
    torch.testing.assert_close(single.decode(single.encode(x)), expected)

    with pytest.raises(CheckpointError, match="not found"):
        LatentCodec.build(CodecConfig(path=str(tmp_path / "missing")))
    other = {**json.loads((tmp_path / "vae" / "config.json").read_text()), "block_out_channels": [8, 32]}
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(CheckpointError, match="config.json"):
        LatentCodec.build(CodecConfig(path=str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"),
                                      config=str(tmp_path / "other.json")))


def _ldm_names(vae: AutoencoderKL) -> dict[str, str]:
    """diffusers weight name -> original-LDM name, read off diffusers' own converter.

    Every LDM-format name the converter accepts is probed with a 1-element tensor holding a
    unique id; the converted dict says where each id went.
    """
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    candidates = []
    n, layers = len(vae.config.block_out_channels), vae.config.layers_per_block
    for part, blocks, depth in (("encoder", "down", layers), ("decoder", "up", layers + 1)):
        candidates += [f"{part}.{w}" for w in ("conv_in", "norm_out", "conv_out")]
        for i in range(n):
            for j in range(depth):
                candidates += [f"{part}.{blocks}.{i}.block.{j}.{w}" for w in ("norm1", "conv1", "norm2", "conv2",
                                                                                "nin_shortcut")]
            candidates += [f"{part}.{blocks}.{i}.downsample.conv", f"{part}.{blocks}.{i}.upsample.conv"]
        candidates += [f"{part}.mid.block_{b}.{w}" for b in (1, 2) for w in ("norm1", "conv1", "norm2", "conv2")]
        candidates += [f"{part}.mid.attn_1.{w}" for w in ("norm", "q", "k", "v", "proj_out")]
    candidates += ["quant_conv", "post_quant_conv"]
    probe = {f"{c}.{w}": torch.tensor([float(i * 2 + k)]) for i, c in enumerate(candidates)
             for k, w in enumerate(("weight", "bias"))}
    ids = {float(v): k for k, v in probe.items()}
    converted = convert_ldm_vae_checkpoint(probe, vae.config)
    return {name: ids[float(value.flatten()[0])] for name, value in converted.items() if name in vae.state_dict()}


def test_codec_loads_original_ldm_key_format(tmp_path):
    from safetensors.torch import save_file

    vae = _tiny_vae(1)
    vae.save_pretrained(tmp_path / "vae")
    names = _ldm_names(vae)
    assert set(names) == set(vae.state_dict())
    ldm = {}
    for name, value in vae.state_dict().items():
        attention = ".mid.attn_1." in names[name] and name.endswith("weight") and value.ndim == 2
        ldm[f"first_stage_model.{names[name]}"] = value[:, :, None, None] if attention else value  # LDM: 1x1 convs
    save_file(ldm, str(tmp_path / "ldm.safetensors"))
    codec = LatentCodec.build(CodecConfig(path=str(tmp_path / "ldm.safetensors"),
                                          config=str(tmp_path / "vae" / "config.json")))
    for key, value in vae.state_dict().items():
        torch.testing.assert_close(codec.vae.state_dict()[key], value)


def _sdseg(*extra, num_classes=3):
    cfg = load_config(None, [*TINY_SDSEG, *extra])
    return build_method(cfg.method, num_classes, 1)


def test_latent_estimation_loss_matches_the_formula():
    torch.manual_seed(0)
    method = _sdseg("method.codec.path=", "method.codec_steps=0", "method.latent_weight=0.5")
    # eps_hat depends on z_t (the first 4 input channels): every term of the formula is exercised
    method.denoiser.forward = lambda x, t, class_labels=None: 0.3 * x[:, :4] + 0.1
    batch = {"image": torch.rand(3, 1, 32, 32) * 2 - 1, "label": torch.randint(0, 3, (3, 1, 32, 32))}
    torch.manual_seed(1)
    loss = method.training_step(batch, step=0)["loss/model"]

    torch.manual_seed(1)  # replay the method's draws: classes, t, noise
    classes = torch.multinomial(torch.ones(3, 2), 1)[:, 0] + 1  # every class is present in these random labels
    masks = mask_to_rgb((batch["label"][:, 0] == classes[:, None, None]).float())
    z0 = method.codec.encode(masks)
    t = torch.randint(0, 1000, (3,))
    noise = torch.randn_like(z0)
    ab = method.schedule.alpha_bar[t].float().view(-1, 1, 1, 1)
    z_t = ab.sqrt() * z0 + (1 - ab).sqrt() * noise
    eps_hat = 0.3 * z_t + 0.1
    z0_hat = (z_t - (1 - ab).sqrt() * eps_hat) / ab.sqrt()  # SDSeg's latent estimation
    expected = (eps_hat - noise).abs().mean() + 0.5 * (z0_hat - z0).abs().mean()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)


def test_strided_ddim_step_lands_on_the_forward_marginal_of_the_target_step():
    schedule = make_schedule("scaled_linear", 1000, 0.0015, 0.0155)
    x0, eps = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    ab = schedule.alpha_bar.float()
    x_t = ab[999].sqrt() * x0 + (1 - ab[999]).sqrt() * eps
    torch.testing.assert_close(ddim_step(schedule, x_t, 999, x0, t_prev=499), ab[499].sqrt() * x0 + (1 - ab[499]).sqrt() * eps,
                               rtol=1e-4, atol=1e-4)
    assert torch.equal(ddim_step(schedule, x_t, 999, x0, t_prev=-1), x0)


def test_one_step_prediction_is_a_seeded_distribution_over_classes():
    method = _sdseg().eval()
    image = torch.rand(5, 1, 32, 32) * 2 - 1
    whole = lambda fn, x: fn(x)  # noqa: E731
    with torch.no_grad():
        probs = method.predict(image, whole)
        again = method.predict(image, whole)
        method.cfg.seed = 1
        other = method.predict(image, whole)
        method.cfg.infer_steps = 3
        ddim = method.predict(image, whole)
    assert probs.shape == (5, 3, 32, 32)
    assert probs.min() >= 0 and probs.max() <= 1
    torch.testing.assert_close(probs.sum(1), torch.ones(5, 32, 32))
    assert torch.equal(probs, again) and not torch.equal(probs, other) and not torch.equal(other, ddim)
    with pytest.raises(ConfigError, match="multiples of 8"):
        method.predict(torch.zeros(1, 1, 30, 32), whole)


def test_pretrained_denoiser_gets_zero_initialised_extra_input_channels(tmp_path):
    method = _sdseg()
    state = method.denoiser.state_dict()
    narrow = {k: (v[:, :4].clone() if v.ndim == 4 and v.shape[1] == 8 else v.clone()) for k, v in state.items()}
    torch.save(narrow, tmp_path / "unet.pt")
    loaded = _sdseg(f"method.denoiser_init={tmp_path / 'unet.pt'}")
    first = [k for k, v in loaded.denoiser.state_dict().items() if v.ndim == 4 and v.shape[1] == 8]
    assert first, "the input conv takes [z_t, z_c]: 8 channels"
    for key in first:
        torch.testing.assert_close(loaded.denoiser.state_dict()[key][:, :4], narrow[key])
        assert loaded.denoiser.state_dict()[key][:, 4:].abs().sum() == 0
    torch.save({"not.a.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="not.a.weight"):
        _sdseg(f"method.denoiser_init={tmp_path / 'bad.pt'}")


def test_codec_phase_then_frozen_codec_and_vision_encoder_initialised_from_it():
    torch.manual_seed(0)
    method = _sdseg("method.codec_steps=2")
    assert set(method.parameter_groups()) == {"model", "codec"}
    batch = {"image": torch.rand(2, 1, 32, 32) * 2 - 1, "label": torch.randint(0, 3, (2, 1, 32, 32))}
    assert set(method.training_step(batch, 0)) == {"loss/codec"}
    with torch.no_grad():  # stands for codec training having moved its weights
        for p in method.codec.parameters():
            p.add_(0.01)
    out = method.training_step(batch, 2)
    assert set(out) == {"loss/model"} and float(method.codec.scale) > 0
    assert not any(p.requires_grad for p in method.codec.parameters())
    for name, value in method.codec.vae.encoder.state_dict().items():
        torch.testing.assert_close(method.tau.encoder.state_dict()[name], value)
    grads = torch.autograd.grad(out["loss/model"], [*method.tau.parameters(), *method.denoiser.parameters()],
                                allow_unused=True)
    assert all(g is not None for g in grads[:3])


def test_vae_run_is_a_codec_for_sdseg(msd_dataset, tmp_path):
    vae_cfg = load_config(None, ["method.name=vae", *[f"method.codec.{k}={v}".replace(" ", "") for k, v in
                                                      TINY_CODEC.items()],
                                 "tracking.enabled=false", "data.slices.size=[32,32]", "data.num_workers=0",
                                 "data.batch_size=2", "data.split.test_fraction=0.25", "data.split.val_fraction=0.2",
                                 "train.max_steps=4", "train.val_every=2", "train.warmup_steps=0"])
    result = train_run(vae_cfg, msd_dataset, tmp_path / "vae")
    assert {"test/dice/sphere", "test/dice_mean", "test/image_psnr"} <= set(result.test_summary)

    codec = LatentCodec.build(CodecConfig(path=str(tmp_path / "vae")))
    # the run's test figures are those of its saved codec on its own test cases, recomputed here
    import json

    from imgx3d.data.catalog import find_cases
    from imgx3d.data.transforms import Preprocessor
    from imgx3d.methods.vae import codec_validation

    test_ids = json.loads((tmp_path / "vae" / "split.json").read_text())["test"]
    catalog = find_cases(msd_dataset, vae_cfg.data)
    items = [Preprocessor(vae_cfg.data).load_case(catalog.by_id()[i], catalog.labels) for i in test_ids]
    again = codec_validation(codec.eval(), items, catalog.labels, vae_cfg.data.slices)
    for name in ("dice/sphere", "dice/cube", "dice_mean", "image_psnr"):
        assert result.test_summary[f"test/{name}"] == pytest.approx(again[f"val/{name}"], abs=1e-5), name
    saved = torch.load(tmp_path / "vae" / "best.pt", weights_only=False)["model"]
    for key, value in codec.state_dict().items():
        assert torch.equal(value, saved[f"codec.{key}"]), key
    sdseg = _sdseg(f"method.codec.path={tmp_path / 'vae'}", *[f"method.codec.{k}={v}".replace(" ", "")
                                                               for k, v in TINY_CODEC.items()])
    assert set(sdseg.parameter_groups()) == {"model"}
    for name, value in codec.vae.encoder.state_dict().items():
        torch.testing.assert_close(sdseg.tau.encoder.state_dict()[name], value)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(rgb_to_probability(sdseg.codec.decode(sdseg.codec.encode(x))),
                               rgb_to_probability(codec.decode(codec.encode(x))))


def test_codec_validation_scores_the_decoded_masks_exactly():
    """A lossless codec reconstructs every mask (Dice 1, PSNR at the 1e-12 MSE floor); a codec that
    decodes everything to background scores Dice 0."""
    from imgx3d.config import SliceConfig
    from imgx3d.methods.vae import codec_validation

    class Identity(torch.nn.Module):
        scale = torch.tensor(1.0)

        def encode(self, x):
            return x

        def decode(self, z):
            return z

    class Blank(Identity):
        def decode(self, z):
            return torch.full_like(z, -1.0)

    class Faint(Identity):  # decodes masks to probabilities 0.6 / 0.4: the 0.5 threshold still separates them
        def decode(self, z):
            return 0.2 * z

    label = torch.zeros(1, 16, 16, 5, dtype=torch.long)
    label[0, 2:9, 3:10, 1:4] = 1
    label[0, 10:14, 10:15, 2:5] = 2
    cases = [{"image": torch.rand(1, 16, 16, 5), "label": label}]
    labels = {0: "bg", 1: "a", 2: "b"}
    perfect = codec_validation(Identity(), cases, labels, SliceConfig(size=[16, 16]))
    assert perfect["val/dice/a"] == 1.0 and perfect["val/dice/b"] == 1.0 and perfect["val/dice_mean"] == 1.0
    assert perfect["val/image_psnr"] == pytest.approx(10 * np.log10(4.0 / 1e-12))
    blank = codec_validation(Blank(), cases, labels, SliceConfig(size=[16, 16]))
    assert blank["val/dice/a"] == 0.0 and blank["val/dice/b"] == 0.0
    assert codec_validation(Faint(), cases, labels, SliceConfig(size=[16, 16]))["val/dice_mean"] == 1.0


def test_training_draws_a_class_present_in_each_slice_and_any_class_for_an_empty_one():
    """SDSeg's multi-class targets (the authors' synapse loader): a class among those in the slice, so a
    slice with classes 1 and 3 never trains on the empty mask of class 2; an empty slice on any class."""
    from imgx3d.methods.masks import present_class_masks

    label = torch.zeros(2, 1, 8, 8, dtype=torch.long)
    label[0, 0, :2, :3] = 1
    label[0, 0, 5:, 5:] = 3
    torch.manual_seed(0)
    drawn = {0: set(), 1: set()}
    for _ in range(200):
        classes, masks = present_class_masks(label, 4)
        for i in range(2):
            drawn[i].add(int(classes[i]))
            assert torch.equal(masks[i], (label[i, 0] == classes[i]).float())
    assert drawn == {0: {1, 3}, 1: {1, 2, 3}}


def test_prediction_is_one_denoiser_call_at_the_last_step_conditioned_on_the_image():
    """SDSeg's inference: z_T ~ N(0, I), one call at t = T − 1 with [z_T, z_c = tau(image)]; the
    prediction changes with the image (a zeroed or dropped z_c would not)."""
    torch.manual_seed(0)
    method = _sdseg(num_classes=2).eval()
    with torch.no_grad():
        for p in method.denoiser.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # MONAI zero-initialises the output conv
    calls = []
    forward = method.denoiser.forward
    method.denoiser.forward = lambda x, t, class_labels=None: calls.append((x.clone(), t.clone())) or forward(x, t, class_labels)
    whole = lambda fn, x: fn(x)  # noqa: E731
    g = torch.Generator().manual_seed(2)
    a, b = (torch.rand(2, 1, 32, 32, generator=g) * 2 - 1 for _ in range(2))
    with torch.no_grad():
        pa, pb = method.predict(a, whole), method.predict(b, whole)
        z_c = method.tau(a.repeat(1, 3, 1, 1), method.codec.latent_scale)  # the grey slice as RGB
    assert len(calls) == 2 and all(bool((t == method.schedule.num_steps - 1).all()) for _, t in calls)
    latent = z_c.shape[1]
    torch.testing.assert_close(calls[0][0][:, latent:], z_c)  # the image's latent is the condition
    assert torch.equal(calls[0][0][:, :latent], calls[1][0][:, :latent])  # the same seeded z_T
    assert not torch.allclose(pa, pb), "the prediction depends on the image"
