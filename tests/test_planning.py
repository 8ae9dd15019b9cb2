"""Fingerprints of datasets with known statistics, and the planner's decisions with exact expectations."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from imgx3d.planning.fingerprint import (
    CaseStats,
    ChannelStats,
    ClassStats,
    Fingerprint,
    fingerprint,
)
from imgx3d.errors import ResourceError
from imgx3d.methods.base import build_method
from imgx3d.planning.planner import (
    ENOUGH_STEPS,
    FULL_RES_FEATURES,
    CandidateTooLarge,
    mirror_axes,
    plan,
    shrink_patch,
    target_spacing,
    topology,
)


def _write_dataset(root, shapes, spacing, modality="MRI", value=100.0, background=0.0, seed=0):
    """An MSD dataset whose foreground (label 1: a box) holds ``value`` + noise of std 1 on ``background``."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for i, shape in enumerate(shapes):
        label = np.zeros(shape, np.uint8)
        box = tuple(slice(s // 4, s // 4 + max(1, s // 2)) for s in shape)
        label[box] = 1
        image = np.full(shape, background, np.float32)
        image[box] = value + rng.normal(size=label[box].shape)
        affine = np.diag([*spacing, 1.0])
        nib.save(nib.Nifti1Image(image, affine), str(root / "imagesTr" / f"c{i}.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine), str(root / "labelsTr" / f"c{i}.nii.gz"))
        training.append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"name": root.name, "modality": {"0": modality},
                                                   "labels": {"0": "background", "1": "box"},
                                                   "training": training}))
    return root


def test_fingerprint_measures_known_statistics_and_is_cached_outside_the_dataset(tmp_path):
    root = _write_dataset(tmp_path / "ds", [(20, 16, 12), (24, 16, 10), (22, 18, 12)], (0.8, 0.8, 2.5))
    fp = fingerprint(root, cache_dir=tmp_path / "plan")
    assert fp.modality == "MRI" and len(fp.cases) == 3
    np.testing.assert_allclose(np.median(fp.spacings, axis=0), [0.8, 0.8, 2.5], atol=1e-6)
    assert [c.shape for c in fp.cases] == [[20, 16, 12], [24, 16, 10], [22, 18, 12]]
    ch = fp.channels[0]
    assert abs(ch.mean - 100.0) < 0.1 and abs(ch.std - 1.0) < 0.1, "foreground voxels only: value + N(0, 1)"
    assert 96.5 < ch.p00_5 < 98.0 and 102.0 < ch.p99_5 < 103.5, "the normal's 0.5 / 99.5 percentiles: ±2.58"
    (box,) = fp.classes
    # boxes 10 x 8 x 6, 12 x 8 x 5, 11 x 9 x 6: medians per axis and of the counts (480, 480, 594)
    assert box.cases == 3 and box.bbox_median == [11.0, 8.0, 6.0] and box.voxels_median == 480
    assert (tmp_path / "plan" / "fingerprint.json").is_file() and not (root / "fingerprint.json").exists()
    assert fingerprint(root, cache_dir=tmp_path / "plan") == fp, "read back from the cache"


def test_ct_is_recognised_by_its_hounsfield_units_whatever_the_name(tmp_path):
    root = _write_dataset(tmp_path / "ds", [(16, 16, 8)] * 2, (1.0, 1.0, 1.0), modality="scan", value=40.0,
                          background=-1000.0)
    # the box is soft tissue at 40 HU; add air inside the label so the foreground spans below -500
    for path in sorted((root / "labelsTr").glob("*.nii.gz")):
        label = np.asarray(nib.load(str(path)).dataobj).copy()
        label[0:2, 0:2, 0:2] = 1
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(path))
    for path in sorted((root / "imagesTr").glob("*.nii.gz")):
        image = np.asarray(nib.load(str(path)).dataobj).copy()
        image[4:8, 4:8, 2:4] = 300.0  # bone-ish inside the box
        nib.save(nib.Nifti1Image(image, np.eye(4)), str(path))
    assert fingerprint(root).modality == "CT"


def _fp(spacings, shapes, modality="MRI", nonzero=1.0):
    cases = [CaseStats(f"c{i}", list(sh), list(sp), "RAS", nonzero) for i, (sp, sh) in enumerate(zip(spacings, shapes))]
    return Fingerprint("synthetic", modality, cases, [ChannelStats("ch", 0.0, 1.0, -900.0, 1200.0, -1000, 2000)],
                       [ClassStats(1, "a", len(cases), 100.0, [5.0, 5.0, 5.0])])


def test_target_spacing_is_the_median_and_the_10th_percentile_on_an_anisotropic_axis():
    iso = _fp([(1.0, 1.0, 1.0), (1.2, 1.2, 1.2), (0.8, 0.8, 0.8)], [(100, 100, 100)] * 3)
    np.testing.assert_allclose(target_spacing(iso)[0], [1.0, 1.0, 1.0])
    # cardiac cine-like: 1.5 mm in-plane, 6-10 mm slices, ~10 slices
    spacings = [(1.5, 1.5, z) for z in (6.0, 7.0, 8.0, 9.0, 10.0)]
    aniso = _fp(spacings, [(200, 200, 10)] * 5)
    spacing, why = target_spacing(aniso)
    np.testing.assert_allclose(spacing, [1.5, 1.5, np.percentile([6, 7, 8, 9, 10], 10)])
    assert "anisotropic" in why


@pytest.mark.parametrize("patch, spacing, strides, kernels, rounded", [
    # isotropic 35 x 50 x 36 at 1 mm (hippocampus): three poolings (the last one leaves >= 4 voxels)
    ([35, 50, 36], [1.0, 1.0, 1.0], [[2, 2, 2]] * 3, [[3, 3, 3]] * 4, [40, 56, 40]),
    # anisotropic 1.5 x 1.5 x 7 mm: z waits (kernel 1) until in-plane pooling has caught up
    ([200, 200, 10], [1.5, 1.5, 7.0], [[2, 2, 1], [2, 2, 1], [2, 2, 2], [2, 2, 1]],
     [[3, 3, 1], [3, 3, 1], [3, 3, 3], [3, 3, 3], [3, 3, 3]], [208, 208, 10]),
    # tiny volumes: no axis can be pooled twice
    ([12, 10, 9], [1.0, 1.0, 1.0], [[2, 2, 2]], [[3, 3, 3], [3, 3, 3]], [12, 10, 10]),
])
def test_topology_pools_each_axis_by_nnunet_rules(patch, spacing, strides, kernels, rounded):
    got_strides, got_kernels, got_patch = topology(np.array(patch), np.array(spacing))
    assert got_strides == strides and got_kernels == kernels and got_patch.tolist() == rounded


def _voxel_clock(timed):
    """A fake step timer: a step costs 2e-10 s per sample, voxel and squared width (a convolution's cost)."""

    def timer(cfg):
        timed.append((cfg.method.channels[0], cfg.data.batch_size, cfg.data.patch_size))
        return 2e-10 * cfg.method.channels[0] ** 2 * cfg.data.batch_size * np.prod(cfg.data.patch_size)

    return timer


def test_plan_decides_every_key_with_a_reason_and_fits_the_budget_with_a_step_timer():
    fp = _fp([(1.0, 1.0, 1.0)] * 3, [(35, 50, 36)] * 3)
    timed = []
    result = plan(fp, "unet", budget_minutes=1.0, step_timer=_voxel_clock(timed))
    cfg = result.config()
    # the patch 40 x 56 x 40 (89 600 voxels); width 16 batch 2 is the probe (0.0092 s); then largest first:
    # 32 x 4 = 0.073 s → 817 steps, under ENOUGH_STEPS / 2: not timed; 32 x 2 → 1634, 24 x 4 → 1453 (timed,
    # short), 24 x 2 = 0.0206 s → 2906 ≥ ENOUGH_STEPS: kept
    full = [40, 56, 40]
    assert timed == [(16, 2, full), (32, 2, full), (24, 4, full), (24, 2, full)]
    assert cfg.method.channels == [24, 48, 96, 192] and cfg.data.batch_size == 2
    assert cfg.data.spacing is None and cfg.data.patch_size == full and cfg.method.strides == [2, 2, 2]
    assert cfg.method.full_res_features == FULL_RES_FEATURES, "a full-resolution level on top of MONAI's UNet"
    net = build_method(cfg.method, 3, 1).net
    assert net(torch.zeros(1, 1, *full)).shape == (1, 3, *full)
    assert sum(isinstance(m, torch.nn.Conv3d) and m.stride == (1, 1, 1) and m.in_channels == 1 and
               m.out_channels == FULL_RES_FEATURES for m in net.modules()), "the first convolution keeps the full grid"
    assert cfg.data.preset == "mri" and cfg.data.mri_nonzero is False and 0.5 <= cfg.train.max_minutes <= 1.0
    assert all(d.reason for d in result.decisions)
    timed.clear()
    roomy = plan(fp, "unet", budget_minutes=60.0, step_timer=_voxel_clock(timed)).config()
    assert (roomy.method.channels[0], roomy.data.batch_size) == (32, 4), f"{ENOUGH_STEPS} steps reachable in 60 min"
    assert len(timed) == 2, "the probe, then the largest candidate: kept"


def test_a_budget_too_small_for_the_whole_patch_shrinks_it_and_predicted_hopeless_candidates_are_not_timed():
    fp = _fp([(1.0, 1.0, 1.0)] * 3, [(35, 50, 36)] * 3)
    timed = []
    kept = plan(fp, "unet", budget_minutes=0.2, step_timer=_voxel_clock(timed))
    # 12 s: the probe (width 16 batch 2 on the whole patch, 0.0092 s) makes 1306 steps: under ENOUGH_STEPS, over
    # CONTEXT_STEPS, so the whole patch stays (context over steps); every larger candidate is predicted under
    # ENOUGH_STEPS / 2 and not timed
    assert [t[:2] for t in timed] == [(16, 2)] and kept.config().data.patch_size == [40, 56, 40]
    assert "context over steps" in {d.key: d.reason for d in kept.decisions}["method.channels"]
    timed.clear()
    result = plan(fp, "unet", budget_minutes=0.02, step_timer=_voxel_clock(timed))
    cfg = result.config()
    # 1.2 s: 130 steps, under CONTEXT_STEPS; the patch shrinks to at most 0.9 x 89 600 x 130 / 250 voxels:
    # 32 x 56 x 40 → 32 x 48 x 40 → 32 x 48 x 32 → 32 x 40 x 32 (40 960), timed: 0.0042 s, 286 steps
    assert [t[:2] for t in timed] == [(16, 2), (16, 2)]
    assert cfg.data.patch_size == timed[-1][2] == [32, 40, 32]
    assert (cfg.method.channels[0], cfg.data.batch_size) == (16, 2)
    assert cfg.method.arch == "unet" and cfg.method.strides == [2, 2, 2]
    reasons = {d.key: d.reason for d in result.decisions}
    assert "shrunk by nnU-Net's rule" in reasons["data.patch_size"] and "not timed" in reasons["method.channels"]
    assert "286 steps" in reasons["data.patch_size"]
    assert sum(d.key == "data.patch_size" for d in result.decisions) == 1, "the shrunk patch replaced the decision"
    tiny = plan(fp, "unet", budget_minutes=0.002, step_timer=_voxel_clock([]))
    assert tiny.config().data.patch_size == [32, 32, 32], "a budget too small for context: the floor, fewer steps"
    assert "none reached" in {d.key: d.reason for d in tiny.decisions}["method.channels"]


def test_per_slice_plans_size_slices_by_the_methods_own_downsampling_and_time_their_batch():
    fp = _fp([(1.0, 1.0, 1.0)] * 3, [(35, 50, 36)] * 3)
    timed = []

    def timer(cfg):  # 0.05 s per slice of the main stage: 16 slices → 0.8 s, 2250 steps in 30 minutes
        timed.append((cfg.method.name, cfg.data.batch_size))
        return 0.05 * cfg.data.batch_size if cfg.method.name != "unet" else 0.01

    sdseg = plan(fp, "sdseg", 30.0, step_timer=timer).config()
    # the codec (f = 8) times the denoiser's two downsamplings (channels [64, 128, 256]): 32 → 35 x 50 → 64 x 64
    assert sdseg.data.slices.size == [64, 64] and sdseg.data.slices.axis == 2
    assert sdseg.data.batch_size == 16 and ("sdseg", 16) in timed
    pig = plan(fp, "pig", 15.0, step_timer=timer).config()  # pixel space, three levels: 4 → 36 x 52
    assert pig.data.slices.size == [36, 52]
    assert pig.data.batch_size == 8, "15 minutes: 16 slices reach 1125 steps, 8 reach 2250"


def test_shrink_patch_takes_the_axis_largest_relative_to_the_median_shape_first():
    median, spacing = np.array([35.0, 50.0, 36.0]), np.ones(3)
    # 40 x 56 x 40 → 32 x 56 x 40 → 32 x 48 x 40 → 32 x 48 x 32 → 32 x 40 x 32 (40 960 voxels <= 45 000)
    assert shrink_patch(np.array([40, 56, 40]), median, spacing, 45_000).tolist() == [32, 40, 32]
    assert shrink_patch(np.array([40, 56, 40]), median, spacing, 90_000).tolist() == [40, 56, 40]
    assert shrink_patch(np.array([40, 56, 40]), median, spacing, 1).tolist() == [32, 32, 32], "never below 32"
    brain = np.array([240.0, 240.0, 155.0])  # BraTS-like: the three axes shrink in turn, each by 16 (4 poolings)
    assert shrink_patch(np.array([240, 240, 160]), brain, spacing, 128**3).tolist() == [144, 144, 96]
    assert shrink_patch(np.array([24, 24, 20]), np.array([24.0, 24.0, 20.0]), spacing, 1).tolist() == [24, 24, 20], \
        "an axis already under 32 (its whole median extent) is kept"


def test_mirroring_keeps_the_axes_whose_mirror_would_swap_classes_named_by_position():
    assert mirror_axes(["necrosis", "edema"])[0] == [0, 1, 2]
    assert mirror_axes(["Anterior", "Posterior"])[0] == [0]
    assert mirror_axes(["kidney_left", "spleen"])[0] == [1, 2]
    assert mirror_axes(["lung_upper_lobe_left", "liver"])[0] == []


def test_the_budget_fit_skips_candidates_over_the_device_memory():
    """On CUDA the timer refuses a candidate whose peak memory is over the bound: the next one is timed."""
    fp = _fp([(1.0, 1.0, 1.0)] * 3, [(35, 50, 36)] * 3)

    def timer(cfg):  # only width 16 fits; every candidate is fast enough
        if cfg.method.channels[0] > 16:
            raise CandidateTooLarge(f"needs {cfg.method.channels[0]} GiB")
        return 0.01

    result = plan(fp, "unet", budget_minutes=30.0, step_timer=timer)
    cfg = result.config()
    assert (cfg.method.channels[0], cfg.data.batch_size) == (16, 4)
    reason = next(d.reason for d in result.decisions if d.key == "method.channels")
    assert "width 32 batch 4: needs 32 GiB" in reason and "width 24 batch 2: needs 24 GiB" in reason

    def nothing_fits(cfg):
        raise CandidateTooLarge("out of GPU memory")

    with pytest.raises(ResourceError, match="even the smallest plan does not fit"):
        plan(fp, "unet", budget_minutes=30.0, step_timer=nothing_fits)


def test_anisotropic_ct_plan_uses_dynunet_with_per_axis_kernels_and_builds():
    from imgx3d.methods.base import build_method

    fp = _fp([(0.8, 0.8, 5.0)] * 4, [(120, 120, 24)] * 4, modality="CT")
    cfg = plan(fp, "unet", budget_minutes=30.0, step_timer=lambda cfg: 0.01).config()
    assert cfg.data.preset == "ct" and cfg.data.ct_window == [-900.0, 1200.0]
    assert cfg.method.arch == "dynunet" and cfg.method.kernel_size[0] == [3, 3, 1]
    assert cfg.method.full_res_features == 0, "DynUNet's first level is at full resolution already"
    assert cfg.data.spacing == [0.8, 0.8, 5.0] or cfg.data.spacing is None
    method = build_method(cfg.method, 3, 1)
    import torch

    out = method.net(torch.zeros(1, 1, *cfg.data.patch_size))
    assert tuple(out.shape[2:]) == tuple(cfg.data.patch_size)


def test_train_without_a_config_plans_records_the_plan_and_predicts_on_the_native_grid(msd_dataset, tmp_path,
                                                                                         monkeypatch):
    """``imgx3d train --data DIR`` with no --config: fingerprint, plan (budget measured), train, and the
    run folder keeps plan.yaml and fingerprint.json; predictions keep the input's geometry."""
    from imgx3d.cli import main

    monkeypatch.chdir(tmp_path)  # plans/<dataset>/ (the fingerprint cache) goes here, not into the dataset
    run = tmp_path / "run"
    assert main(["train", "--volume", "--data", str(msd_dataset), "--run-dir", str(run), "--no-track",
                 "--budget", "0.2", "--device", "cpu", "train.max_steps=4", "train.val_every=2",
                 "train.checkpoint_every=2", "data.num_workers=0", "train.warmup_steps=0"]) == 0
    assert {"plan.yaml", "fingerprint.json", "config.yaml", "best.pt"} <= {p.name for p in run.iterdir()}
    assert (tmp_path / "plans" / "msd" / "fingerprint.json").is_file()
    assert not (msd_dataset / "fingerprint.json").exists()
    plan_text = (run / "plan.yaml").read_text(encoding="utf-8")
    assert "data.patch_size" in plan_text and "nnU-Net" in plan_text, "every decision with its reason"
    source = msd_dataset / "imagesTr" / "case_0.nii.gz"
    assert main(["predict", "--run", str(run), "--input", str(source), "--output", str(tmp_path / "pred"),
                 "--device", "cpu"]) == 0
    written, original = nib.load(str(tmp_path / "pred" / "case_0.nii.gz")), nib.load(str(source))
    assert written.shape == original.shape
    np.testing.assert_allclose(written.affine, original.affine)


def test_plan_command_prints_its_decisions_and_writes_a_loadable_config(msd_dataset, tmp_path, capsys, monkeypatch):
    from imgx3d.cli import main
    from imgx3d.config import load_config

    monkeypatch.chdir(tmp_path)
    assert main(["plan", "--data", str(msd_dataset), "--method", "imgx", "--budget", "0.1", "--device", "cpu",
                 "--output", str(tmp_path / "imgx.yaml")]) == 0
    out = capsys.readouterr().out
    assert "median spacing" in out and "method.channels" in out and "imgx" in out
    cfg = load_config(tmp_path / "imgx.yaml")
    assert cfg.method.name == "imgx" and cfg.method.strides and cfg.data.patch_size
    assert main(["plan", "--data", str(msd_dataset), "--budget", "soon"]) == 2, "a bad budget: one line, exit 2"


def _method_keys(tiny: dict) -> list[str]:
    return [f"method.{k}={json.dumps(v)}" for k, v in tiny.items() if k != "name"]


def _smoke_overrides() -> dict[str, list[str]]:
    from tests.test_pig import TINY as PIG
    from tests.test_sdseg import TINY_SDSEG
    from tests.test_siamese import TINY as SIAMESE

    slices = ["data.slices.size=[32,32]"]
    return {"imgx": ["method.channels=[4,8,16]", "method.num_res_units=0", "data.patch_size=[16,16,16]"],
            "sdseg": [k for k in TINY_SDSEG if not k.startswith("method.name")],
            "pig": [*_method_keys(PIG), *slices],
            "siamese": [*_method_keys(SIAMESE), *slices],
            "vae": ["method.codec.widths=[8,8,16,16]", "method.codec.norm_groups=8", *slices]}


@pytest.mark.parametrize("method", ["imgx", "sdseg", "pig", "siamese", "vae"])
def test_every_method_trains_from_a_plan(msd_dataset, tmp_path, method):
    """Short smoke runs: each method's plan (the U-Net's data section; 3D: its topology, 2D: the slice
    plan) loads, builds and trains; only the network widths are shrunk for the test."""
    from imgx3d.training.workflow import train_run

    result = plan(fingerprint(msd_dataset), method, 1.0, step_timer=lambda cfg: 0.01)
    cfg = result.config([*_smoke_overrides()[method], "tracking.enabled=false", "train.max_steps=2",
                         "train.val_every=2", "train.checkpoint_every=2", "train.max_minutes=0", "data.batch_size=2",
                         "data.num_workers=0", "train.warmup_steps=0", "train.val_cases=1"])
    assert cfg.method.name == method
    if method == "imgx":
        unet = plan(fingerprint(msd_dataset), "unet", 1.0, step_timer=lambda cfg: 0.01).config()
        assert unet.method.strides == result.config().method.strides, "ImgX keeps the U-Net's levels"
    run = train_run(cfg, msd_dataset, tmp_path / method, test_at_end=False)
    assert run.steps == 2 and (run.run_dir / "best.pt").is_file()


def test_case_folders_are_planned_with_their_reading_keys_and_a_config_over_a_plan_keeps_only_its_own_keys(
        tmp_path, monkeypatch, capsys):
    """``imgx3d plan`` reads a case-folder dataset with the ``data.*`` keys given on the command line (the
    plan carries them); a config extending a plan file keeps only its own keys over a fresh plan."""
    from imgx3d.cli import main
    from imgx3d.config import load_config, load_yaml
    from imgx3d.planning.resolve import resolve_plan

    rng = np.random.default_rng(0)
    root = tmp_path / "cases"
    for group, case in (("train", "p1"), ("train", "p2"), ("test", "p3")):
        label = np.zeros((20, 20, 16), np.uint8)
        label[5:12, 6:14, 4:10], label[8:10, 8:10, 6:8] = 2, 1
        for name, scale in (("Flair_x.nii.gz", 1.0), ("T1c_x.nii.gz", 5.0)):
            image = (scale * (rng.normal(size=label.shape) + label)).astype(np.float32)
            (root / group / case).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(image, np.eye(4)), str(root / group / case / name))
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(root / group / case / "OT.nii.gz"))
    monkeypatch.chdir(tmp_path)
    reading = ["data.layout=cases", "data.channels=[Flair*,T1c*]", "data.label_pattern=OT*",
               "data.labels={1: core, 2: edema}"]
    assert main(["plan", "--data", str(root), "--budget", "0.1", "--device", "cpu", "--output",
                 str(tmp_path / "plan.yaml"), *reading]) == 0
    assert "3 labelled cases, 2 channel(s) (Flair, T1c)" in capsys.readouterr().out
    planned = load_config(tmp_path / "plan.yaml")
    assert (planned.data.layout, planned.data.channels, planned.data.labels) == (
        "cases", ["Flair*", "T1c*"], {1: "core", 2: "edema"})
    assert planned.data.flip_axes == [0, 1, 2], "no class named by position: every axis mirrored"
    (tmp_path / "unet.yaml").write_text("extends: plan.yaml\ntrain:\n  lr: 0.0005\n", encoding="utf-8")
    assert load_yaml(tmp_path / "unet.yaml", above_plans=True) == {"train": {"lr": 0.0005}}
    shipped = load_config(tmp_path / "unet.yaml")
    assert shipped.train.lr == 0.0005 and shipped.data.layout == "cases" and 0.05 <= shipped.train.max_minutes <= 0.1
    # train --config unet.yaml --budget 0.05: a fresh plan, the file's own key on top
    tree = resolve_plan(str(root), None, "0.05", "cpu", str(tmp_path / "unet.yaml"), [])[0].tree
    assert tree["train"]["lr"] == 0.0005 and 0.025 <= tree["train"]["max_minutes"] <= 0.05
    assert tree["data"]["layout"] == "cases", "the reading keys came from the plan the file extends"


# the keys the budget fit measures on the machine at hand (a shrunk patch re-derives the topology)
MEASURED_KEYS = ("method.channels", "data.batch_size", "data.patch_size", "method.arch", "method.strides",
                 "method.kernel_size", "method.full_res_features",  # goes with the arch
                 "data.translate",  # goes with the patch (none where it was shrunk)
                 "train.max_minutes", "infer.tta_flips", "infer.tta_shifts")  # priced by measured prediction


@pytest.mark.parametrize("config, folder", [("hippocampus", "hippocampus"), ("brats", "brats2015")])
def test_shipped_plans_are_what_the_planner_makes_of_the_data_today(shared_data, tmp_path, config, folder):
    """configs/<dataset>/plan.yaml is ``imgx3d plan``'s output, not a hand edit gone stale: planned again
    from the data, every key but the measured ones is the same (a rule change must re-plan the file)."""
    from imgx3d.config import load_config, load_yaml, to_dict
    from imgx3d.planning import reading_config
    from imgx3d.planning.planner import _leaves

    shipped_file = Path(__file__).resolve().parents[1] / "configs" / config / "plan.yaml"
    header = yaml.safe_load(shipped_file.read_text(encoding="utf-8"))["planned"]
    fp = fingerprint(shared_data / folder, reading_config(load_yaml(shipped_file)), cache_dir=tmp_path)
    assert header["dataset"] == folder and header["cases"] == len(fp.cases)
    fresh = plan(fp, "unet", header["budget_minutes"], step_timer=lambda cfg: 0.01).config()
    shipped, now = dict(_leaves(to_dict(load_config(shipped_file)))), dict(_leaves(to_dict(fresh)))
    changed = {k: (shipped.get(k), now.get(k)) for k in set(shipped) | set(now)
               if shipped.get(k) != now.get(k) and not k.startswith(MEASURED_KEYS)}
    assert not changed, f"re-plan {shipped_file} with imgx3d plan (see its planned: header): {changed}"


def test_a_label_off_its_image_grid_is_refused_before_any_intensity_is_sampled(tmp_path):
    from imgx3d.errors import InputError

    root = _write_dataset(tmp_path / "ds", [(16, 16, 8)] * 2, (1.0, 1.0, 1.0))
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 6), np.uint8), np.eye(4)), str(root / "labelsTr" / "c1.nii.gz"))
    with pytest.raises(InputError, match=r"c1.nii.gz: label shape \(16, 16, 6\) differs from image"):
        fingerprint(root, cache_dir=tmp_path / "plan")
    assert not (tmp_path / "plan" / "fingerprint.json").exists()


@pytest.mark.parametrize("setting, autocast", [("fp32", None), ("bf16", torch.bfloat16)])
def test_the_step_timer_times_the_step_the_trainer_runs(monkeypatch, setting, autocast):
    """The planner's measured step runs in the run's precision, with the weights in the trainer's layout."""
    from imgx3d.config import load_config
    from imgx3d.methods.unet import UNetMethod
    from imgx3d.planning.planner import measured_step_seconds

    seen = []
    real_step = UNetMethod.training_step

    def step(self, batch, i):
        weight = next(p for p in self.parameters() if p.ndim == 5 and p.shape[1] > 1)
        seen.append((torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None,
                     weight.is_contiguous(memory_format=torch.channels_last_3d)))
        return real_step(self, batch, i)

    monkeypatch.setattr(UNetMethod, "training_step", step)
    cfg = load_config(None, ["method.name=unet", "method.channels=[4,8]", "method.strides=[2]",
                             "data.patch_size=[8,8,8]", "data.batch_size=1", f"train.precision={setting}"])
    assert measured_step_seconds("cpu")(cfg) > 0
    assert seen == [(autocast, True)] * 4


def test_a_cpu_time_budget_is_planned_on_cpu_time(monkeypatch):
    """train.budget_clock: cpu (runs sharing a machine) times the candidates on the process's CPU time, which
    other processes do not inflate; wall time otherwise (and always on a GPU)."""
    import time

    from imgx3d.planning.planner import planning_clock

    assert planning_clock("cpu", "cpu") is time.process_time
    assert planning_clock("wall", "cpu") is time.perf_counter
    monkeypatch.setattr("imgx3d.planning.planner.resolve_device", lambda device: torch.device("cuda"))
    assert planning_clock("cpu", "cuda") is time.perf_counter


def test_resolve_plans_on_the_budget_clock_the_overrides_set(tmp_path, monkeypatch):
    from imgx3d.planning import planner
    from imgx3d.planning.resolve import resolve_plan
    from tests.conftest import write_msd_dataset

    data = write_msd_dataset(tmp_path / "msd")
    seen = []

    def spy(fp, method, minutes, device, budget_clock="wall"):
        seen.append(budget_clock)
        raise KeyboardInterrupt  # stop before any measurement

    monkeypatch.setattr(planner, "plan", spy)
    for overrides, clock in ((["train.budget_clock=cpu"], "cpu"), ([], "wall")):
        with pytest.raises(KeyboardInterrupt):
            resolve_plan(data, "unet", "1m", "cpu", overrides=overrides, cache_dir=tmp_path / "plans")
        assert seen[-1] == clock

