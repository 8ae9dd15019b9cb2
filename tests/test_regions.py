"""Region-based training (nnU-Net's regions, the BraTS convention): sigmoid outputs per region, Dice per
region, labels back region by region in order."""

from __future__ import annotations

import json
import re

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from monai.losses import DiceLoss

from imgx3d.checkpoint import load_checkpoint
from imgx3d.cli import main
from imgx3d.config import DataConfig, load_config
from imgx3d.data.catalog import find_cases
from imgx3d.data.labels import Regions
from imgx3d.errors import ConfigError
from imgx3d.evaluation.metrics import evaluate_folders, score_case
from imgx3d.inference.export import export_settings
from imgx3d.methods.base import build_method
from imgx3d.methods.unet import RegionDiceBCE
from tests.conftest import TINY_OVERRIDES, save_nifti

BRATS = {0: "background", 1: "necrosis", 2: "edema", 3: "non-enhancing", 4: "enhancing"}
BRATS_REGIONS = {"whole tumour": [1, 2, 3, 4], "tumour core": [1, 3, 4], "enhancing tumour": [4]}


def test_each_region_writes_its_own_value_and_later_regions_write_over_earlier_ones():
    regions = Regions.of(DataConfig(regions=BRATS_REGIONS), BRATS)
    assert regions.writes == (2, 1, 4), "the smallest value no later region holds"
    assert Regions.of(DataConfig(regions=BRATS_REGIONS, region_labels=[2, 3, 4]), BRATS).writes == (2, 3, 4)
    probs = torch.tensor([[0.9, 0.9, 0.9, 0.2, 0.6],    # whole
                          [0.1, 0.8, 0.8, 0.9, 0.4],    # core
                          [0.0, 0.3, 0.7, 0.9, 0.9]])   # enhancing: written even where whole says no (nnU-Net)
    assert regions.decode(probs).tolist() == [2, 1, 4, 4, 4]
    assert regions.decode(torch.full((3, 2), 0.5)).tolist() == [0, 0], "0.5 is not above the threshold"
    label = torch.tensor([0, 1, 2, 3, 4]).reshape(1, 1, 5)
    assert regions.targets(label)[0].tolist() == [[0, 1, 1, 1, 1], [0, 1, 0, 1, 1], [0, 0, 0, 0, 1]]
    assert regions.scored == {0: "background", 1: "whole tumour", 2: "tumour core", 3: "enhancing tumour"}


def test_regions_that_cannot_be_read_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="region 'x' names label value"):
        Regions.of(DataConfig(regions={"x": [1, 7]}), BRATS)
    with pytest.raises(ConfigError, match="set data.region_labels"):
        Regions.of(DataConfig(regions={"a": [1, 2], "b": [1, 2]}), BRATS)
    with pytest.raises(ConfigError, match="writes 4, which it does not hold"):
        Regions.of(DataConfig(regions={"a": [1, 2]}, region_labels=[4]), BRATS)
    with pytest.raises(ConfigError, match="one label value per region"):
        load_config(None, ["data.regions={a: [1]}", "data.region_labels=[1, 2]"])
    with pytest.raises(ConfigError, match="trains on label maps only"):
        build_method({"name": "imgx"}, 5, 1, Regions.of(DataConfig(regions=BRATS_REGIONS), BRATS))


def test_the_region_loss_is_sigmoid_dice_plus_binary_cross_entropy_of_the_memberships():
    torch.manual_seed(0)
    regions = Regions.of(DataConfig(regions=BRATS_REGIONS), BRATS)
    logits = torch.randn(2, 3, 6, 6, 6)
    label = torch.randint(0, 5, (2, 1, 6, 6, 6))
    target = torch.stack([torch.isin(label[:, 0], torch.tensor(m)) for m in regions.members], 1).float()
    expected = DiceLoss(sigmoid=True, batch=True)(logits, target) + 0.5 * F.binary_cross_entropy_with_logits(
        logits, target)
    assert RegionDiceBCE(regions, True, 1.0, 0.5)(logits, label).item() == pytest.approx(expected.item(), rel=1e-6)
    # a label-based reading of the same outputs gives another value: the memberships are what is fitted
    wrong = torch.stack([label[:, 0] == v for v in (2, 1, 4)], 1).float()
    assert expected.item() != pytest.approx((DiceLoss(sigmoid=True, batch=True)(logits, wrong) + 0.5 *
                                             F.binary_cross_entropy_with_logits(logits, wrong)).item(), rel=1e-3)
    method = build_method({"name": "unet", "channels": [4, 8], "strides": [2], "num_res_units": 0}, 5, 1, regions)
    assert method.net(torch.zeros(1, 1, 8, 8, 8)).shape[1] == 3, "one output per region"
    probs = method.window_probabilities(torch.randn(1, 1, 8, 8, 8))
    assert probs.dtype == torch.float32 and float(probs.detach().sum(1).max()) != pytest.approx(1.0), "sigmoids"


def test_region_dice_scores_the_unions():
    regions = Regions.of(DataConfig(regions=BRATS_REGIONS), BRATS)
    ref = np.zeros((10, 10, 4), np.uint8)
    ref[1:9, 1:9] = 2
    ref[3:7, 3:7] = 1
    ref[4:6, 4:6] = 4
    pred = ref.copy()
    pred[ref == 1] = 3  # necrosis called non-enhancing: wrong labels, the same tumour core
    pred[4:6, 4] = 3  # half the enhancing voxels called non-enhancing: still core, no longer enhancing
    scores = score_case(pred, ref, [1, 2, 3], regions=regions, metrics=("dice",))
    assert scores[1]["dice"] == 1.0 and scores[2]["dice"] == 1.0
    assert scores[3]["dice"] == pytest.approx(2 * 8 / (16 + 8))
    per_label = score_case(pred, ref, [1, 3], metrics=("dice",))
    assert per_label[1]["dice"] == 0.0 and per_label[3]["dice"] == 0.0


def _nested_case(rng: np.random.Generator, shape=(20, 24, 16)) -> tuple[np.ndarray, np.ndarray]:
    """A sphere (label 2, 'edema') around a smaller one (label 1, 'core'): overlapping regions."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    distance = np.linalg.norm(grid - rng.uniform(7, np.array(shape) - 7), axis=-1)
    label = np.where(distance < 3, 1, np.where(distance < 6, 2, 0)).astype(np.uint8)
    image = rng.normal(0, 0.3, shape) + 1.5 * (label == 2) + 3.0 * (label == 1) + 5.0
    return image.astype(np.float32), label


def _nnunet_region_dataset(root):
    rng = np.random.default_rng(0)
    for i in range(8):
        image, label = _nested_case(rng)
        save_nifti(root / "imagesTr" / f"case_{i:03d}_0000.nii.gz", image)
        save_nifti(root / "labelsTr" / f"case_{i:03d}.nii.gz", label)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "file_ending": ".nii.gz", "numTraining": 8,
        "labels": {"background": 0, "lesion": [1, 2], "core": [1]}, "regions_class_order": [2, 1]}))
    return root


def test_a_region_dataset_trains_region_based_predicts_labels_and_scores_regions(tmp_path):
    data = _nnunet_region_dataset(tmp_path / "nnunet")
    catalog = find_cases(data, DataConfig())
    assert catalog.regions == {"lesion": [1, 2], "core": [1]} and catalog.region_labels == [2, 1]
    assert sorted(catalog.labels) == [0, 1, 2]
    run = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("method: {name: unet}\n")
    assert main(["train", "--no-track", "--config", str(cfg), "--data", str(data), "--run-dir", str(run),
                 *TINY_OVERRIDES]) == 0
    recorded = yaml.safe_load((run / "config.yaml").read_text())["data"]
    assert recorded["regions"] == {"lesion": [1, 2], "core": [1]} and recorded["region_labels"] == [2, 1]
    summary = json.loads((run / "test_metrics" / "summary.json").read_text())
    assert set(summary["per_class"]) == {"lesion", "core"}, "test Dice per region"
    assert re.search(r"validation at step \d+: lesion [\d.]+, core [\d.]+, mean", (run / "train.log").read_text())
    assert not (run / "test_metrics" / "uncertainty.json").exists()
    decided = json.loads((run / "postprocessing.json").read_text())
    assert set(decided["classes"]) <= {1, 2}, "steps per region key"
    out = tmp_path / "pred"
    images = sorted((data / "imagesTr").glob("*.nii.gz"))[:2]
    assert main(["predict", "--run", str(run), "--input", *map(str, images), "--output", str(out),
                 "--probabilities"]) == 0
    written = nib.load(str(out / "case_000_0000.nii.gz"))
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2}
    assert np.allclose(written.affine, nib.load(str(images[0])).affine)
    probs = np.asarray(nib.load(str(out / "case_000_0000_probabilities.nii.gz")).dataobj)
    assert probs.shape[-1] == 2 or probs.shape[0] == 2, "one map per region"
    # the label map is the regions' conversion of the written probabilities
    maps = torch.from_numpy(probs if probs.shape[0] == 2 else np.moveaxis(probs, -1, 0))
    expected = Regions.of(load_config(run / "config.yaml").data, catalog.labels).decode(maps).numpy()
    assert np.array_equal(np.asarray(written.dataobj), expected)
    code = main(["predict", "--run", str(run), "--input", str(images[0]), "--output", str(tmp_path / "u"),
                 "--uncertainty"])
    assert code != 0, "uncertainty maps of overlapping regions are refused"
    refs = tmp_path / "refs"
    refs.mkdir()
    for image in images:
        (refs / image.name).symlink_to(data / "labelsTr" / image.name.replace("_0000", ""))
    rows, scored = evaluate_folders(out, refs, None, None, data_cfg=load_config(run / "config.yaml").data)
    assert set(scored["per_class"]) == {"lesion", "core"}
    output = export_settings(load_checkpoint(run / "best.pt"), "torchscript", 3)["output"]
    assert output["shape"][1] == 2 and output["regions"] == {"lesion": [1, 2], "core": [1]}
    assert output["region_labels"] == [2, 1] and "sigmoid" in output["meaning"]



def test_the_plan_proposes_the_regions_dataset_json_names(tmp_path):
    from imgx3d.planning.fingerprint import fingerprint
    from imgx3d.planning.planner import plan

    data = _nnunet_region_dataset(tmp_path / "nnunet")
    fp = fingerprint(data, DataConfig())
    assert fp.reading["regions"] == {"lesion": [1, 2], "core": [1]} and fp.reading["region_labels"] == [2, 1]
    assert any(line.startswith("regions (region-based training") for line in fp.summary())
    config = plan(fp, "unet", budget_minutes=1.0, step_timer=lambda cfg: 0.01).config()
    assert config.data.regions == {"lesion": [1, 2], "core": [1]} and config.data.region_labels == [2, 1]
    assert fingerprint(data, DataConfig(regions={"lesion": [1, 2]})).reading["regions"] == {"lesion": [1, 2]}, \
        "a configured data.regions wins over dataset.json's"


def test_region_postprocessing_keeps_each_regions_largest_component_of_its_union():
    from imgx3d.inference.postprocess import Postprocessing, case_candidates, learn_postprocessing

    regions = Regions.of(DataConfig(regions={"lesion": [1, 2], "core": [1]}), {0: "bg", 1: "core", 2: "edge"})
    ref = np.zeros((12, 12, 4), np.uint8)
    ref[2:8, 2:8] = 2
    ref[4:6, 4:6] = 1
    pred = ref.copy()
    pred[10, 10] = 1  # a stray core voxel: its own component of both regions
    pred[0, 11] = 2   # a stray lesion voxel
    kept = Postprocessing(classes=(1,)).apply(pred, [1, 2], regions)
    assert kept[10, 10, 0] == 0 and kept[0, 11, 0] == 0 and np.array_equal(kept, ref), "the union's largest"
    only_core = Postprocessing(classes=(2,)).apply(pred, [1, 2], regions)
    assert only_core[10, 10, 0] == 0 and only_core[0, 11, 0] == 2, "region 2 (core) touches only label 1"
    record = case_candidates(pred, ref, [1, 2], regions=regions)
    assert record.raw[1] < 1.0 and record.per_class["raw"][1] == 1.0
    decision, dice = learn_postprocessing([record], [1, 2])
    assert decision.foreground or set(decision.classes) == {1, 2}
    assert dice["postprocessed"] == 1.0 and dice["raw"] < 1.0


def test_evaluate_scores_any_label_maps_as_regions(tmp_path, capsys):
    ref = np.zeros((10, 10, 4), np.uint8)
    ref[1:9, 1:9] = 2
    ref[3:7, 3:7] = 1
    pred = ref.copy()
    pred[ref == 1] = 3  # another label of the same region
    for folder, array in (("pred", pred), ("ref", ref)):
        save_nifti(tmp_path / folder / "case.nii.gz", array)
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"),
                 "--regions", "{tumour: [1, 2, 3], core: [1, 3]}"]) == 0
    summary = json.loads((tmp_path / "pred" / "summary.json").read_text())
    assert summary["per_class"]["tumour"]["dice"]["mean"] == 1.0 and summary["per_class"]["core"]["dice"]["mean"] == 1.0
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref")]) == 0
    by_label = json.loads((tmp_path / "pred" / "summary.json").read_text())["per_class"]
    assert by_label["label_1"]["dice"]["mean"] == 0.0, "label by label, the same maps disagree"
