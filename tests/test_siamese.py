"""Siamese-Diffusion: stop-gradients, the w_i ramp, when online augmentation is active, sampling
through the mask branch only, DHI shapes, SD-folder initialisation, and synth from masks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from imgx3d.diffusion import sampler as sampler_module
from imgx3d.errors import CheckpointError
from imgx3d.methods.base import GenerateSettings, build_method
from imgx3d.nets.dense_hint import DenseHintEncoder

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GIT_PYTHON_REFRESH": "quiet"}
TINY = {"name": "siamese", "codec": {"widths": [8, 16], "norm_groups": 4, "latent_channels": 4}, "codec_steps": 1,
        "channels": [16, 32], "norm_groups": 8, "attention_head_dim": 4, "context_dim": 16, "hint_widths": [8, 16, 32],
        "ramp_steps": 9, "sample_steps": 3, "cond_dropout": 0.0}


def _siamese(**changes) -> torch.nn.Module:
    torch.manual_seed(0)
    method = build_method({**TINY, **changes}, 3, 1)
    with torch.no_grad():  # leave the zero-initialised (no-op) controls, so gradients reach every branch
        for p in method.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    method.codec.fit_scale(torch.rand(2, 3, 32, 32))
    return method


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    label = torch.zeros(2, 1, 32, 32, dtype=torch.long)
    label[:, :, 8:20, 8:20] = 1
    label[:, :, 20:28, 10:16] = 2
    return {"image": torch.rand(2, 1, 32, 32, generator=g) * 2 - 1, "label": label}


def _grads(loss: torch.Tensor, module: torch.nn.Module) -> float:
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return sum(float(g.abs().sum()) for g in grads if g is not None)


def test_one_control_path_and_the_stop_gradients_of_the_paper():
    """The authors' structure: one DHI + control net for both hints; L_i reaches the control path
    (through the image hint) but never the denoiser; L_c trains the mask branch only."""
    method = _siamese()
    names = {name.split(".")[0] for name, _ in method.named_children()}
    assert {"control", "hint"} <= names and not names & {"control_mask", "control_image", "hint_mask", "hint_image"}
    terms = method.losses(_batch(), k=5)
    assert _grads(terms["image"], method.unet) == 0, "the denoiser is shielded from L_i (the authors' copy)"
    assert _grads(terms["image"], method.control) > 0 and _grads(terms["image"], method.hint) > 0
    assert _grads(terms["mask"], method.unet) > 0 and _grads(terms["consistency"], method.unet) > 0
    assert _grads(terms["consistency"], method.control) > 0


def test_the_image_branch_mixes_detached_mask_residuals_with_the_ramped_image_residuals():
    method = _siamese()
    calls, mixes = [], []
    residuals, denoise = method.residuals, method.denoise
    method.residuals = lambda *a: calls.append(residuals(*a)) or calls[-1]
    method.denoise = lambda z, t, r, shielded=False: (mixes.append(r) if shielded else None) or denoise(z, t, r, shielded)
    b = method.branches(_batch(), k=3)  # w_i = 3 / 9
    c_m, c_i = calls  # the mask branch's residuals, then the image hint's, through the same control net
    assert len(mixes) == 1 and len(mixes[0]) == len(c_m) == len(method.control.controlnet_down_blocks) + 1
    for mix, m, i in zip(mixes[0], c_m, c_i):
        torch.testing.assert_close(mix, m + i / 3)
        assert torch.autograd.grad(mix.sum(), m, allow_unused=True)[0] is None, "sg(c_m)"
    # at w_i = 0 the mix is sg(c_m): the shielded copy then gives the mask branch's eps exactly
    method.residuals, method.denoise = residuals, denoise
    b = method.branches(_batch(), k=0, t=torch.tensor([5, 600]), noise=torch.randn(2, 4, 16, 16))
    torch.testing.assert_close(b.eps_mix, b.eps_m)


def test_online_augmentation_reuses_the_steps_noise_and_weighs_samples_over_the_whole_batch():
    """L_m' (the paper's Eq. 7): z_t' = q(z0'(eps_mix), t, eps) = z_t + sqrt(1 - abar) (eps - eps_mix), for
    t <= t_tau only, the per-sample MSE summed over those and divided by the whole batch."""
    method = _siamese(t_tau=200)
    t, noise = torch.tensor([50, 700]), torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    terms = method.losses(_batch(), k=4, t=t, noise=noise)
    torch.manual_seed(0)
    b = method.branches(_batch(), k=4, t=t, noise=noise)
    root = (1 - method.schedule.alpha_bar[50]).sqrt()
    z_t_prime = b.z_t[:1] + root * (noise[:1] - b.eps_mix[:1])
    with torch.no_grad():
        expected = ((method.eps(z_t_prime, t[:1], b.mask_hint[:1]) - noise[:1]) ** 2).mean() / 2
    torch.testing.assert_close(terms["online"].detach(), expected, rtol=1e-4, atol=1e-6)

def test_image_weight_ramps_from_zero_to_one():
    method = _siamese()
    assert [method.ramp(k) for k in (0, 3, 9, 20)] == [0.0, pytest.approx(1 / 3), 1.0, 1.0]
    out = method.training_step(_batch(), step=TINY["codec_steps"] + 3)
    assert float(out["w_i"]) == pytest.approx(1 / 3), "counted from the end of the codec phase"


def test_online_augmentation_only_past_k_tau_and_for_t_up_to_t_tau():
    every_t = _siamese(t_tau=10_000)  # every t qualifies: only the iteration threshold decides
    assert "online" not in every_t.losses(_batch(), k=3), "not before N_iter / 3 (the authors: global_step > it)"
    assert "online" in every_t.losses(_batch(), k=4)
    no_t = _siamese(t_tau=-1)
    assert "online" not in no_t.losses(_batch(), k=8), "no sample with t <= T_tau"
    assert "online" not in _siamese(t_tau=10_000, online_augmentation=False).losses(_batch(), k=8)


def test_sampling_uses_the_mask_branch_only_without_control_guidance_by_default():
    method = _siamese().eval()
    assert method.cfg.guidance == 1.0 and method.cfg.cond_dropout == 0.0
    calls = {"control": 0, "hint": 0}
    for name in calls:
        module = getattr(method, name)
        forward = module.forward
        module.forward = lambda *a, _f=forward, _n=name, **k: calls.__setitem__(_n, calls[_n] + 1) or _f(*a, **k)
    label = _batch()["label"]
    images, labels = method.generate([0, 1], [32, 32], label)
    assert calls == {"control": TINY["sample_steps"], "hint": 1}, "the mask's hint once, one control call per step"
    assert images.shape == (2, 1, 32, 32) and torch.equal(labels, label)
    again, _ = method.generate([1], [32, 32], label[1:])
    torch.testing.assert_close(again[0], images[1], rtol=1e-4, atol=1e-5)


def test_dense_hint_encoder_reaches_the_latent_grid_and_starts_as_a_no_op():
    dhi = DenseHintEncoder(2, 24, factor=8)
    out = dhi(torch.randn(3, 2, 64, 48))
    assert out.shape == (3, 24, 8, 6) and torch.count_nonzero(out) == 0
    assert not any(isinstance(m, torch.nn.modules.batchnorm._NormBase) or isinstance(m, torch.nn.GroupNorm)
                   for m in dhi.modules()), "no normalisation"
    with pytest.raises(ValueError):
        DenseHintEncoder(2, 24, factor=32)


def test_sd_folder_initialisation_loads_unet_and_vae_and_freezes_the_encoder(tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, layers_per_block=1)
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                norm_num_groups=8, cross_attention_dim=24, attention_head_dim=4)
    vae.save_pretrained(tmp_path / "sd" / "vae")
    unet.save_pretrained(tmp_path / "sd" / "unet")
    method = build_method({"name": "siamese", "sd_path": str(tmp_path / "sd"), "hint_widths": [8, 16, 32]}, 2, 1)
    torch.testing.assert_close(method.unet.conv_in.weight, unet.conv_in.weight)
    assert not method.train_codec_first and set(method.parameter_groups()) == {"model"}
    assert not any(p.requires_grad for p in method.unet.down_blocks.parameters())
    assert not any(p.requires_grad for p in method.unet.mid_block.parameters())
    assert all(p.requires_grad for p in method.unet.up_blocks.parameters())
    assert method.context.shape[-1] == 24
    with pytest.raises(CheckpointError, match="unet/ and vae/"):
        build_method({"name": "siamese", "sd_path": str(tmp_path)}, 2, 1)


def test_train_then_synth_from_real_and_random_masks(msd_dataset, tmp_path):
    overrides = ["method.codec.widths=[8,16]", "method.codec.norm_groups=4", "method.codec_steps=1",
                 "method.channels=[16,32]", "method.norm_groups=8", "method.attention_head_dim=4",
                 "method.context_dim=16", "method.hint_widths=[8,16,32]", "method.ramp_steps=3",
                 "data.slices.size=[32,32]", "data.batch_size=2", "data.num_workers=0", "data.split.test_fraction=0.25",
                 "train.max_steps=3", "train.val_every=3", "train.max_minutes=0", "train.warmup_steps=0"]
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "imgx3d"]
    proc = subprocess.run([*cmd, "train", "--config", str(CONFIGS / "hippocampus" / "siamese.yaml"), "--data",
                           str(msd_dataset), "--run-dir", str(run), "--no-track", *overrides],
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    for name, extra in (("real", []), ("random", ["--random-masks"])):
        proc = subprocess.run([*cmd, "synth", "--run", str(run), "--n", "3", "--batch", "2", "--steps", "2", "--masks",
                               str(msd_dataset), "--output", str(tmp_path / name), *extra],
                              env=ENV, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        assert json.loads((tmp_path / name / "dataset.json").read_text())["numTraining"] == 3
    real = np.asarray(nib.load(str(tmp_path / "real" / "labelsTr" / "synth_00000.nii.gz")).dataobj)
    moved = np.asarray(nib.load(str(tmp_path / "random" / "labelsTr" / "synth_00000.nii.gz")).dataobj)
    assert real.shape == (32, 32, 1) and real.any() and not np.array_equal(real, moved)
    proc = subprocess.run([*cmd, "synth", "--run", str(run), "--n", "2", "--output", str(tmp_path / "none")],
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "--masks" in proc.stderr
    # the masks of the run's validation and test cases never condition synthetic training pairs
    from imgx3d.checkpoint import load_checkpoint
    from imgx3d.synthesis.synth import held_out_cases, mask_slices

    split = json.loads((run / "split.json").read_text())
    held_out = held_out_cases(run / "best.pt")
    assert held_out == set(split["val"]) | set(split["test"]) and held_out
    checkpoint = load_checkpoint(run / "best.pt")
    every = mask_slices(msd_dataset, checkpoint)
    train_only = mask_slices(msd_dataset, checkpoint, held_out)
    assert 0 < len(train_only) < len(every)
    assert held_out_cases(tmp_path / "elsewhere" / "best.pt") == set(), "no split.json: every case is used"


def test_opt_in_control_guidance_extrapolates_over_the_null_control_and_dropout_swaps_it_in():
    method = _siamese(guidance=3.0, cond_dropout=1.0).eval()
    seen = []

    def eps(z, t, c):  # a stand-in denoiser: the null control gives 1, the mask control 2
        seen.append(c)
        return torch.full_like(z, 1.0 if torch.equal(c, method.null_control.expand_as(c)) else 2.0)

    method.eps = eps
    real_step = sampler_module.ddim_step  # the DDIM loop's step (imgx3d.diffusion.sampler.ddim_sample)
    x0_targets = []
    sampler_module.ddim_step = lambda schedule, z, t, x0, t_prev: x0_targets.append((z, t, x0)) or real_step(
        schedule, z, t, x0, t_prev=t_prev)
    try:
        method.generate([0], [32, 32], _batch()["label"][:1], GenerateSettings(steps=2))
    finally:
        sampler_module.ddim_step = real_step
    assert len(seen) == 4, "conditional and null control per step"
    z, t, x0 = x0_targets[0]
    tt = torch.full((1,), t, dtype=torch.long)
    torch.testing.assert_close(x0, method.schedule.x0_from_eps(z, tt, torch.full_like(z, 1 + 3.0 * (2 - 1))))
    # training: with cond_dropout 1 every sample's mask control is the null control
    hints = []
    residuals = method.residuals
    method.residuals = lambda z, t, hint: hints.append(hint) or residuals(z, t, hint)
    method.train()
    method.losses(_batch(), k=1)
    assert torch.equal(hints[0], method.null_control.expand_as(hints[0])), "dropped to the null control"


def test_consistency_sends_no_gradient_into_the_image_branch():
    """L_c = MSE(eps_m, sg(eps_mix)): the image branch (its residuals c_i and the image's hint) gets no
    gradient from L_c, so the mask branch is pulled toward the image branch and never the reverse."""
    method = _siamese()
    calls = []
    residuals = method.residuals
    method.residuals = lambda *a: calls.append(residuals(*a)) or calls[-1]
    terms = method.losses(_batch(), k=5)
    c_m, c_i = calls[:2]
    to_image = torch.autograd.grad(terms["consistency"], c_i, allow_unused=True, retain_graph=True)
    assert all(g is None or float(g.abs().sum()) == 0 for g in to_image), "sg(eps_mix)"
    to_mask = torch.autograd.grad(terms["consistency"], c_m, allow_unused=True)
    assert any(g is not None and float(g.abs().sum()) > 0 for g in to_mask)
