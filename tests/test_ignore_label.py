"""nnU-Net v2's ignore label: voxels not annotated add nothing to the loss, the patch sampler or any metric."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss

from imgx3d.data.catalog import find_cases
from imgx3d.data.labels import IGNORE_INDEX
from imgx3d.data.transforms import crop_indices
from imgx3d.errors import InputError
from imgx3d.evaluation.metrics import score_case
from imgx3d.methods.unet import DiceCEIgnoring
from tests.conftest import TINY_OVERRIDES, write_msd_dataset


def test_the_loss_is_monai_dice_ce_and_blind_to_ignored_voxels():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 6, 6, 6)
    label = torch.randint(0, 3, (2, 1, 6, 6, 6))
    for batch in (True, False):
        monai = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=batch, lambda_ce=0.5)
        assert DiceCEIgnoring(batch, 1.0, 0.5)(logits, label) == monai(logits, label)
    loss = DiceCEIgnoring(True, 1.0, 1.0)
    sparse = label.clone()
    sparse[:, :, :, :, 1::2] = IGNORE_INDEX  # every other slice not annotated
    changed = logits.clone()
    changed[:, :, :, :, 1::2] = torch.randn_like(changed[:, :, :, :, 1::2]) * 10
    assert loss(changed, sparse) == pytest.approx(loss(logits, sparse).item(), abs=1e-6), "ignored logits count"
    assert loss(logits, sparse) != pytest.approx(loss(logits, label).item(), abs=1e-3)
    grad_in = logits.clone().requires_grad_()
    loss(grad_in, sparse).backward()
    assert grad_in.grad[:, :, :, :, 1::2].abs().max() == 0 and grad_in.grad[:, :, :, :, ::2].abs().max() > 0
    # the annotated half alone: the same value as MONAI's loss on those slices
    half = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)
    assert loss(logits, sparse).item() == pytest.approx(half(logits[..., ::2], label[..., ::2]).item(), rel=1e-5)
    assert torch.isfinite(loss(logits, torch.full_like(label, IGNORE_INDEX))), "nothing annotated: no NaN"


def test_patches_are_centred_on_annotated_voxels_and_background_excludes_the_foreground():
    label = torch.zeros(1, 4, 4, 4, dtype=torch.uint8)
    label[0, 1, 1, 1] = 1
    label[0, 2] = 3  # a plane not annotated
    plain = crop_indices(label, [4, 4, 4])
    assert len(plain["fg_indices"]) == 1 + 16 and len(plain["bg_indices"]) == 64 - 17, "uint8: bg is not everything"
    sparse = crop_indices(label, [4, 4, 4], ignore_label=3)
    assert sparse["fg_indices"].tolist() == [21] and len(sparse["bg_indices"]) == 64 - 16 - 1


def test_metrics_leave_ignored_voxels_out():
    ref = np.zeros((8, 8, 4), np.uint8)
    ref[2:6, 2:6, :] = 1
    ref[..., 2:] = 9  # two slices not annotated
    pred = np.zeros_like(ref)
    pred[2:6, 2:6, :2] = 1
    pred[0:8, 0:8, 2:] = 1  # wrong wherever the reference says nothing
    assert score_case(pred, ref, [1], ignore_label=9)[1]["dice"] == 1.0
    assert score_case(pred, ref, [1])[1]["dice"] < 0.5


def _sparse_dataset(root, every: int = 3, ignore_name: str = "ignore", value: int = 3):
    data = write_msd_dataset(root)
    for path in sorted((data / "labelsTr").glob("*.nii.gz")):
        image = nib.load(path)
        label = np.asarray(image.dataobj).astype(np.uint8)
        keep = np.zeros(label.shape[2], bool)
        keep[::every] = True
        label[..., ~keep] = value
        nib.save(nib.Nifti1Image(label, image.affine), path)
    meta = json.loads((data / "dataset.json").read_text())
    meta["labels"][str(value)] = ignore_name
    (data / "dataset.json").write_text(json.dumps(meta))
    return data


def test_the_catalog_takes_the_ignore_label_out_of_the_classes(tmp_path):
    catalog = find_cases(_sparse_dataset(tmp_path / "a"))
    assert catalog.ignore_label == 3 and catalog.labels == {0: "background", 1: "sphere", 2: "cube"}
    assert catalog.num_classes == 3
    with pytest.raises(InputError, match="must be above every class value"):
        find_cases(_sparse_dataset(tmp_path / "b", value=1))


def test_sparse_labels_train_predict_and_score(tmp_path):
    """A third of the slices annotated: the U-Net trains, records data.ignore_label, and the test split is
    scored on the annotated voxels only; a diffusion method is refused in one line."""
    from imgx3d.cli import main
    from imgx3d.config import load_config
    from imgx3d.errors import ConfigError
    from imgx3d.training.workflow import train_run

    data = _sparse_dataset(tmp_path / "sparse")
    config = tmp_path / "cfg.yaml"
    config.write_text("method: {name: unet}\n")
    result = train_run(load_config(config, [*TINY_OVERRIDES, "tracking.enabled=false"]), data, tmp_path / "run")
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.data.ignore_label == 3
    assert np.isfinite(result.best_val_dice) and result.test_summary["cases"] == 2
    assert set(result.test_summary["per_class"]) == {"sphere", "cube"}, "the ignore label is not a class"
    predictions = sorted((tmp_path / "run" / "test_predictions").glob("*.nii.gz"))
    assert predictions and all(3 not in np.unique(np.asarray(nib.load(p).dataobj)) for p in predictions)
    imgx = tmp_path / "imgx.yaml"
    imgx.write_text("method: {name: imgx}\n")
    with pytest.raises(ConfigError, match="ignore label 3"):
        train_run(load_config(imgx, ["tracking.enabled=false", "data.num_workers=0"]), data, tmp_path / "imgx")
    assert main(["evaluate", "--pred", str(tmp_path / "run" / "test_predictions"), "--ref",
                 str(tmp_path / "run" / "test_references"), "--config", str(tmp_path / "run" / "config.yaml"),
                 "--output", str(tmp_path / "ev")]) == 0
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["per_class"]["label_1"]["dice"]["mean"] == pytest.approx(  # named by value without data.labels
        result.test_summary["per_class"]["sphere"]["dice"]["mean"])
    by_hand = {mask: np.mean([score_case(np.asarray(nib.load(p).dataobj), np.asarray(
        nib.load(tmp_path / "run" / "test_references" / p.name).dataobj), [1], ignore_label=mask)[1]["dice"]
        for p in predictions]) for mask in (3, None)}
    assert summary["per_class"]["label_1"]["dice"]["mean"] == pytest.approx(by_hand[3])
    assert by_hand[3] != pytest.approx(by_hand[None]), "the not-annotated slices would have counted"


def test_the_uncertainty_scores_leave_ignored_voxels_out():
    """An ignored reference voxel is neither an error nor a wrong confident voxel: a perfect, sure prediction
    of the annotated slices scores ECE 0 with the ignore label, and badly without it."""
    from imgx3d.evaluation.uncertainty import UncertaintyScores

    ref = np.zeros((10, 10, 6), np.uint8)
    ref[3:7, 3:7, :] = 1
    ref[..., 3:] = 5  # three slices not annotated
    pred = np.where(ref == 5, 0, ref).astype(np.uint8)
    probs = np.stack([pred == 0, pred == 1], -1).astype(np.float32) * 0.98 + 0.01
    entropy = np.zeros(ref.shape, np.float32)
    entropy[2:8, 2:8, :] = 0.3  # unsure around the object
    scored = {}
    for ignore in (5, None):
        scores = UncertaintyScores([0, 1], ignore)
        scores.add("a", pred, ref, entropy, probs)
        scored[ignore] = scores.result({"a": 1.0})
    assert scored[5]["ece"] == pytest.approx(0.01, abs=1e-6) and np.isnan(scored[5]["error_auc"])
    assert scored[None]["ece"] > 0.1
