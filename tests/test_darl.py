"""DARL: switchable SPADE, image pool, polyphase, the two-group losses, label-free training
(training label files are never opened), one-step inference; the Frangi baseline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgx3d.config import load_config
from imgx3d.data.catalog import find_cases, make_split
from imgx3d.data.vessels import fractal_vessels, frangi_segmentation
from imgx3d.methods.base import build_method
from imgx3d.methods.darl import ImagePool, polyphase_merge, polyphase_split
from imgx3d.nets.spade_generator import SwitchableSPADE

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GIT_PYTHON_REFRESH": "quiet"}
TINY = {"name": "darl", "diffusion_channels": [8, 16], "diffusion_attention": [False, False], "norm_groups": 8,
        "generator_channels": 8, "generator_blocks": 1, "spade_hidden": 8, "discriminator_channels": 8,
        "fractal_bank": 4, "closing_window": 5}


def test_switchable_spade_is_instance_norm_without_a_mask_and_mask_modulated_with_one():
    torch.manual_seed(0)
    norm = SwitchableSPADE(4, hidden=8)
    x = torch.randn(2, 4, 16, 16)
    torch.testing.assert_close(norm(x), norm.plain(x))
    a, b = torch.zeros(2, 1, 16, 16), torch.ones(2, 1, 16, 16)
    a[..., 4:8, 4:8] = 1
    assert not torch.allclose(norm(x, a), norm(x, b)), "the mask modulates the features"
    assert not torch.allclose(norm(x, a), norm(x))


def test_image_pool_mixes_history_and_survives_the_state_dict():
    torch.manual_seed(0)
    pool = ImagePool(3)
    first = torch.arange(3.0).reshape(3, 1, 1, 1)
    assert torch.equal(pool.query(first), first), "until full, fakes pass through"
    later = torch.full((64, 1, 1, 1), 9.0)
    out = pool.query(later)
    assert (out != 9).any() and (out == 9).any(), "once full, about half are stored fakes"
    restored = ImagePool(3)
    restored.load_state_dict(pool.state_dict())
    assert [float(i) for i in restored.images] == [float(i) for i in pool.images]


def test_a_restored_image_pool_follows_the_fakes_device_and_dtype():
    """--resume on a GPU: the pool comes back from the checkpoint on the CPU while the fakes are on
    the method's device; what it hands out must be on the fakes' device (here: their dtype)."""
    torch.manual_seed(1)
    restored = ImagePool(2)
    restored.set_extra_state([torch.zeros(1, 2, 2, dtype=torch.float64), torch.ones(1, 2, 2, dtype=torch.float64)])
    fakes = torch.full((32, 1, 2, 2), 5.0, dtype=torch.float32)
    out = restored.query(fakes)
    assert out.dtype == torch.float32 and out.device == fakes.device
    assert (out != 5).any(), "stored images were mixed in"


def test_the_cycle_renoises_at_path_as_t_and_eps_and_the_losses_carry_the_papers_weights():
    """The authors' p_losses: one eps for the B path, the A path and the cycle, the cycle at t_a;
    L_G = L_diff + 0.2 L_adv + 5 L_cycle; t_a in [0, 200), t_b over the whole chain."""
    torch.manual_seed(0)
    darl = build_method(dict(TINY), 2, 1)
    calls = []
    real = darl.schedule.q_sample

    def q_sample(x0, t, noise):
        calls.append((t.clone(), noise.clone(), x0.detach().clone()))
        return real(x0, t, noise)

    darl.schedule.q_sample = q_sample
    generated = []
    generator = darl.generator.forward
    darl.generator.forward = lambda x, mask=None: generated.append(generator(x, mask)) or generated[-1]
    ts = {"a": [], "b": []}
    for step in range(20):
        calls.clear(), generated.clear()
        images = torch.rand(3, 1, 32, 32) * 2 - 1
        out = darl.training_step({"image": images, "label": torch.zeros(3, 1, 32, 32)}, step)
        (t_b, eps_b, x0_b), (t_a, eps_a, x0_a), (t_cycle, eps_cycle, x0_cycle) = calls
        assert torch.equal(x0_a, images) and not torch.equal(x0_b, images), "path B starts from a background"
        assert torch.equal(x0_cycle, generated[0].detach()), "the cycle segments the fake angiogram of path B"
        assert torch.equal(t_cycle, t_a) and torch.equal(eps_cycle, eps_a), "the cycle reuses path A's t and eps"
        assert torch.equal(eps_b, eps_a), "one eps per step, as the authors' code"
        ts["a"] += t_a.tolist()
        ts["b"] += t_b.tolist()
        expected = out["diffusion"] + 0.2 * out["adversarial"] + 5.0 * out["cycle"]
        torch.testing.assert_close(out["loss/generator"].detach(), expected)
    assert 0 <= min(ts["a"]) and max(ts["a"]) < 200 and max(ts["b"]) >= 200, (max(ts["a"]), max(ts["b"]))


def test_polyphase_split_and_merge_are_inverse():
    x = torch.arange(2 * 8 * 6.0).reshape(1, 2, 8, 6)
    parts = polyphase_split(x)
    assert all(p.shape == (1, 2, 4, 3) for p in parts)
    assert torch.equal(polyphase_merge(parts), x)


def test_generator_and_discriminator_losses_train_only_their_own_networks():
    torch.manual_seed(0)
    darl = build_method(dict(TINY), 2, 1)
    image = torch.rand(2, 1, 32, 32) * 2 - 1
    out = darl.training_step({"image": image, "label": torch.full((2, 1, 32, 32), 99)}, 0)  # labels unused
    assert {"loss/generator", "loss/discriminator", "diffusion", "cycle", "adversarial"} <= set(out)
    groups = darl.parameter_groups()
    out["loss/generator"].backward(inputs=groups["generator"], retain_graph=True)
    assert all(p.grad is None for p in groups["discriminator"])
    assert sum(float(p.grad.abs().sum()) for p in darl.eps_theta.parameters() if p.grad is not None) > 0
    assert sum(float(p.grad.abs().sum()) for p in darl.generator.parameters() if p.grad is not None) > 0
    darl.zero_grad(set_to_none=True)
    out["loss/discriminator"].backward(inputs=groups["discriminator"])
    assert all(p.grad is None for p in groups["generator"]), "fakes reach the discriminators detached"
    assert sum(float(p.grad.abs().sum()) for p in groups["discriminator"] if p.grad is not None) > 0


def test_inference_is_one_step_at_t0_and_polyphase_interleaves():
    torch.manual_seed(0)
    darl = build_method({**TINY, "polyphase": True}, 2, 1).eval()
    calls = []
    forward = darl.eps_theta.forward
    darl.eps_theta.forward = lambda x, t, **kw: calls.append((x.shape, t.tolist())) or forward(x, t, **kw)
    image = torch.rand(1, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        probs = darl.predict(image, None)
    assert probs.shape == (1, 2, 32, 32) and torch.allclose(probs.sum(1), torch.ones(1, 32, 32))
    assert calls == [((1, 1, 16, 16), [0])] * 4, "one step at t = 0 per polyphase sub-image"
    with torch.no_grad():
        direct = darl.segment(polyphase_split(image)[3])
    torch.testing.assert_close(probs[:, 1:, 1::2, 1::2], ((direct + 1) / 2).clamp(0, 1))


def _fundus_like(root: Path, n: int = 6, size: int = 64) -> None:
    rng = np.random.default_rng(0)
    for sub in ("images", "1st_manual"):
        (root / sub).mkdir(parents=True)
    for i in range(n):
        vessels = fractal_vessels((size, size), rng, trees=2, width=(2.0, 4.0))
        y, x = np.mgrid[0:size, 0:size]
        background = 150 + 60 * np.exp(-((y - 20) ** 2 + (x - 40) ** 2) / 300)
        image = np.where(vessels, background - 70, background) + rng.normal(0, 4, (size, size))
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "images" / f"{i:02d}_training.png")
        Image.fromarray((vessels * 255).astype(np.uint8)).save(root / "1st_manual" / f"{i:02d}_manual1.png")


def test_label_free_training_never_opens_a_training_label_file(tmp_path):
    data = tmp_path / "fundus"
    _fundus_like(data)
    overrides = [f"method.{k}={json.dumps(v).replace(' ', '').lower()}" for k, v in TINY.items() if k != "name"]
    overrides += ["data.slices.size=[64,64]", "data.color=grey", "data.split.test_fraction=0.34",
                  "data.split.val_fraction=0.0", "train.max_steps=3", "train.val_every=3", "train.max_minutes=0"]
    cfg = load_config(CONFIGS / "drive" / "darl.yaml", overrides)
    split = make_split(find_cases(data, cfg.data), cfg.data.split)
    for case in split.train:  # training labels made unreadable: any attempt to open one fails the run
        (data / "1st_manual" / f"{case.split('_')[0]}_manual1.png").write_bytes(b"not an image")
    proc = subprocess.run([sys.executable, "-m", "imgx3d", "train", "--image", "--config",
                           str(CONFIGS / "drive" / "darl.yaml"), "--data", str(data), "--run-dir", str(tmp_path / "run"),
                           "--no-track", *overrides], env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert f"test cases ({len(split.test)})" in proc.stdout, "test labels score the label-free model"
    assert len(list((tmp_path / "run" / "test_predictions").glob("*.png"))) == len(split.test)


def test_frangi_baseline_finds_dark_tubes_inside_the_fov():
    rng = np.random.default_rng(3)
    vessels = fractal_vessels((128, 128), rng, trees=2, width=(3.0, 5.0))
    image = np.where(vessels, 80.0, 180.0) + rng.normal(0, 3, (128, 128))
    y, x = np.mgrid[0:128, 0:128]
    fov = (y - 64) ** 2 + (x - 64) ** 2 < 60 ** 2
    response, binary = frangi_segmentation(image, fov)
    assert response.min() == 0 and response.max() == pytest.approx(1.0) and not binary[~fov].any()
    inside = fov & ~np.isclose(response, 0)
    dice = 2 * (binary & vessels & inside).sum() / ((binary & inside).sum() + (vessels & inside).sum())
    assert dice > 0.6
    assert response[vessels & inside].mean() > 5 * response[~vessels & inside].mean()


def test_darl_runs_per_slice_on_volumes(msd_dataset, tmp_path):
    overrides = [f"method.{k}={json.dumps(v).replace(' ', '').lower()}" for k, v in TINY.items() if k != "name"]
    overrides += ["method.polyphase=false", "data.mode=volume", "data.layout=auto", "data.color=grey",
                  "data.preset=mri", "data.labels={1: vessel}", "data.label_map={2: 1}", "data.mask_threshold=null",
                  "data.slices.size=[32,32]", "data.split.test_fraction=0.25", "data.split.val_fraction=0.2",
                  "train.max_steps=2", "train.val_every=2", "train.max_minutes=0"]
    proc = subprocess.run([sys.executable, "-m", "imgx3d", "train", "--volume", "--config",
                           str(CONFIGS / "drive" / "darl.yaml"), "--data", str(msd_dataset), "--run-dir",
                           str(tmp_path / "run"), "--no-track", *overrides], env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    predictions = sorted((tmp_path / "run" / "test_predictions").glob("*.nii.gz"))
    assert len(predictions) == 2 and "test cases (2)" in proc.stdout, "scored in 3D on the native grid"
    import nibabel as nib

    for path in predictions:  # every slice predicted, back on the input's own grid, in the file's label values
        source = nib.load(str(msd_dataset / "imagesTr" / path.name))
        pred = nib.load(str(path))
        assert pred.shape == source.shape and np.allclose(pred.affine, source.affine, atol=1e-5)
        assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= {0, 2}, "class 1 written back as file value 2"
    metrics = (tmp_path / "run" / "test_metrics" / "metrics.csv").read_text().splitlines()
    assert len(metrics) == 1 + 2 and all(",vessel," in row for row in metrics[1:])


def test_the_mask_modulates_the_generator_at_full_resolution():
    """A one-pixel vessel off the stride-4 grid changes the synthesised image around it: the mask reaches
    the decoder's full-resolution block (the authors' up_1). Modulating only at H/4, where the mask is
    nearest-downsampled by 4, loses it (the output did not change at all)."""
    from imgx3d.nets.spade_generator import SwitchableSPADEGenerator

    torch.manual_seed(0)
    generator = SwitchableSPADEGenerator(2, 1, channels=8, downsamples=2, blocks=1, hidden=8).eval()
    x = torch.randn(1, 2, 32, 32)
    mask = -torch.ones(1, 1, 32, 32)
    thin = mask.clone()
    thin[0, 0, 10:22, 13] = 1  # a 1-pixel vertical vessel in column 13 (not a multiple of 4)
    with torch.no_grad():
        change = (generator(x, thin) - generator(x, mask)).abs()[0, 0]
        assert torch.equal(generator(x), generator(x, None))
    assert change.max() > 0.1, "the thin vessel changes the image"
    # largest on the vessel (instance norms spread a little of it everywhere)
    assert change[10:22, 12:15].mean() > 3 * change[:, 24:].mean()
