"""The cascade (nnU-Net's 3d_lowres → 3d_cascade_fullres, ``data.cascade``): a low-resolution stage's
prediction, on the next stage's model grid, as extra input channels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from imgx3d.checkpoint import load_checkpoint
from imgx3d.cli import main
from imgx3d.config import DataConfig
from imgx3d.data.catalog import find_cases
from imgx3d.data.geometry import grid_map, image_to_model, to_native
from imgx3d.data.io import read_volume
from imgx3d.data.transforms import DegradePreviousStage, binary_morphology, train_transforms
from imgx3d.errors import CheckpointError
from imgx3d.inference.export import export_run
from imgx3d.inference.predictor import Predictor
from tests.conftest import TINY_OVERRIDES, write_msd_dataset


@pytest.fixture(scope="module")
def cascade_runs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(low-resolution run, cascade run, dataset): the blob dataset's LPS, anisotropic volumes, the first
    stage at twice the spacing, the second on the native grid with the first's prediction as input."""
    root = tmp_path_factory.mktemp("cascade")
    data = write_msd_dataset(root / "msd")
    config = root / "cfg.yaml"
    config.write_text("method: {name: unet}\n")
    common = ["train", "--no-track", "--config", str(config), "--data", str(data)]
    assert main([*common, "--run-dir", str(root / "lowres"), *TINY_OVERRIDES, "data.spacing=[2.0,2.0,3.0]",
                 "data.patch_size=[16,16,8]", "train.max_steps=12"]) == 0
    # the training cases left on disk and drawn by a loader worker: the stage's channels kept, not predicted there
    assert main([*common, "--run-dir", str(root / "cascade"), *TINY_OVERRIDES, f"data.cascade={root / 'lowres'}",
                 "data.cache_gib=0", "data.num_workers=1"]) == 0
    return root / "lowres", root / "cascade", data


def test_the_cascade_stores_its_first_stage_and_takes_one_channel_per_label(cascade_runs):
    lowres, cascade, _ = cascade_runs
    checkpoint = load_checkpoint(cascade)
    stage = checkpoint.previous_stage
    assert stage is not None and stage.config.data.spacing == [2.0, 2.0, 3.0], "the low-resolution run, inside"
    first = load_checkpoint(lowres).weights
    assert stage.weights.keys() == first.keys() and all(torch.equal(stage.weights[k], first[k]) for k in first)
    assert checkpoint.in_channels == 1 and checkpoint.network_in_channels == 3, "image + labels 1 and 2"
    predictor = Predictor.load(cascade, device="cpu")
    assert predictor.in_channels == 1 and predictor.method.in_channels == 3
    assert (cascade / "result.json").is_file(), "the test split was scored through the cascade"
    assert "cascade: the low-resolution stage predicted" in (cascade / "train.log").read_text()


def test_the_extra_channels_are_the_first_stages_labels_on_the_model_grid(cascade_runs):
    lowres, cascade, data = cascade_runs
    case = find_cases(data, load_checkpoint(cascade).config.data).cases[0]
    predictor = Predictor.load(cascade, device="cpu")
    model_case = predictor.read(case.images)
    image, channels = model_case.image[:1], model_case.image[1:]
    volume = read_volume(case.images[0])
    cfg = predictor.config.data
    assert torch.equal(image, image_to_model(volume.array[None], grid_map(volume, cfg), cfg)), \
        "the image is normalised as without a cascade: normalisation never sees the stage's channels"
    native = Predictor.load(lowres, device="cpu").predict_files(case.images).labels.array
    assert set(np.unique(native)) >= {1, 2}, "the first stage finds both labels (else the check is empty)"
    for value, channel in zip((1, 2), channels):
        assert set(torch.unique(channel).tolist()) <= {0.0, 1.0}
        back = to_native(channel[None], model_case.inverse.grid)[0].numpy()  # LPS file order, the way back
        np.testing.assert_array_equal(back > 0.5, native == value)


def test_the_prediction_reads_the_first_stages_channels(cascade_runs):
    _, cascade, data = cascade_runs
    predictor = Predictor.load(cascade, device="cpu")
    case = predictor.read(find_cases(data, predictor.config.data).cases[0].images)
    real = predictor.model_space_classes(case.image)
    blank = case.image.clone()
    blank[1:] = 0
    assert not torch.equal(real, predictor.model_space_classes(blank)), "the second stage depends on the first"


def test_predict_writes_labels_and_what_cannot_be_done_is_refused_in_one_line(cascade_runs, tmp_path, capsys):
    lowres, cascade, data = cascade_runs
    image = sorted((data / "imagesTs").glob("*.nii.gz"))[0] if (data / "imagesTs").is_dir() else \
        sorted((data / "imagesTr").glob("*.nii.gz"))[0]
    assert main(["predict", "--run", str(cascade), "--input", str(image), "--output", str(tmp_path / "out")]) == 0
    written = list((tmp_path / "out").glob("*.nii.gz"))
    assert len(written) == 1
    with pytest.raises(CheckpointError, match="cascade's second stage"):
        export_run(cascade, "torchscript", tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="cannot be ensembled yet"):
        Predictor.load([cascade, cascade], device="cpu")


def test_a_first_stage_that_trained_on_this_runs_test_cases_is_refused(cascade_runs, tmp_path, capsys):
    lowres, _, data = cascade_runs
    config = tmp_path / "cfg.yaml"
    config.write_text("method: {name: unet}\n")
    code = main(["train", "--no-track", "--config", str(config), "--data", str(data), "--run-dir", str(tmp_path / "r"),
                 *TINY_OVERRIDES, f"data.cascade={lowres}", "data.split.seed=7"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and "trained on" in err[-1] and "same data.split" in err[-1]
    split = json.loads((lowres / "split.json").read_text())
    assert split["test"], "the low-resolution run holds test cases (else the refusal proves nothing)"


def test_binary_morphology_by_hand():
    speck = torch.zeros(7, 7, 7)
    speck[3, 3, 3] = 1
    cube = binary_morphology(speck, "dilate", 1)
    assert cube.sum() == 27 and cube[2:5, 2:5, 2:5].all()
    assert torch.equal(binary_morphology(cube, "erode", 1), speck)
    both = cube.clone()
    both[0, 0, 0] = 1  # a speck beside the cube: opening removes it, keeps the cube
    assert torch.equal(binary_morphology(both, "open", 1), cube)
    holed = cube.clone()
    holed[3, 3, 3] = 0
    assert torch.equal(binary_morphology(holed, "close", 1), cube), "closing fills the hole"
    edge = torch.ones(5, 5, 5)
    assert torch.equal(binary_morphology(edge, "erode", 1), edge), "outside the patch erodes nothing"


def test_the_degradation_removes_only_small_components_and_changes_maps():
    big = torch.zeros(1, 10, 10, 10)
    big[0, :, :, :5] = 1  # half the patch: never removed (over 15 %)
    big[0, 8, 8, 8] = 1  # the small one
    remover = DegradePreviousStage(morphology_prob=0.0, remove_prob=1.0)
    remover.set_random_state(0)
    out = remover({"previous": big})["previous"]
    assert out[0, 8, 8, 8] == 0 and out[0, :, :, :5].all()
    changed = 0
    morph = DegradePreviousStage(morphology_prob=1.0, remove_prob=0.0)
    for seed in range(8):
        morph.set_random_state(seed)
        changed += not torch.equal(morph({"previous": big})["previous"], big)
    assert changed >= 6, "every draw applies an operator (some can leave a map unchanged)"


def test_intensity_augmentation_never_touches_the_first_stages_channels():
    cfg = DataConfig(patch_size=[8, 8, 8], flip_axes=[0], affine_prob=1.0, intensity_aug=True,
                     intensity_scheme="nnunet", pos_fraction=0.5)
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.normal(size=(1, 12, 12, 12)).astype(np.float32))
    labels = torch.zeros(1, 12, 12, 12, dtype=torch.uint8)
    labels[0, 3:9, 3:9, 3:9] = 1
    item = {"image": torch.cat([image, (labels == 1).float()]), "label": labels}
    transform = train_transforms(cfg, previous_channels=1)
    for seed in range(5):
        transform.set_random_state(seed=seed)
        out = transform(dict(item))
        out = out[0] if isinstance(out, list) else out
        assert out["image"].shape == (2, 8, 8, 8) and "previous" not in out
        assert set(torch.unique(out["image"][1]).tolist()) <= {0.0, 1.0}, "moved as a label, never intensity-changed"


# -- the planner's proposal ------------------------------------------------------------------------------------

def _fingerprint(shape, spacing, cases=3):
    from imgx3d.planning.fingerprint import CaseStats, ChannelStats, ClassStats, Fingerprint

    stats = [CaseStats(f"c{i}", list(shape), list(spacing), "RAS", 1.0) for i in range(cases)]
    return Fingerprint("large", "MRI", stats, [ChannelStats("ch", 0.0, 1.0, 0.0, 1.0, 0, 1)],
                       [ClassStats(1, "a", cases, 100.0, [5.0, 5.0, 5.0])])


def _slow_timer(cfg):
    """A step costs 1e-6 s per sample and voxel times the squared width: large patches miss a short budget."""
    return 1e-9 * cfg.method.channels[0] ** 2 * cfg.data.batch_size * np.prod(cfg.data.patch_size)


def test_a_patch_covering_little_of_the_median_case_gets_a_low_resolution_stage_by_nnunets_rule():
    from imgx3d.methods.base import build_method
    from imgx3d.planning.planner import LOWRES_COVERAGE, LOWRES_SHARE, LOWRES_SPACING_STEP, patch_coverage, plan

    fp = _fingerprint((192, 192, 160), (1.0, 1.0, 1.0))
    result = plan(fp, "unet", budget_minutes=0.5, step_timer=_slow_timer, pass_timer=lambda cfg, shape: 0.0)
    coverage = patch_coverage(result, fp)
    assert coverage < LOWRES_COVERAGE and result.cascade is not None
    stage = result.cascade.config()
    patch, low = np.array(result.tree["data"]["patch_size"]), np.array(stage.data.spacing)
    covered = np.prod(patch) / np.prod(np.array([192, 192, 160]) / low)
    before = np.prod(patch) / np.prod(np.array([192, 192, 160]) / (low / LOWRES_SPACING_STEP))
    assert covered >= LOWRES_COVERAGE > before, "the first spacing on nnU-Net's 3 % ladder that covers a quarter"
    assert np.prod(stage.data.patch_size) <= np.prod(patch), "a stage step costs no more than a full-resolution one"
    assert stage.method.channels[0] == result.tree["method"]["channels"][0]
    assert stage.train.max_minutes == pytest.approx(result.tree["train"]["max_minutes"] * LOWRES_SHARE, abs=0.01)
    net = build_method(stage.method, 2, 1 + 0).net
    assert net(torch.zeros(1, 1, *stage.data.patch_size)).shape[2:] == tuple(stage.data.patch_size)
    assert "planned.cascade" in {d.key for d in result.decisions} and result.planned["cascade"]["spacing"] == list(low)
    small = plan(_fingerprint((40, 48, 40), (1.0, 1.0, 1.0)), "unet", budget_minutes=0.5, step_timer=_slow_timer,
                 pass_timer=lambda cfg, shape: 0.0)
    assert small.cascade is None, "a patch that covers the median case needs no cascade"


def test_the_stage_coarsens_the_fine_axes_first_on_thick_slices():
    from imgx3d.planning.planner import Plan, lowres_stage

    fp = _fingerprint((320, 320, 40), (0.8, 0.8, 3.0))
    tree = {"dataset": "large", "seed": 0, "method": {"name": "unet", "channels": [16, 32], "strides": [[2, 2, 1]]},
            "data": {"spacing": [0.8, 0.8, 3.0], "patch_size": [64, 64, 16], "batch_size": 2},
            "train": {"max_minutes": 9.0}}
    near = Plan({**tree, "data": {**tree["data"], "patch_size": [160, 128, 40]}})  # 20 % of the median case
    spacing = lowres_stage(near, fp).tree["data"]["spacing"]
    assert spacing[2] == 3.0 and spacing[0] == spacing[1] > 0.8, "z waits while it is over twice as coarse"
    far = lowres_stage(Plan(tree), fp).tree["data"]["spacing"]  # 1.6 %: the fine axes catch up, then all grow
    assert far[0] == far[1] and far[2] / far[0] <= 2.0 and far[2] > 3.0 and far[0] / 0.8 > far[2] / 3.0
    assert lowres_stage(Plan(tree), fp, threshold=0.01) is None, "a patch over the threshold: no stage"


def test_the_plan_command_writes_the_stage_and_the_two_commands(tmp_path, capsys, monkeypatch):
    from imgx3d.config import load_config
    from imgx3d.planning import planner
    from tests.conftest import save_nifti

    root = tmp_path / "large"
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    training = []
    for i in range(3):
        label = np.zeros((96, 96, 96), np.uint8)
        label[30:60, 30:60, 30:60] = 1
        save_nifti(root / "imagesTr" / f"c{i}.nii.gz", rng.normal(size=label.shape).astype(np.float32) + label)
        save_nifti(root / "labelsTr" / f"c{i}.nii.gz", label)
        training.append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "a"}, "modality": {"0": "MRI"},
                                                   "training": training}))
    monkeypatch.setattr(planner, "measured_step_seconds", lambda device, clock=None: _slow_timer)
    monkeypatch.setattr(planner, "measured_pass_seconds", lambda device, clock=None: lambda cfg, shape: 0.0)
    output = tmp_path / "unet.yaml"
    assert main(["plan", "--data", str(root), "--budget", "0.5", "--device", "cpu", "--output", str(output)]) == 0
    out = capsys.readouterr().out
    stage_file = tmp_path / "unet.lowres.yaml"
    assert "cascade proposed" in out and f"--config {stage_file}" in out and "data.cascade=runs/large/lowres" in out
    stage, full = load_config(stage_file), load_config(output)
    assert stage.data.spacing != full.data.spacing and not stage.data.cascade


def test_the_cascade_predicts_the_fp32_labels_under_bf16_and_fp16(cascade_runs):
    """Both stages' networks stubbed to confident logits in the autocast dtype (the first reads the image, the
    second the first stage's channels): the labels are fp32's at every precision, the maps finite float32."""
    from tests.test_precision import _as_network_output, _confident_logits

    _, cascade, data = cascade_runs
    images = find_cases(data, load_checkpoint(cascade).config.data).cases[0].images

    def second_stage(x: torch.Tensor) -> torch.Tensor:
        cls = torch.cat([torch.full_like(x[:, :1], 0.5), x[:, 1:]], 1).argmax(1)  # the first stage's label
        return _as_network_output(40 * torch.nn.functional.one_hot(cls, 3).movedim(-1, 1).float() - 20)

    results = {}
    for precision in ("fp32", "bf16", "fp16"):
        predictor = Predictor.load(cascade, device="cpu", precision=precision)
        predictor.method.net.forward = second_stage
        predictor.previous_stage.predictor.method.net.forward = lambda x: _as_network_output(_confident_logits(x, 3))
        results[precision] = predictor.predict_files(images, probabilities=True)
        probabilities = results[precision].probabilities.array
        assert probabilities.dtype == np.float32 and np.isfinite(probabilities).all(), precision
    assert set(np.unique(results["fp32"].labels.array)) >= {1, 2}, "both labels reach the second stage"
    for precision in ("bf16", "fp16"):
        np.testing.assert_array_equal(results[precision].labels.array, results["fp32"].labels.array)


def test_any_3d_segmenter_can_be_the_next_stage_and_a_slice_method_cannot(cascade_runs, tmp_path, capsys):
    lowres, _, data = cascade_runs
    config = tmp_path / "imgx.yaml"
    config.write_text("method: {name: imgx, channels: [8, 16], strides: [2], num_samples: 1}\n")
    assert main(["train", "--no-track", "--config", str(config), "--data", str(data), "--run-dir",
                 str(tmp_path / "imgx"), *TINY_OVERRIDES, "method.channels=[8,16]", "method.strides=[2]",
                 f"data.cascade={lowres}"]) == 0
    predictor = Predictor.load(tmp_path / "imgx", device="cpu")
    assert predictor.method.in_channels == 3 and predictor.in_channels == 1
    case = find_cases(data, predictor.config.data).cases[0]
    assert predictor.predict_files(case.images).labels.array.shape == read_volume(case.images[0]).spatial_shape
    config.write_text("method: {name: unet, spatial_dims: 2}\n")
    code = main(["train", "--no-track", "--config", str(config), "--data", str(data), "--run-dir",
                 str(tmp_path / "slices"), *TINY_OVERRIDES, "method.channels=[4,8]", "method.strides=[2]",
                 f"data.cascade={lowres}"])
    assert code != 0 and "must be a 3D method" in capsys.readouterr().err
