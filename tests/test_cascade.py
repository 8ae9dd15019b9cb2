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
    assert main([*common, "--run-dir", str(root / "cascade"), *TINY_OVERRIDES, f"data.cascade={root / 'lowres'}"]) == 0
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
