"""Flags and config keys users rely on, each with an exact expectation: test-time augmentation,
``predict --overwrite / --device``, spatial augmentation, intensity presets, crops, pairs folders,
window blending and size, LR schedules, gradient clipping, weight decay, the config's range
checks, ``evaluate`` and ``compare`` options and errors, ``synth``'s folder check and seed, and a
NaN loss."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from imgx3d import resources
from imgx3d.cli import main
from imgx3d.config import DataConfig, InferConfig, load_config
from imgx3d.data.catalog import find_cases
from imgx3d.data.geometry import GridMap, grid_map
from imgx3d.data.presets import normalize_intensity
from imgx3d.data.transforms import intensity_transforms, train_transforms
from imgx3d.errors import ConfigError
from imgx3d.inference import predictor as infer
from imgx3d.inference.predictor import InferSettings, Predictor, predict_probabilities
from imgx3d.inference.windows import make_window
from imgx3d.training.trainer import lr_factor
from tests.conftest import (
    TINY_OVERRIDES,
    save_nifti,
    train_tiny_unet,
    write_msd_dataset,
)


class Pointwise(torch.nn.Module):
    """A fake 3D segmenter whose class probabilities depend on each voxel's own intensity only:
    mirroring its input mirrors its output, so flip-TTA done right changes nothing."""

    spatial_dims, num_classes = 3, 2

    def _probs(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(torch.cat([x, -x], 1) * 3.0, 1)

    def predict(self, image: torch.Tensor, window) -> torch.Tensor:
        return window(self._probs, image)

    def window_probabilities(self, window: torch.Tensor) -> torch.Tensor:
        return self._probs(window)


def _ramp(shape=(12, 10, 8)) -> torch.Tensor:
    """An image without mirror symmetry along any axis."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij"))
    return (0.3 * grid[0] - 0.2 * grid[1] + 0.1 * grid[2] ** 1.5 - 1.0)[None]


def test_tta_flips_every_mirrored_prediction_back():
    image, window = _ramp(), make_window(InferConfig(sw_batch_size=2), [8, 8, 8])
    plain = predict_probabilities(Pointwise(), image, window)
    tta = predict_probabilities(Pointwise(), image, window, tta_flips=[0, 1, 2])
    torch.testing.assert_close(tta, plain, rtol=1e-5, atol=1e-6)
    unflipped = (plain + plain.flip(1)) / 2  # what forgetting to flip back would give for tta_flips=[0]
    assert not torch.allclose(predict_probabilities(Pointwise(), image, window, tta_flips=[0]), unflipped, atol=1e-3)


class WhereInTheInput(Pointwise):
    """A fake 3D segmenter that is not shift-equivariant: its class-1 probability at a voxel depends on the
    parity of the voxel's index sum in the array it is given (a pooling grid's aliasing, exaggerated)."""

    def _probs(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([1 - self.p1(x.shape[2:]), self.p1(x.shape[2:])], 1)[:1].expand(x.shape[0], -1, -1, -1, -1)

    @staticmethod
    def p1(shape, offset=(0, 0, 0)) -> torch.Tensor:
        grid = torch.meshgrid(*[torch.arange(n) + o for n, o in zip(shape, offset)], indexing="ij")
        return (0.1 + 0.8 * ((grid[0] + grid[1] + grid[2]) % 2) + 0.01 * grid[0]).float()[None, None]


def test_tta_shifts_average_the_shifted_maps_moved_back():
    """Shift s pads s voxels before every axis (N - 1 - s after) and crops them off again: a pointwise
    model is unchanged, and a position-dependent one gives the mean of its maps at offsets 0 … N - 1."""
    image, window = _ramp(), make_window(InferConfig(sw_batch_size=2), [16, 16, 16])
    plain = predict_probabilities(Pointwise(), image, window)
    torch.testing.assert_close(predict_probabilities(Pointwise(), image, window, tta_flips=[0], tta_shifts=3), plain,
                               rtol=1e-5, atol=1e-6)
    # the window (16³) is larger than the volume, so MONAI centres the padded volume in it: a volume of
    # (n + 2) voxels sits (16 - n - 2) // 2 voxels in; shift s moves its content s voxels further on
    shape = image.shape[1:]
    offset = [(16 - n - 2) // 2 for n in shape]
    expected = sum(WhereInTheInput.p1(shape, [o + s for o in offset]) for s in range(3))[0, 0] / 3
    shifted = predict_probabilities(WhereInTheInput(), image, window, tta_shifts=3)
    torch.testing.assert_close(shifted[1], expected, rtol=1e-5, atol=1e-5)
    unshifted = predict_probabilities(WhereInTheInput(), image, window)
    assert (shifted[1] - unshifted[1]).abs().min() > 0.2  # the test can tell shifts from none


def test_tta_shifts_run_every_mirroring_at_every_shift_for_3d_methods_only():
    calls = []

    class Counting(Pointwise):
        def predict(self, image, window):
            calls.append(tuple(image.shape[2:]))
            return super().predict(image, window)

    image, window = _ramp(), make_window(InferConfig(), [16, 16, 16])
    predict_probabilities(Counting(), image, window, tta_flips=[0, 2], tta_shifts=2)
    assert calls == [(13, 11, 9)] * 8, "4 mirrorings x 2 shifts, each on the volume padded by one voxel"
    calls.clear()
    Counting.spatial_dims = 2  # a per-slice method: its slices are resized, so shifts do not apply
    predict_probabilities(Counting(), image, window, tta_shifts=2)
    with_shifts = list(calls)
    calls.clear()
    predict_probabilities(Counting(), image, window)
    assert with_shifts == calls and calls


def test_validation_predicts_without_shifts_and_streaming_warns_that_it_skips_them(monkeypatch):
    cfg = load_config(None, ["infer.tta_shifts=2", "infer.tta_flips=[0]", "data.patch_size=[8,8,8]"])
    predictor = Predictor(Pointwise(), cfg, {0: "bg", 1: "fg"}, InferSettings.from_config(cfg.infer, device="cpu"))
    assert predictor.settings.tta_shifts == 2
    seen = []
    real = infer.predict_probabilities
    monkeypatch.setattr(infer, "predict_probabilities", lambda *a, **k: seen.append(a[3:6]) or real(*a, **k))
    predictor.model_space_classes(_ramp())
    assert seen == [((), cfg.data.slices, 1)], "validation during training: no mirrors, no shifts"
    with pytest.warns(UserWarning, match="infer.tta_shifts .2. is not applied by the streaming window"):
        predictor._stream(_ramp(), predictor.settings)


def test_streaming_tta_mirrors_each_window_and_flips_it_back():
    cfg = load_config(None, ["infer.tta_flips=[0,1,2]", "infer.streaming=on", "data.patch_size=[8,8,8]"])
    predictor = Predictor(Pointwise(), cfg, {0: "bg", 1: "fg"}, InferSettings.from_config(cfg.infer, device="cpu"))
    image = _ramp()
    labels = predictor._stream(image, predictor.settings)
    expected = (image[0] < 0).long()  # class 1 where -x > x
    assert torch.equal(labels.reshape(expected.shape), expected)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    return train_tiny_unet(tmp_path_factory.mktemp("options"))


def test_predict_tta_flags_mirror_over_all_three_axes_and_shift(run, tmp_path, monkeypatch):
    seen, shifts = [], []
    real = infer.predict_probabilities
    monkeypatch.setattr(infer, "predict_probabilities",
                        lambda method, image, window, tta_flips=(), slices=None, tta_shifts=1, spread=None:
                        seen.append(list(tta_flips)) or shifts.append(tta_shifts)
                        or real(method, image, window, tta_flips, slices, tta_shifts, spread))
    folder, data = run
    image = data / "imagesTr" / "case_0.nii.gz"
    assert main(["predict", "--run", str(folder), "--input", str(image), "--output", str(tmp_path / "a")]) == 0
    assert main(["predict", "--run", str(folder), "--input", str(image), "--output", str(tmp_path / "b"), "--tta"]) == 0
    assert seen == [[], [0, 1, 2]]
    assert main(["predict", "--run", str(folder), "--input", str(image), "--output", str(tmp_path / "c"),
                 "--tta-shifts", "3"]) == 0
    assert shifts == [1, 1, 3], "--tta-shifts overrides the run's infer.tta_shifts"
    assert main(["predict", "--run", str(folder), "--input", str(image), "--output", str(tmp_path / "d"),
                 "--tta-shifts", "0"]) == 2, "the config's own range check, one line"


def test_predict_skips_existing_outputs_unless_overwrite(run, tmp_path):
    folder, data = run
    image = data / "imagesTr" / "case_0.nii.gz"
    out = tmp_path / "out"
    out.mkdir()
    (out / "case_0.nii.gz").write_bytes(b"an earlier result")
    argv = ["predict", "--run", str(folder), "--input", str(image), "--output", str(out), "--device", "cpu"]
    assert main(argv) == 0
    assert (out / "case_0.nii.gz").read_bytes() == b"an earlier result"
    assert main([*argv, "--overwrite"]) == 0
    assert nib.load(str(out / "case_0.nii.gz")).shape == (20, 24, 16)


def test_predict_device_without_cuda_is_one_line(run, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    folder, data = run
    for device, words in (("cuda", "no CUDA device is available"), ("tpu9", "not a device")):
        code = main(["predict", "--run", str(folder), "--input", str(data / "imagesTr" / "case_0.nii.gz"),
                     "--output", str(tmp_path / "out"), "--device", device])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and f"--device {device}: {words}" in err, err


def test_spatial_augmentation_moves_image_and_label_together():
    label = torch.zeros(1, 24, 24, 24, dtype=torch.long)
    label[0, 4:14, 6:18, 8:16] = 1
    item = {"image": label.float() * 2 - 1, "label": label}
    cfg = DataConfig(patch_size=[24, 24, 24], affine_prob=1.0, rotate_deg=25, scale_range=0.2, flip_axes=[0, 1, 2],
                     intensity_aug=False, pos_fraction=1.0)
    transform = train_transforms(cfg)
    moved = 0
    for seed in range(6):
        transform.set_random_state(seed)
        out = transform(dict(item))
        out = out[0] if isinstance(out, list) else out
        image, lab = torch.as_tensor(out["image"])[0], torch.as_tensor(out["label"])[0]
        fg, bright = lab == 1, image > 0
        dice = 2 * (fg & bright).sum() / (fg.sum() + bright.sum())
        assert dice > 0.9, f"seed {seed}: image and label moved apart (Dice {dice:.2f})"
        moved += int(not torch.equal(lab, label[0]))
    assert moved >= 4, "the augmentation changed the geometry"


def test_translate_places_a_small_case_anywhere_within_its_shift_range_and_moves_the_label_too():
    """A case smaller than the patch is centred in it by the plain sampler (one position); data.translate: 2
    moves image and label together by every whole shift in -2 … 2 along each axis, nothing else."""
    image = torch.zeros(1, 8, 8, 8)
    image[0, 3, 4, 2] = 1.0
    item = {"image": image, "label": image.long()}
    positions = {}
    for translate in (0, 2):
        transform = train_transforms(DataConfig(patch_size=[12, 12, 12], flip_axes=[], intensity_aug=False,
                                                translate=translate))
        transform.set_random_state(0)
        seen = set()
        for _ in range(300):
            out = transform(dict(item))
            out = out[0] if isinstance(out, list) else out
            patch, label = torch.as_tensor(out["image"]), torch.as_tensor(out["label"])
            assert patch.shape == (1, 12, 12, 12) and torch.equal(patch.long(), label)
            seen.add(tuple(torch.nonzero(patch[0])[0].tolist()))
        positions[translate] = seen
    assert positions[0] == {(5, 6, 4)}, "centred: 2 voxels of padding before each axis"
    shifts = {(x - 5, y - 6, z - 4) for x, y, z in positions[2]}
    assert all(max(map(abs, d)) <= 2 for d in shifts), "no shift beyond 2 voxels"
    assert [{d[a] for d in shifts} for a in range(3)] == [set(range(-2, 3))] * 3, "every shift along every axis"
    assert len(shifts) > 50, "the axes are shifted independently"
    flat = train_transforms(DataConfig(patch_size=[12, 12, 1], flip_axes=[], intensity_aug=False, translate=2))
    flat.set_random_state(0)
    for _ in range(20):  # a one-voxel axis (a 2D image as a volume) is never shifted off its only slice
        out = flat({"image": image[:, :, :, 2:3].clone(), "label": image[:, :, :, 2:3].long()})
        assert torch.as_tensor((out[0] if isinstance(out, list) else out)["image"]).sum() == 1


def test_intensity_presets_and_their_keys():
    rng = np.random.default_rng(0)
    image = torch.zeros(1, 10, 10, 10)
    image[0, 2:8, 2:8, 2:8] = torch.from_numpy(rng.normal(100, 20, (6, 6, 6)).astype(np.float32))
    nonzero = normalize_intensity(image.clone(), DataConfig(preset="mri", mri_nonzero=True))
    inside = nonzero[image != 0]
    assert float(inside.mean()) == pytest.approx(0.0, abs=1e-4) and float(inside.std(unbiased=False)) == \
        pytest.approx(1.0, abs=1e-3)
    assert torch.all(nonzero[image == 0] == 0), "mri_nonzero leaves the background at 0"
    whole = normalize_intensity(image.clone(), DataConfig(preset="mri"))
    assert float(whole.mean()) == pytest.approx(0.0, abs=1e-4) and float(whole[image == 0][0]) < -0.5
    pct = normalize_intensity(image.clone(), DataConfig(preset="mri", mri_norm="percentile",
                                                        mri_percentiles=[10.0, 90.0]))
    low, high = np.percentile(image.numpy(), [10, 90])
    expected = np.clip((image.numpy() - low) / (high - low), 0, 1)
    np.testing.assert_allclose(pct.numpy(), expected, atol=1e-5)
    assert float(pct.min()) == 0.0 and float(pct.max()) == 1.0


def test_training_patches_without_intensity_augmentation_are_crops_of_the_image():
    image = torch.rand(1, 20, 20, 20)
    label = (image > 0.5).long()
    cfg = DataConfig(patch_size=[8, 8, 8], flip_axes=[], intensity_aug=False)
    out = train_transforms(cfg)({"image": image, "label": label})
    patch = torch.as_tensor((out[0] if isinstance(out, list) else out)["image"])
    assert set(patch.flatten().tolist()) <= set(image.flatten().tolist())
    cfg_aug = DataConfig(patch_size=[8, 8, 8], flip_axes=[], intensity_aug=True)
    changed = 0
    for seed in range(5):
        transform = train_transforms(cfg_aug)
        transform.set_random_state(seed)
        out = transform({"image": image, "label": label})
        patch = torch.as_tensor((out[0] if isinstance(out, list) else out)["image"])
        changed += int(not set(patch.flatten().tolist()) <= set(image.flatten().tolist()))
    assert changed >= 1, "intensity_aug: true changes intensities"


def test_nnunet_intensity_scheme_is_nnunets_set_at_its_probabilities():
    """data.intensity_scheme: nnunet is nnU-Net v2's default intensity augmentation, in its order and at
    its probabilities, and the two gamma transforms keep the patch's mean and standard deviation
    (nnU-Net's retain_stats)."""
    chain = intensity_transforms("nnunet")
    names = [type(t).__name__ for t in chain]
    assert names == ["RandGaussianNoised", "RandGaussianSmoothd", "RandScaleIntensityd", "RandScaleIntensityFixedMeand",
                     "RandSimulateLowResolutiond", "RandAdjustContrastd", "RandAdjustContrastd"]
    assert [t.prob for t in chain] == [0.1, 0.2, 0.15, 0.15, 0.25, 0.1, 0.3]
    image = torch.randn(1, 12, 12, 12) * 2 + 1
    for gamma in chain[5:]:
        gamma.prob = 1.0
        gamma.set_random_state(3)
        out = torch.as_tensor(gamma({"image": image.clone()})["image"])
        assert not torch.allclose(out, image)
        assert float(out.mean()) == pytest.approx(float(image.mean()), abs=1e-3)
        assert float(out.std()) == pytest.approx(float(image.std()), rel=1e-3)
    assert [type(t).__name__ for t in intensity_transforms("light")] == [
        "RandScaleIntensityd", "RandShiftIntensityd", "RandGaussianNoised", "RandAdjustContrastd"]
    with pytest.raises(ConfigError, match="data.intensity_scheme' must be one of light, nnunet"):
        load_config(None, ["data.intensity_scheme=heavy"])


def test_air_crop_keeps_the_box_plus_margin():
    array = np.zeros((1, 30, 30, 20), np.float32)
    array[0, 10:15, 8:20, 5:9] = 100.0
    volume = type("V", (), {"affine": np.eye(4), "spatial_shape": (30, 30, 20), "array": array,
                            "spacing": (1.0, 1.0, 1.0)})()
    grid = grid_map(volume, DataConfig(crop_air=0.5, crop_margin=3))
    assert grid.crop == ((7, 18), (5, 23), (2, 12))
    assert grid.model_shape == (11, 18, 10)
    assert grid_map(volume, DataConfig(crop_air=0.5, crop_margin=0)).crop == ((10, 15), (8, 20), (5, 9))
    assert grid_map(volume, DataConfig()).crop is None
    uncut = GridMap((30, 30, 20), np.array([[0, 1], [1, 1], [2, 1]]), (30, 30, 20), (11, 18, 10),
                    ((7, 18), (5, 23), (2, 12))).uncut(torch.ones(1, 11, 18, 10))
    assert int(uncut.sum()) == 11 * 18 * 10 and uncut[0, 6, 5, 2] == 0 and uncut[0, 7, 5, 2] == 1


def test_pairs_layout_with_named_image_and_label_folders(tmp_path):
    for folder in ("scans", "truth", "images"):
        (tmp_path / folder).mkdir()
    for i in range(3):
        save_nifti(tmp_path / "scans" / f"p{i}.nii.gz", np.random.default_rng(i).random((6, 6, 4)).astype(np.float32))
        save_nifti(tmp_path / "truth" / f"p{i}.nii.gz", (np.arange(144).reshape(6, 6, 4) % 2).astype(np.uint8))
    save_nifti(tmp_path / "images" / "decoy.nii.gz", np.ones((6, 6, 4), np.float32))  # a common name, not chosen
    cfg = DataConfig(layout="pairs", image_dir="scans", label_dir="truth", labels={0: "bg", 1: "fg"})
    catalog = find_cases(tmp_path, cfg)
    assert [c.case_id for c in catalog.cases] == ["p0", "p1", "p2"]
    assert all(c.images[0].parent.name == "scans" and c.label.parent.name == "truth" for c in catalog.cases)


def test_window_blend_and_roi_size():
    calls = []

    def fn(x):
        calls.append(tuple(x.shape[2:]))
        return torch.full((x.shape[0], 1, *x.shape[2:]), float(len(calls)))  # each window its own constant

    image = torch.zeros(1, 1, 12, 8, 8)
    constant = make_window(InferConfig(blend="constant", sw_batch_size=1, overlap=0.5), [8, 8, 8])(fn, image)
    assert set(calls) == {(8, 8, 8)} and len(calls) == 2  # windows at x = 0 and 4 (scan interval 4)
    # constant blending: where the two windows overlap (x = 4 … 7), the plain mean of their values
    assert [float(constant[0, 0, x, 0, 0]) for x in (0, 5, 10)] == pytest.approx([1.0, 1.5, 2.0])
    calls.clear()
    gaussian = make_window(InferConfig(blend="gaussian", sw_batch_size=1, overlap=0.5), [8, 8, 8])(fn, image)
    assert not torch.allclose(gaussian, constant), "gaussian blending weighs window centres more"
    calls.clear()
    make_window(InferConfig(roi_size=[4, 4, 4], sw_batch_size=1, overlap=0.0), [8, 8, 8])(fn, image)
    assert set(calls) == {(4, 4, 4)} and len(calls) == 3 * 2 * 2, "infer.roi_size wins over data.patch_size"


def test_poly_schedule_and_constant():
    cfg = load_config(None, ["train.scheduler=poly", "train.max_steps=100", "train.lr=1.0", "train.min_lr=0.0"]).train
    for step in (0, 30, 75):
        assert lr_factor(cfg, step, 0.0) == pytest.approx((1 - step / 100) ** 0.9)
    cfg.min_lr = 0.05
    assert lr_factor(cfg, 99, 0.0) == pytest.approx(0.05), "poly never goes below min_lr"
    cfg.scheduler = "constant"
    assert lr_factor(cfg, 99, 0.0) == 1.0


def test_grad_clip_and_weight_decay_reach_the_optimiser(msd_dataset, tmp_path, monkeypatch):
    from imgx3d.training.trainer import Trainer
    from imgx3d.training.workflow import train_run

    norms, decays = [], []
    real_clip, real_step = torch.nn.utils.clip_grad_norm_, Trainer.step

    def clip(params, max_norm, *args, **kwargs):
        params = list(params)
        total = real_clip(params, max_norm, *args, **kwargs)
        after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        norms.append((float(total), float(after), max_norm))
        return total

    def step(self, batch):
        decays.extend(g["weight_decay"] for o in self.optimizers.values() for g in o.param_groups)
        return real_step(self, batch)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    monkeypatch.setattr(Trainer, "step", step)
    cfg = load_config(None, ["method.name=unet", "tracking.enabled=false", *TINY_OVERRIDES, "train.max_steps=3",
                             "train.grad_clip=0.01", "train.weight_decay=0.123", "train.lr=0.1"])
    train_run(cfg, msd_dataset, tmp_path / "r", test_at_end=False)
    assert len(norms) == 3 and all(m == 0.01 for _, _, m in norms)
    assert all(total > 0.01 and after == pytest.approx(0.01, rel=1e-3) for total, after, _ in norms)
    assert decays and set(decays) == {0.123}
    norms.clear()
    cfg.train.grad_clip = 0.0
    train_run(cfg, msd_dataset, tmp_path / "off", test_at_end=False)
    assert norms == [], "grad_clip: 0 turns clipping off"


BAD_VALUES = [
    ("data.mode=slices", "data.mode"), ("data.color=cmyk", "data.color"), ("data.layout=bids", "data.layout"),
    ("data.preset=pet", "data.preset"), ("data.crop_air=1.5", "data.crop_air"), ("data.crop_margin=-1", "data.crop_margin"),
    ("data.mri_norm=minmax", "data.mri_norm"), ("data.ct_window=[300,-100]", "data.ct_window"),
    ("data.patch_size=[16,16]", "data.patch_size"), ("data.patch_size=[16,0,16]", "data.patch_size"),
    ("data.slices.axis=3", "data.slices.axis"), ("data.slices.size=[32]", "data.slices.size"),
    ("data.slices.keep_empty=2", "data.slices.keep_empty"), ("data.slices.percentiles=[90,10]", "data.slices.percentiles"),
    ("data.slices.predict_batch=0", "data.slices.predict_batch"), ("data.spacing=[1,1,0]", "data.spacing"),
    ("data.batch_size=0", "data.batch_size"), ("data.extra_fraction=1.5", "data.extra_fraction"),
    ("data.flip_axes=[3]", "data.flip_axes"), ("data.affine_prob=-0.1", "data.affine_prob"),
    ("data.scale_range=1.0", "data.scale_range"), ("data.num_workers=-1", "data.num_workers"),
    ("data.split.test_fraction=1.0", "data.split.test_fraction"), ("data.split.val_fraction=-0.1", "data.split.val_fraction"),
    ("data.split.folds=1", "data.split.folds"), ("data.split.max_train=-2", "data.split.max_train"),
    ("data.label_map={0: 1, 255: 1}", "data.label_map"),
    ("train.max_steps=0", "train.max_steps"), ("train.max_minutes=-1", "train.max_minutes"),
    ("train.optimizer=lion", "train.optimizer"), ("train.betas=[0.9,1.0]", "train.betas"), ("train.lr=0", "train.lr"),
    ("train.scheduler=step", "train.scheduler"), ("train.schedule_over=epochs", "train.schedule_over"),
    ("train.budget_clock=gpu", "train.budget_clock"), ("train.amp=maybe", "train.amp"),
    ("train.val_every=0", "train.val_every"), ("train.checkpoint_every=0", "train.checkpoint_every"),
    ("train.patience=-1", "train.patience"), ("infer.overlap=1.0", "infer.overlap"),
    ("infer.sw_batch_size=0", "infer.sw_batch_size"), ("infer.blend=median", "infer.blend"),
    ("infer.tta_shifts=0", "infer.tta_shifts"), ("data.translate=-1", "data.translate"),
    ("infer.streaming=maybe", "infer.streaming"), ("infer.roi_size=[8,8]", "infer.roi_size"),
    ("train.precision=fp8", "train.precision"), ("infer.precision=int8", "infer.precision"),
    ("data.cache_gib=-1", "data.cache_gib"), ("train.ema=1.0", "train.ema"), ("train.ema_start=-1", "train.ema_start"),
    ("train.plateau_factor=1.0", "train.plateau_factor"), ("train.plateau_patience=-1", "train.plateau_patience"),
]


@pytest.mark.parametrize("override, key", BAD_VALUES, ids=[k for _, k in BAD_VALUES])
def test_out_of_range_config_values_name_their_key(override, key):
    with pytest.raises(ConfigError, match=f"config key '{re.escape(key)}(\\[\\d+\\])?'"):  # a list's item by index
        load_config(None, [override])


def test_evaluate_labels_nsd_tolerance_and_overlays(tmp_path, capsys):
    ref = np.zeros((16, 16, 8), np.uint8)
    ref[3:9, 3:9, 2:6] = 1
    ref[10:14, 10:14, 2:6] = 2
    pred = ref.copy()
    pred[3:9, 3:9, 6] = 1  # one extra slice of class 1, 2 mm away (z spacing 2)
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    save_nifti(tmp_path / "ref" / "c.nii.gz", ref, affine)
    save_nifti(tmp_path / "pred" / "c.nii.gz", pred, affine)
    save_nifti(tmp_path / "img" / "c.nii.gz", ref.astype(np.float32) * 10, affine)
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"), "--labels", "1",
                 "--output", str(tmp_path / "only1")]) == 0
    rows = (tmp_path / "only1" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("c,1,label_1,")
    nsd = {}
    for tolerance in ("1", "2.5"):
        assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"), "--labels", "1",
                     "--nsd-tolerance", tolerance, "--output", str(tmp_path / tolerance)]) == 0
        nsd[tolerance] = float((tmp_path / tolerance / "metrics.csv").read_text().splitlines()[1].split(",")[-1])
    assert nsd["1"] < 1.0 and nsd["2.5"] == 1.0, "a 2 mm surface error is inside 2.5 mm, not inside 1 mm"
    capsys.readouterr()
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"), "--overlay",
                 str(tmp_path / "ov"), "--images", str(tmp_path / "img"), "--output", str(tmp_path / "all")]) == 0
    assert "1 overlay(s)" in capsys.readouterr().out
    from PIL import Image

    picture = np.asarray(Image.open(tmp_path / "ov" / "c.png").convert("RGB"))
    assert picture.std() > 10, "a montage with image and contours, not a blank page"


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> str:
    """Two finished U-Net runs (different seeds) with test metrics in experiment 'opts'."""
    root = tmp_path_factory.mktemp("experiment")
    data = write_msd_dataset(root / "msd")
    config = root / "cfg.yaml"
    config.write_text("dataset: opts\nmethod: {name: unet}\n")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    for seed in (0, 1):
        assert main(["train", "--config", str(config), "--data", str(data), "--run-dir", str(root / f"s{seed}"),
                     "--tracking-uri", uri, "--seed", str(seed), *TINY_OVERRIDES]) == 0
    return uri


def test_compare_runs_metric_hd95_and_by_method(experiment, tmp_path, capsys):
    client = MlflowClient(tracking_uri=experiment)
    runs = client.search_runs([client.get_experiment_by_name("opts").experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    assert set(by_name) == {"s0", "s1"}
    assert main(["compare", "--tracking-uri", experiment, "--experiment", "opts", "--runs", "s1", "--metric", "hd95",
                 "--no-log", "--output", str(tmp_path / "one")]) == 0
    table = (tmp_path / "one" / "table.md").read_text(encoding="utf-8")
    assert "| s1 |" in table and "| s0 |" not in table and "hd95" in table
    capsys.readouterr()
    assert main(["compare", "--tracking-uri", experiment, "--experiment", "opts", "--metric", "hd95", "--no-log",
                 "--output", str(tmp_path / "both")]) == 0
    lines = (tmp_path / "both" / "table.md").read_text(encoding="utf-8").split("\n\n")[0].splitlines()  # the table, not the tests
    column = [c.strip() for c in lines[0].split("|")].index("hd95 mean")
    rows = [line for line in lines if line.startswith("| s")]
    hd95 = {r.info.run_name: r.data.metrics["test/hd95_mean"] for r in runs}
    assert hd95["s0"] != hd95["s1"], "two seeds, two HD95 means"
    lower = min(hd95, key=hd95.get)  # lower is better: the smaller HD95 mean is the bold one
    mean_cells = {row.split("|")[1].strip(): row.split("|")[column].strip() for row in rows}
    assert mean_cells[lower].startswith("**") and not mean_cells[max(hd95, key=hd95.get)].startswith("**")
    assert main(["compare", "--tracking-uri", experiment, "--experiment", "opts", "--by", "method", "--no-log",
                 "--output", str(tmp_path / "method")]) == 0
    best = max(runs, key=lambda r: r.data.metrics["val/best_dice_mean"]).info.run_name
    method_rows = [line for line in (tmp_path / "method" / "table.md").read_text(encoding="utf-8").split("\n\n")[0].splitlines()
                   if line.startswith("| s")]
    assert len(method_rows) == 1 and method_rows[0].startswith(f"| {best} |"), "one row per method: best validation"


def test_compare_errors_are_one_line(experiment, tmp_path, capsys):
    MlflowClient(tracking_uri=experiment).create_experiment("empty")
    for argv, words in ((["--experiment", "nope"], "experiment 'nope' not found"),
                        (["--experiment", "empty"], "experiment 'empty' has no finished runs with test metrics"),
                        (["--experiment", "opts", "--runs", "s0", "ghost"], "run 'ghost' is not a finished run")):
        code = main(["compare", "--tracking-uri", experiment, *argv, "--no-log", "--output", str(tmp_path / "x")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and words in err, err


def test_synth_refuses_a_foreign_folder_and_its_seed_changes_the_pairs(msd_dataset, tmp_path, capsys):
    from tests.test_pig import SLICES, TINY_CLI

    configs = Path(__file__).resolve().parents[1] / "configs"
    assert main(["train", "--config", str(configs / "hippocampus" / "pig.yaml"), "--data", str(msd_dataset),
                 "--run-dir", str(tmp_path / "pig"), "--no-track", *TINY_CLI, *SLICES, "train.max_steps=2",
                 "train.val_every=2"]) == 0
    foreign = tmp_path / "my_data"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    common = ["synth", "--run", str(tmp_path / "pig"), "--n", "2", "--batch", "2", "--steps", "2"]
    capsys.readouterr()
    assert main([*common, "--output", str(foreign)]) == 2
    assert f"{foreign}: not empty and not an imgx3d synth folder" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["precious.txt"]

    def pairs(seed: int) -> bytes:
        out = tmp_path / f"seed{seed}"
        assert main([*common, "--seed", str(seed), "--output", str(out)]) == 0
        return np.asarray(nib.load(str(out / "imagesTr" / "synth_00000.nii.gz")).dataobj).tobytes()

    assert pairs(0) != pairs(1)
    shutil.rmtree(tmp_path / "seed0")
    assert pairs(0) == pairs(0 + 0), "the same seed writes the same pair"


def test_a_nan_loss_is_one_line_naming_the_step_and_the_fix(msd_dataset, tmp_path, monkeypatch, capsys):
    from imgx3d.methods.unet import UNetMethod

    real = UNetMethod.training_step

    def nan_at_step_2(self, batch, step):
        out = real(self, batch, step)
        return {**out, "loss/model": out["loss/model"] * float("nan")} if step == 2 else out

    monkeypatch.setattr(UNetMethod, "training_step", nan_at_step_2)
    config = tmp_path / "cfg.yaml"
    config.write_text("method: {name: unet}\n")
    code = main(["train", "--no-track", "--config", str(config), "--data", str(msd_dataset), "--run-dir",
                 str(tmp_path / "run"), *TINY_OVERRIDES])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "loss/model is nan at step 2" in err and "lower train.lr" in err



def test_predict_window_flags_and_inference_precision_reach_the_network(run, tmp_path, monkeypatch):
    from imgx3d.methods.unet import UNetMethod

    seen = []
    real_predict = UNetMethod.predict
    real_window = infer.make_window

    def window(cfg, patch, *devices):
        seen.append(("window", cfg.sw_batch_size, cfg.overlap))
        return real_window(cfg, patch, *devices)

    def predict(self, volume, win):
        seen.append(("autocast", torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return real_predict(self, volume, win)

    monkeypatch.setattr(infer, "make_window", window)
    monkeypatch.setattr(UNetMethod, "predict", predict)
    folder, data = run
    image = data / "imagesTr" / "case_0.nii.gz"
    assert main(["predict", "--run", str(folder), "--input", str(image), "--output", str(tmp_path / "a"),
                 "--sw-batch-size", "3", "--overlap", "0.25", "--precision", "bf16"]) == 0
    assert seen == [("window", 3, 0.25), ("autocast", True, torch.bfloat16)]
    for cpu_bf16, autocast in ((False, False), (True, True)):
        seen.clear()
        monkeypatch.setattr(resources, "cpu_computes_bf16", lambda answer=cpu_bf16: answer)
        assert main(["predict", "--run", str(folder), "--input", str(image), "--output",
                     str(tmp_path / f"b{cpu_bf16}")]) == 0
        assert seen[1][1] is autocast, "auto on the CPU: bf16 autocast where it has bf16 instructions, else fp32"
    assert main(["predict", "--run", str(folder), "--input", str(image), "--output", str(tmp_path / "c"),
                 "--overlap", "1.5"]) == 2


def test_on_cuda_windows_go_to_the_device_and_the_volume_stays_on_the_host(run, monkeypatch):
    """Large outputs on the host, windows on the GPU (MONAI's ``sw_device`` / ``device``), also in validation."""
    from imgx3d.inference.predictor import Predictor

    folder, _ = run
    predictor = Predictor.load(folder / "best.pt", device="cpu")
    calls = []
    real_window = infer.make_window

    def window(cfg, patch, sw_device=None, output_device=None):
        calls.append((sw_device, output_device))
        return real_window(cfg, patch)  # run on the CPU: this machine has no GPU

    monkeypatch.setattr(infer, "make_window", window)
    image = torch.rand(1, 20, 24, 16)
    predictor.model_space_classes(image)
    assert calls == [(None, None)], "CPU: the plain window"
    predictor.device = torch.device("cuda", 0)
    monkeypatch.setattr(infer, "choose_precision", lambda setting, device: None)
    predictor.model_space_classes(image)
    assert calls[1] == (torch.device("cuda", 0), torch.device("cpu"))


def test_train_device_flag_sets_train_device(msd_dataset, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    config = tmp_path / "cfg.yaml"
    config.write_text("method: {name: unet}\n")
    code = main(["train", "--no-track", "--config", str(config), "--data", str(msd_dataset), "--device", "cuda",
                 *TINY_OVERRIDES])
    err = capsys.readouterr().err
    assert code == 2 and "train.device cuda: no CUDA device is available here" in err, err
    assert main(["train", "--no-track", "--config", str(config), "--data", str(msd_dataset), "--device", "cpu",
                 "--run-dir", str(tmp_path / "r"), *TINY_OVERRIDES]) == 0
    assert "device: cpu" in (tmp_path / "r" / "config.yaml").read_text()


def test_plateau_schedule_cuts_the_lr_after_patience_bad_validations_and_keeps_its_state(msd_dataset, tmp_path,
                                                                                 monkeypatch):
    from imgx3d.training.trainer import Trainer
    from imgx3d.training.workflow import train_run

    scores = iter([0.5, 0.4, 0.3, 0.6, 0.2, 0.1])
    lrs = []
    real_step = Trainer.step
    monkeypatch.setattr(Trainer, "validate", lambda self, cases, labels: {"val/dice_mean": next(scores)})
    monkeypatch.setattr(Trainer, "step", lambda self, batch: (out := real_step(self, batch), lrs.append(out["lr"]))[0])
    cfg = load_config(None, ["method.name=unet", "tracking.enabled=false", *TINY_OVERRIDES, "train.scheduler=plateau",
                             "train.plateau_patience=1", "train.plateau_factor=0.25", "train.lr=0.01",
                             "train.val_every=1", "train.checkpoint_every=1"])
    train_run(cfg, msd_dataset, tmp_path / "r", test_at_end=False)
    # best 0.5; 0.4 and 0.3 are two bad validations (> patience 1): x 1/4; 0.6 is a new best; 0.2, 0.1: x 1/4 again
    assert lrs == pytest.approx([0.01, 0.01, 0.01, 0.0025, 0.0025, 0.0025])
    last = torch.load(tmp_path / "r" / "last.pt", weights_only=False)
    assert last["train_state"]["lr_scale"] == pytest.approx(1 / 16) and last["plateau"]["num_bad_epochs"] == 0
