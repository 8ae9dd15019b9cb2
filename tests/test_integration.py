"""Integration tests on the real data in ../shared/data (marked ``integration``)."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from imgx3d.cli import main
from imgx3d.config import load_config
from imgx3d.training.workflow import train_run
from tests.conftest import tree_digest

pytestmark = pytest.mark.integration
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_hippocampus_short_training_reaches_real_dice(shared_data, tmp_path):
    data = shared_data / "hippocampus"
    before = tree_digest(data / "labelsTr")
    cfg = load_config(CONFIGS / "hippocampus" / "unet.yaml",
                      ["train.max_steps=240", "train.val_every=120", "train.max_minutes=0", "train.schedule_over=steps",
                       "train.warmup_steps=20", "data.num_workers=0", "data.split.test_fraction=0.1",
                       "tracking.enabled=false"])
    result = train_run(cfg, data, tmp_path / "run")
    summary = result.test_summary
    assert summary["cases"] == 20
    # 240 steps (~1 CPU minute) already segment both hippocampus parts on unseen MRI
    assert summary["foreground_mean"]["dice"] > 0.7, summary["foreground_mean"]
    assert summary["foreground_mean"]["hd95"] < 5.0
    assert tree_digest(data / "labelsTr") == before


def test_totalseg_ct_preset_and_predict_round_trip(shared_data, tmp_path):
    src = shared_data / "totalseg_ct"
    root = tmp_path / "ct"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "images" / "s0011.nii.gz").symlink_to(src / "example_ct_sm.nii.gz")
    (root / "labels" / "s0011.nii.gz").symlink_to(src / "example_seg.nii.gz")
    cfg = tmp_path / "ct.yaml"
    cfg.write_text("dataset: totalseg\nmethod: {name: unet, channels: [4, 8, 16], strides: [2, 2], num_res_units: 0}\n"
                   "data: {preset: ct, ct_window: [-175, 250], spacing: [4.0, 4.0, 4.0], patch_size: [32, 32, 16],"
                   " split: {test_fraction: 0.0, val_fraction: 0.0}}\n"
                   "train: {max_steps: 3, val_every: 3}\n")
    assert main(["train", "--volume", "--config", str(cfg), "--data", str(root), "--no-track",
                 "--run-dir", str(tmp_path / "run")]) == 0
    ckpt = tmp_path / "run" / "best.pt"
    assert main(["predict", "--checkpoint", str(ckpt), "--input", str(src / "example_ct_sm.nii.gz"),
                 "--output", str(tmp_path / "pred"), "--probabilities"]) == 0
    pred = nib.load(str(tmp_path / "pred" / "example_ct_sm.nii.gz"))
    ct = nib.load(str(src / "example_ct_sm.nii.gz"))
    assert pred.shape == ct.shape
    np.testing.assert_allclose(pred.affine, ct.affine, atol=1e-5)
    labels = np.unique(np.asarray(nib.load(str(src / "example_seg.nii.gz")).dataobj))
    assert set(np.unique(np.asarray(pred.dataobj))) <= set(labels.tolist())
    probs = nib.load(str(tmp_path / "pred" / "example_ct_sm_probabilities.nii.gz"))
    assert probs.shape[:3] == ct.shape
    np.testing.assert_allclose(np.asarray(probs.dataobj).sum(-1), 1.0, atol=1e-3)
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert split["train"] == ["s0011"]


def test_brats_case_folders_and_predefined_split(shared_data):
    from imgx3d.data.catalog import find_cases, make_split
    from imgx3d.data.transforms import check_case_grids

    cfg = load_config(CONFIGS / "brats" / "unet.yaml")
    catalog = find_cases(shared_data / "brats2015", cfg.data)
    assert catalog.in_channels == 2 and catalog.num_classes == 5 and len(catalog.cases) == 6
    split = make_split(catalog, cfg.data.split)
    assert (len(split.train), len(split.val), len(split.test)) == (2, 2, 2)
    check_case_grids(catalog.cases)


def test_imgx_hippocampus_short_training(shared_data, tmp_path):
    """ImgX-DiffSeg (K = 5, recycling max) trains on real MRI and segments unseen volumes in 3D."""
    cfg = load_config(CONFIGS / "hippocampus" / "imgx.yaml",
                      ["train.max_steps=160", "train.val_every=80", "train.max_minutes=0", "train.schedule_over=steps",
                       "train.warmup_steps=20", "data.num_workers=0", "data.split.test_fraction=0.05",
                       "tracking.enabled=false"])
    result = train_run(cfg, shared_data / "hippocampus", tmp_path / "run")
    assert result.test_summary["cases"] == 10
    assert result.test_summary["foreground_mean"]["dice"] > 0.5, result.test_summary["foreground_mean"]


def test_hippocampus_codec_then_sdseg_predicts_3d_volumes_on_the_native_grid(shared_data, tmp_path):
    """The 2D path on real MRI: a codec learns to carry hippocampus masks, SDSeg on top of it
    predicts whole volumes through the slice adapter, written with the inputs' geometry."""
    data = shared_data / "hippocampus"
    short = ["train.max_minutes=0", "train.schedule_over=steps", "train.warmup_steps=20", "data.num_workers=0",
             "data.split.test_fraction=0.05", "tracking.enabled=false"]
    assert main(["train", "--volume", "--config", str(CONFIGS / "hippocampus" / "sdseg.yaml"), "--method", "vae",
                 "--data", str(data), "--run-dir", str(tmp_path / "vae"), "--no-track", *short,
                 "train.max_steps=250", "train.val_every=250", "train.lr=1e-3", "train.scheduler=constant"]) == 0
    codec_run = torch_load(tmp_path / "vae" / "last.pt")
    codec_dice = codec_run["train_state"]["history"][-1]["val/dice_mean"]
    assert codec_dice > 0.5, "250 steps of the codec already reconstruct hippocampus masks"

    cfg = load_config(CONFIGS / "hippocampus" / "sdseg.yaml",
                      [*short, f"method.codec.path={tmp_path / 'vae'}", "train.max_steps=30", "train.val_every=30"])
    result = train_run(cfg, data, tmp_path / "sdseg")
    assert result.test_summary["cases"] == 10
    images = sorted((data / "imagesTr").glob("*.nii.gz"))[:2]
    assert main(["predict", "--run", str(tmp_path / "sdseg"), "--input", *map(str, images),
                 "--output", str(tmp_path / "pred")]) == 0
    for image in images:
        pred, src = nib.load(str(tmp_path / "pred" / image.name)), nib.load(str(image))
        assert pred.shape == src.shape
        np.testing.assert_allclose(pred.affine, src.affine, atol=1e-5)
        assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= {0, 1, 2}


def torch_load(path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)


def test_isbi_em_slices_with_image_mode_train_predict_evaluate(shared_data, tmp_path, capsys):
    """--image on the real EM slices: membranes (black, 0, in the label PNGs) are class 1; a
    short 2D U-Net run beats the all-membrane guess (Dice ~0.35), and predictions are PNGs in
    the labels' own convention that `evaluate --config` scores."""
    data = shared_data / "isbi2012_em"
    before = tree_digest(data)
    config = str(CONFIGS / "isbi2012" / "unet2d.yaml")
    short = ["train.max_steps=150", "train.val_every=150", "train.max_minutes=0", "train.schedule_over=steps",
             "train.warmup_steps=10", "method.channels=[16,32,64,128]", "data.slices.size=[128,128]"]
    assert main(["train", "--image", "--config", config, "--data", str(data), "--no-track",
                 "--run-dir", str(tmp_path / "run"), *short]) == 0
    test_ids = json.loads((tmp_path / "run" / "split.json").read_text())["test"]
    summary = json.loads((tmp_path / "run" / "test_metrics" / "summary.json").read_text())
    assert summary["cases"] == 6 and summary["per_class"]["membrane"]["dice"]["mean"] > 0.6, summary
    images = [str(data / "image" / f"{i}.png") for i in test_ids[:2]]
    assert main(["predict", "--run", str(tmp_path / "run"), "--input", *images, "--output", str(tmp_path / "pred")]) == 0
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    for i in test_ids[:2]:
        pred = np.asarray(Image.open(tmp_path / "pred" / f"{i}.png"))
        assert pred.shape == (512, 512) and set(np.unique(pred).tolist()) == {0, 255}
        (ref_dir / f"{i}.png").symlink_to(data / "label" / f"{i}.png")
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(ref_dir), "--config", config]) == 0
    assert "membrane" in capsys.readouterr().out
    assert tree_digest(data) == before
