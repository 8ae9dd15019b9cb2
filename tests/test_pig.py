"""PIG: guide binarisation, antithetic t, staged training, x-then-y sampling, synth (resume after
SIGKILL included) and training on real + generated pairs through data.extra."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from imgx3d.config import SliceConfig
from imgx3d.data.transforms import draw_indices
from imgx3d.methods.base import build_method
from imgx3d.methods.pig import (
    antithetic_timesteps,
    binarise_guide,
    channels_to_labels,
)
from imgx3d.methods.masks import masks_to_channels

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GIT_PYTHON_REFRESH": "quiet"}
TINY = {"name": "pig", "channels": [8, 16], "attention_levels": [False, False], "num_res_blocks": 1,
        "norm_groups": 8, "num_head_channels": 8, "stage1_steps": 2, "sample_steps": 4, "val_steps": 3}
TINY_CLI = [f"method.{k}={json.dumps(v).replace(' ', '').lower()}" for k, v in TINY.items() if k != "name"]
SLICES = ["data.slices.size=[32,32]", "data.batch_size=4", "data.num_workers=0", "data.split.test_fraction=0.25",
          "data.split.val_fraction=0.2", "train.max_minutes=0", "train.warmup_steps=0"]


def _cli(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "imgx3d", *argv], env=ENV, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc


def _tiny_pig(num_classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_method(dict(TINY), num_classes, 1)


def test_binarised_guide_is_a_pooled_threshold_at_three_quarters():
    x = -torch.ones(1, 1, 16, 16)
    x[..., 4:10, 4:10] = 1.0  # a 6 x 6 lesion
    guide = binarise_guide(x)
    assert set(guide.unique().tolist()) == {-1.0, 1.0}
    pooled = torch.nn.functional.avg_pool2d(x, 5, 1, 2, count_include_pad=False)
    threshold = 0.75 * pooled.max() + 0.25 * pooled.min()
    assert torch.equal(guide > 0, pooled > threshold)
    assert guide[0, 0, 6:8, 6:8].eq(1).all() and guide[0, 0, 0, 0] == -1 and guide[0, 0, 15, 15] == -1
    assert guide[0, 0, 4, 4] == -1, "the pooled corner of the lesion falls below 3/4 of the range"


def test_antithetic_timesteps_pair_t_with_T_minus_1_minus_t():
    torch.manual_seed(0)
    t = antithetic_timesteps(6, 1024, torch.device("cpu"))
    assert torch.equal(t[:3] + t[3:], torch.full((3,), 1023))
    assert len(antithetic_timesteps(5, 1024, torch.device("cpu"))) == 5


def test_mask_channels_round_trip_multiclass_labels():
    label = torch.tensor([[[[0, 1], [2, 0]]]])
    channels = masks_to_channels(label, 3)
    assert channels.shape == (1, 2, 2, 2) and set(channels.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(channels_to_labels(channels), label)


def _batch(size: int = 32, num_classes: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    label = torch.zeros(4, 1, size, size, dtype=torch.long)
    label[:, :, 8:20, 8:20] = 1
    label[:, :, 20:26, 10:18] = num_classes - 1
    return {"image": torch.rand(4, 1, size, size, generator=g) * 2 - 1, "label": label}


def test_stage_one_trains_only_model_x_and_stage_two_only_model_y():
    pig = _tiny_pig()
    out = pig.training_step(_batch(), step=0)
    assert set(out) == {"loss/model_x"}
    out["loss/model_x"].backward()
    assert all(p.grad is not None for p in pig.model_x.parameters())
    assert all(p.grad is None for p in pig.model_y.parameters())
    pig.zero_grad(set_to_none=True)
    out = pig.training_step(_batch(), step=TINY["stage1_steps"])
    assert set(out) == {"loss/model_y"}
    out["loss/model_y"].backward()
    assert all(p.grad is None for p in pig.model_x.parameters()), "model_x is frozen in stage 2"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pig.model_y.parameters())


def test_stage_two_loss_weights_pixels_by_sigmoid_of_the_mask_estimate():
    pig = _tiny_pig(num_classes=2)
    calls = {}
    real_x0 = pig._x0_of_mask

    def fixed_x0(x_t, y_t, t):
        calls["x0"] = torch.where(torch.arange(32)[None, None, None, :] < 16, 1.0, -1.0).expand_as(real_x0(x_t, y_t, t))
        return calls["x0"]

    pig._x0_of_mask = fixed_x0
    torch.manual_seed(5)
    loss = pig.training_step(_batch(num_classes=2), step=TINY["stage1_steps"])["loss/model_y"]
    # same draws again, computing the weighted MSE by hand
    torch.manual_seed(5)
    batch = _batch(num_classes=2)
    y0, x0 = batch["image"], masks_to_channels(batch["label"], 2)
    t = antithetic_timesteps(4, pig.schedule.num_steps, y0.device)
    torch.randn_like(x0)  # the mask noise, drawn first as in training_step
    noise_y = torch.randn_like(y0)
    y_t = pig.schedule.q_sample(y0, t, noise_y).float()
    with torch.no_grad():
        eps_y = pig.model_y(torch.cat([y_t, calls["x0"]], 1), t).float()
    expected = (torch.sigmoid(calls["x0"]) * (eps_y - noise_y) ** 2).mean()
    torch.testing.assert_close(loss.detach(), expected)


def test_sampling_updates_x_first_then_y_guided_by_the_binarised_clean_mask():
    pig = _tiny_pig(num_classes=2).eval()
    events = []
    model_x, model_y = pig.model_x.forward, pig.model_y.forward

    def spy_x(x, t, **kw):
        out = model_x(x, t, **kw)
        events.append(("x", pig.schedule.x0_from_eps(x[:, :1], t, out).clamp(-1, 1)))
        return out

    def spy_y(x, t, **kw):
        events.append(("y", x[:, 1:]))
        return model_y(x, t, **kw)

    pig.model_x.forward, pig.model_y.forward = spy_x, spy_y
    images, labels = pig.sample(2, size=[32, 32])
    assert [e[0] for e in events] == ["x", "y"] * TINY["sample_steps"]
    for (_, x0_hat), (_, guide) in zip(events[::2], events[1::2]):
        assert torch.equal(guide, binarise_guide(x0_hat.float()))
    assert images.shape == (2, 1, 32, 32) and labels.shape == (2, 1, 32, 32)
    assert images.min() >= -1 and images.max() <= 1


def test_a_generated_pair_depends_on_seed_and_index_only():
    pig = _tiny_pig().eval()
    alone = pig.sample_from_noise(*pig.initial_noise(3, [32, 32], torch.device("cpu"), seed=0))
    noise = [pig.initial_noise(i, [32, 32], torch.device("cpu"), seed=0) for i in range(4)]
    together = pig.sample_from_noise(torch.cat([x for x, _ in noise]), torch.cat([y for _, y in noise]))
    torch.testing.assert_close(alone[0][0], together[0][3], rtol=1e-4, atol=1e-5)
    assert not torch.equal(pig.initial_noise(3, [32, 32], torch.device("cpu"), seed=1)[1], noise[3][1])


def test_validation_reports_guided_mask_dice_and_image_loss():
    pig = _tiny_pig()
    label = torch.zeros(1, 32, 32, 6, dtype=torch.long)
    label[0, 8:20, 8:20, 1:5] = 1
    label[0, 20:26, 8:20, 2:4] = 2
    cases = [{"image": torch.rand(1, 32, 32, 6), "label": label}]
    labels = {0: "bg", 1: "a", 2: "b"}
    metrics = pig.validation_metrics(cases, labels, SliceConfig(size=[32, 32]))
    assert {"val/guided_mask_dice/a", "val/guided_mask_dice/b", "val/image_eps_mse", "val/dice_mean"} <= set(metrics)
    assert metrics["val/image_eps_mse"] > 0
    assert metrics == pig.validation_metrics(cases, labels, SliceConfig(size=[32, 32])), "fixed noise: repeatable"

    # The Dice is that of the chain's final mask: an oracle model_x that returns the true clean mask
    # scores exactly 1 per class, one that returns the classes swapped exactly 0.
    real_encode, clean = pig.space.encode, {}

    def encode(image, masks):
        y0, x0 = real_encode(image, masks)
        clean["x0"], clean["swapped"] = x0, real_encode(image, masks[:, [1, 0]])[1]  # channels: classes 1, 2
        return y0, x0

    pig.space.encode = encode
    pig._x0_of_mask = lambda x, y_t, t: clean["x0"]
    oracle = pig.validation_metrics(cases, labels, SliceConfig(size=[32, 32]))
    assert oracle["val/guided_mask_dice/a"] == 1.0 and oracle["val/guided_mask_dice/b"] == 1.0
    assert oracle["val/dice_mean"] == 1.0
    pig._x0_of_mask = lambda x, y_t, t: clean["swapped"]
    swapped = pig.validation_metrics(cases, labels, SliceConfig(size=[32, 32]))
    assert swapped["val/guided_mask_dice/a"] == 0.0 and swapped["val/guided_mask_dice/b"] == 0.0


def test_extra_fraction_sets_the_share_of_generated_samples():
    is_extra = np.array([False] * 90 + [True] * 10)
    rng = np.random.default_rng(0)
    drawn = draw_indices(rng, 20000, is_extra, 0.5)
    assert abs(is_extra[drawn].mean() - 0.5) < 0.02
    assert is_extra[draw_indices(np.random.default_rng(0), 20000, is_extra, None)].mean() < 0.15  # by count
    # without generated data the draws are the plain uniform stream (older runs reproduce)
    plain = np.zeros(7, dtype=bool)
    assert np.array_equal(draw_indices(np.random.default_rng(3), 50, plain, 0.5),
                          np.random.default_rng(3).integers(7, size=50))


@pytest.fixture
def pig_run(msd_dataset, tmp_path) -> Path:
    _cli("train", "--config", str(CONFIGS / "hippocampus" / "pig.yaml"), "--data", str(msd_dataset), "--run-dir",
         str(tmp_path / "pig"), "--no-track", *TINY_CLI, *SLICES, "train.max_steps=4", "train.val_every=2")
    return tmp_path / "pig"


def _pairs(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): np.asarray(nib.load(str(p)).dataobj).tobytes()
            for p in sorted(folder.glob("*Tr/synth_*.nii.gz"))}


def test_synth_writes_a_dataset_that_resumes_after_sigkill_and_trains_a_segmenter(pig_run, msd_dataset, tmp_path):
    common = ["--run", str(pig_run), "--n", "24", "--batch", "4", "--steps", "30"]
    _cli("synth", *common, "--output", str(tmp_path / "ref"))
    reference = _pairs(tmp_path / "ref")
    assert len(reference) == 48

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "imgx3d", "synth", *common, "--output", str(out)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while len(list(out.glob("labelsTr/synth_*.nii.gz"))) < 4:
        assert proc.poll() is None, "synth finished before it could be killed; raise --n"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "dataset.json").exists(), "an interrupted synthesis is not a dataset yet"
    assert len(list(out.glob("labelsTr/synth_*.nii.gz"))) < 24
    _cli("synth", *common, "--output", str(out))
    assert _pairs(out) == reference, "the resumed synthesis wrote what an uninterrupted one writes"
    assert not list(out.rglob(".*.nii.gz")), "no temp file left behind"

    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["labels"] == {"0": "background", "1": "sphere", "2": "cube"} and dataset["numTraining"] == 24
    image = nib.load(str(out / "imagesTr" / "synth_00000.nii.gz"))
    assert image.shape == (32, 32, 1) and np.isfinite(image.get_fdata()).all()
    assert 0 <= image.get_fdata().min() and image.get_fdata().max() <= 1
    source = nib.load(str(next((msd_dataset / "imagesTr").glob("*.nii.gz"))))
    expected = [source.header.get_zooms()[0] * source.shape[0] / 32, source.header.get_zooms()[1] * source.shape[1] / 32,
                source.header.get_zooms()[2]]
    np.testing.assert_allclose(np.abs(np.diag(image.affine)[:3]), expected, rtol=1e-5)

    other = _cli("synth", "--run", str(pig_run), "--n", "24", "--batch", "4", "--steps", "10", "--output", str(out),
                 check=False)
    assert other.returncode == 2 and "another synthesis" in other.stderr and len(other.stderr.splitlines()) == 1

    seg = _cli("train", "--config", str(CONFIGS / "hippocampus" / "unet2d.yaml"), "--data", str(msd_dataset), "--run-dir",
               str(tmp_path / "seg"), "--no-track", "method.channels=[8,16]", "method.strides=[2]",
               "method.num_res_units=0", *SLICES, "train.max_steps=4", "train.val_every=2", f"data.extra=[{out}]",
               "data.extra_fraction=0.5")
    split = json.loads((tmp_path / "seg" / "split.json").read_text())
    assert not any("synth" in case for part in split.values() for case in part), "extra pairs stay out of the split"
    assert "test cases (2)" in seg.stdout

    refused = _cli("synth", "--run", str(tmp_path / "seg"), "--n", "2", "--output", str(tmp_path / "s"), check=False)
    assert refused.returncode == 2 and "does not generate" in refused.stderr

    dataset["labels"] = {"0": "background", "1": "tumour"}
    (out / "dataset.json").write_text(json.dumps(dataset))
    refused = _cli("train", "--config", str(CONFIGS / "hippocampus" / "unet2d.yaml"), "--data", str(msd_dataset),
                   "--no-track", "--run-dir", str(tmp_path / "seg2"), *SLICES, f"data.extra=[{out}]", check=False)
    assert refused.returncode == 2 and "differ from the dataset's" in refused.stderr


def test_latent_space_trains_codec_then_model_x_then_model_y_and_samples_at_slice_size():
    torch.manual_seed(0)
    pig = build_method({**TINY, "space": "latent", "codec_steps": 2, "stage1_steps": 2,
                        "codec": {"widths": [8, 16], "norm_groups": 4, "latent_channels": 4}}, 3, 1)
    assert pig.space.factor == 2 and pig.guide_pool == 3, "the 5x5 guide pool shrinks with the latent grid"
    assert set(pig.parameter_groups()) == {"codec", "model_x", "model_y"}
    batch = _batch()
    assert set(pig.training_step(batch, 0)) == {"loss/codec"}
    assert float(pig.space.codec.scale) == 0, "the latent scale is fitted once the codec has trained"
    out = pig.training_step(batch, 2)
    assert set(out) == {"loss/model_x"} and float(pig.space.codec.scale) > 0
    assert not any(p.requires_grad for p in pig.space.codec.parameters()), "the codec is frozen after its stage"
    y0, x0 = pig.space.encode(batch["image"], masks_to_channels(batch["label"], 3))
    assert y0.shape == (4, 4, 16, 16) and x0.shape == (4, 2, 16, 16)
    torch.testing.assert_close(x0, torch.nn.functional.avg_pool2d(masks_to_channels(batch["label"], 3), 2))
    assert set(pig.training_step(batch, 4)) == {"loss/model_y"}
    images, labels = pig.eval().sample(2, size=[32, 32])
    assert images.shape == (2, 1, 32, 32) and labels.shape == (2, 1, 32, 32)
    assert images.min() >= -1 and images.max() <= 1
    label = torch.zeros(1, 32, 32, 4, dtype=torch.long)
    label[0, 8:20, 8:20, 1:3] = 1
    metrics = pig.validation_metrics([{"image": torch.rand(1, 32, 32, 4), "label": label}],
                                     {0: "bg", 1: "a", 2: "b"}, SliceConfig(size=[32, 32]))
    assert 0 <= metrics["val/guided_mask_dice/a"] <= 1 and metrics["val/image_eps_mse"] > 0


def test_stage_one_guides_the_mask_denoiser_with_the_noised_image():
    """PIG's stage 1: model_x sees [x_t, y_t] with y_t the image noised at the same t (not the clean y0)."""
    pig = _tiny_pig()
    seen = []
    forward = pig.model_x.forward
    pig.model_x.forward = lambda x, t: seen.append((x.clone(), t.clone())) or forward(x, t)
    batch = _batch()
    torch.manual_seed(3)
    pig.training_step(batch, step=0)
    torch.manual_seed(3)  # replay: t, then the two noises
    y0, x0 = batch["image"], masks_to_channels(batch["label"], 3)
    t = antithetic_timesteps(y0.shape[0], pig.schedule.num_steps, y0.device)
    noise_x, noise_y = torch.randn_like(x0), torch.randn_like(y0)
    (inputs, t_seen), = seen
    assert torch.equal(t_seen, t)
    torch.testing.assert_close(inputs[:, :2], pig.schedule.q_sample(x0, t, noise_x).float())
    torch.testing.assert_close(inputs[:, 2:], pig.schedule.q_sample(y0, t, noise_y).float())
    assert not torch.allclose(inputs[:, 2:], y0)


def test_synth_under_bf16_writes_finite_pairs_and_a_folder_holds_one_precision(pig_run, tmp_path):
    from imgx3d.errors import InputError
    from imgx3d.synthesis.synth import synthesize

    synthesize(str(pig_run), 4, tmp_path / "bf16", batch=4, steps=5, device="cpu", precision="bf16")
    image = nib.load(str(tmp_path / "bf16" / "imagesTr" / "synth_00000.nii.gz")).get_fdata()
    assert np.isfinite(image).all() and 0 <= image.min() and image.max() <= 1
    assert json.loads((tmp_path / "bf16" / "synth.json").read_text())["precision"] == "bf16"
    with pytest.raises(InputError, match="different precision"):
        synthesize(str(pig_run), 8, tmp_path / "bf16", batch=4, steps=5, device="cpu", precision="fp32")
