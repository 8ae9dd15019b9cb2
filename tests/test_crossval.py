"""nnU-Net's workflow: folds trained and summarised, ensembles averaging probabilities, and
postprocessing learned from validation (kept where it helps, not where it hurts)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from imgx3d.checkpoint import Checkpoint, checkpoint_state
from imgx3d.cli import main
from imgx3d.config import Config, DataConfig, InferConfig
from imgx3d.errors import CheckpointError
from imgx3d.inference.postprocess import (
    Postprocessing,
    case_candidates,
    learn_postprocessing,
)
from imgx3d.inference.predictor import (
    InferSettings,
    Predictor,
    check_ensemble,
    ensemble_postprocessing,
)
from imgx3d.methods.unet import UNetConfig, UNetMethod
from tests.conftest import TINY_OVERRIDES, save_nifti, write_msd_dataset

LABELS = {0: "background", 1: "a", 2: "b"}


def _unet(seed: int) -> UNetMethod:
    torch.manual_seed(seed)
    return UNetMethod(UNetConfig(channels=[4, 8, 16], strides=[2, 2], num_res_units=0), 3, 1).eval()


def _predictor(methods, streaming: str = "off", **data) -> Predictor:
    cfg = Config(data=DataConfig(preset="none", patch_size=[16, 16, 16], **data),
                 infer=InferConfig(streaming=streaming))
    return Predictor(methods, cfg, LABELS, InferSettings.from_config(cfg.infer, device="cpu"))


def test_an_ensemble_predicts_the_mean_of_its_members_probabilities(tmp_path):
    path = save_nifti(tmp_path / "v.nii.gz", np.random.default_rng(0).normal(size=(30, 26, 21)).astype(np.float32),
                      np.diag([0.8, 0.9, 1.5, 1.0]))
    a, b = _unet(0), _unet(1)
    pa = _predictor(a).predict_files([path], probabilities=True).probabilities.array
    pb = _predictor(b).predict_files([path], probabilities=True).probabilities.array
    assert np.abs(pa - pb).max() > 0.05  # different members: the test would see a wrong mean
    both = _predictor([a, b]).predict_files([path], probabilities=True)
    np.testing.assert_allclose(both.probabilities.array, (pa + pb) / 2, atol=1e-5)
    np.testing.assert_array_equal(both.labels.array, ((pa + pb) / 2).argmax(0))
    # the streaming window averages the members window by window: the same labels, no volume maps
    streamed = _predictor([a, b], streaming="on").predict_files([path]).labels.array
    assert (streamed == both.labels.array).mean() > 0.999  # ties within rounding may differ


def _checkpoint(path: Path, **data) -> Checkpoint:
    cfg = Config(data=DataConfig(preset="none", patch_size=[16, 16, 16], **data))
    return Checkpoint(path, cfg, checkpoint_state(cfg, {}, num_classes=3, in_channels=1, labels=LABELS))


def test_runs_on_other_data_settings_are_not_ensembled(tmp_path):
    check_ensemble([_checkpoint(tmp_path / "a.pt"), _checkpoint(tmp_path / "b.pt", batch_size=8)])  # training only
    with pytest.raises(CheckpointError, match=r"b.pt: cannot be ensembled with .*a.pt: data.spacing differs "
                                              r"\(\[1.0, 1.0, 1.0\] vs None\)"):
        check_ensemble([_checkpoint(tmp_path / "a.pt"), _checkpoint(tmp_path / "b.pt", spacing=[1.0, 1.0, 1.0])])


def _case(spurious: bool, split_reference: bool) -> tuple[np.ndarray, np.ndarray]:
    """A reference with class 1 (one cube, or two far apart) and class 2 (a cube touching it: one
    foreground component); the prediction matches it, plus (``spurious``) a far-away class-1 blob."""
    ref = np.zeros((40, 30, 20), np.int64)
    ref[5:13, 5:13, 5:13] = 1
    ref[13:19, 5:11, 5:11] = 2
    if split_reference:
        ref[30:36, 20:26, 12:18] = 1
    pred = ref.copy()
    if spurious:
        pred[32:35, 22:25, 2:5] = 1
    return pred, ref


def test_postprocessing_keeps_the_largest_component_only_where_it_raised_dice():
    helps = [case_candidates(*_case(spurious=True, split_reference=False), [1, 2]) for _ in range(2)]
    decision, dice = learn_postprocessing(helps, [1, 2])
    assert decision.foreground  # the spurious blob goes with the whole-foreground step already
    assert dice["postprocessed"] == pytest.approx(1.0) and dice["raw"] < 0.99
    # class 1 really has two parts: keeping its largest would remove one, so nothing is kept
    hurts = [case_candidates(*_case(spurious=False, split_reference=True), [1, 2])]
    decision, dice = learn_postprocessing(hurts, [1, 2])
    assert decision == Postprocessing() and dice["postprocessed"] == dice["raw"] == pytest.approx(1.0)
    # a blob of class 1 next to a two-part class-1 reference: neither step pays over the pooled cases
    pooled = hurts * 3 + helps
    decision, _ = learn_postprocessing(pooled, [1, 2])
    assert not decision.foreground and 1 not in decision.classes


def test_per_class_step_when_the_foreground_step_hurts():
    pred, ref = _case(spurious=True, split_reference=False)
    ref[30:34, 2:6, 14:18] = 2  # class 2 has a second real part far away: the foreground step would cut it
    pred[30:34, 2:6, 14:18] = 2
    decision, _ = learn_postprocessing([case_candidates(pred, ref, [1, 2])], [1, 2])
    assert decision == Postprocessing(foreground=False, classes=(1,))
    cleaned = decision.apply(pred, [1, 2])
    np.testing.assert_array_equal(cleaned, ref)
    assert (pred != ref).any()  # the input map is left as it was


def test_ensemble_postprocessing_is_decided_on_the_pooled_validation_cases(tmp_path):
    helps = case_candidates(*_case(spurious=True, split_reference=False), [1, 2]).to_json()
    hurts = case_candidates(*_case(spurious=False, split_reference=True), [1, 2]).to_json()

    def run(records, decision):
        ckpt = _checkpoint(tmp_path / "x.pt")
        return Checkpoint(ckpt.path, ckpt.config, {**ckpt.state, "postprocessing_validation": records,
                                                   "postprocessing": decision.to_json()})

    one = run([helps], Postprocessing(True, ()))
    assert ensemble_postprocessing([one]) == Postprocessing(True, ())
    assert ensemble_postprocessing([one, run([hurts, hurts], Postprocessing())]) == Postprocessing()


def test_predictor_applies_the_learned_postprocessing_unless_told_not_to(tmp_path):
    class Constant(torch.nn.Module):  # predicts a fixed map: a cube of class 1 and a far blob of class 1
        spatial_dims, num_classes, in_channels = 3, 3, 1

        def predict(self, image, window):
            pred = torch.zeros(image.shape[2:], dtype=torch.long)
            pred[2:10, 2:10, 2:10], pred[20:22, 20:22, 15:17] = 1, 1
            return torch.nn.functional.one_hot(pred, 3).permute(3, 0, 1, 2)[None].float()

    path = save_nifti(tmp_path / "v.nii.gz", np.random.default_rng(0).random((24, 24, 18), np.float32))
    cfg = Config(data=DataConfig(preset="none", patch_size=[16, 16, 16]), infer=InferConfig(streaming="off"))
    decision = Postprocessing(foreground=False, classes=(1,))
    on = Predictor(Constant(), cfg, LABELS, InferSettings.from_config(cfg.infer, device="cpu"), decision)
    off = Predictor(Constant(), cfg, LABELS, InferSettings.from_config(cfg.infer, device="cpu", postprocess=False),
                    decision)
    assert (on.predict_files([path]).labels.array == 1).sum() == 8 ** 3
    assert (off.predict_files([path]).labels.array == 1).sum() == 8 ** 3 + 8


def test_folds_train_resume_summarise_and_ensemble_from_the_command_line(tmp_path, capsys):
    data = write_msd_dataset(tmp_path / "msd")
    config = tmp_path / "cfg.yaml"
    config.write_text("method: {name: unet}\n")
    cv = tmp_path / "cv"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["train", "--tracking-uri", uri, "--experiment", "folds", "--config", str(config), "--data", str(data),
            "--run-dir", str(cv), "--folds", "2", *TINY_OVERRIDES]
    assert main(args + ["--fold", "1"]) == 0  # one fold alone, as nnU-Net users run them
    assert main(args) == 0  # --fold all: fold 1 finished, so only fold 0 trains
    out = capsys.readouterr().out
    assert "fold 1 finished earlier" in out and "training fold 0 of 2" in out
    results = [json.loads((cv / f"fold_{k}" / "result.json").read_text(encoding="utf-8")) for k in (0, 1)]
    splits = [json.loads((cv / f"fold_{k}" / "split.json").read_text(encoding="utf-8")) for k in (0, 1)]
    assert splits[0]["test"] == splits[1]["test"] and len(splits[0]["test"]) == 2
    assert sorted(splits[0]["val"] + splits[1]["val"]) == sorted(splits[0]["train"] + splits[0]["val"])
    assert results[0]["cv_group"] == results[1]["cv_group"] and [r["fold"] for r in results] == [0, 1]
    assert all((cv / f"fold_{k}" / "postprocessing.json").is_file() for k in (0, 1))

    assert main(["cv", "--folder", str(cv)]) == 0
    summary = json.loads((cv / "cv.json").read_text(encoding="utf-8"))[0]
    assert summary["complete"] and summary["folds"] == 2
    assert summary["val_dice_mean_std"][0] == pytest.approx(np.mean([r["best_val_dice"] for r in results]))
    assert "2/2 folds" in (cv / "cv.md").read_text(encoding="utf-8")
    # the same summary from mlflow, where the fold runs are tagged
    assert main(["cv", "--experiment", "folds", "--tracking-uri", uri, "--output", str(tmp_path / "from_mlflow")]) == 0
    logged = json.loads((tmp_path / "from_mlflow" / "cv.json").read_text(encoding="utf-8"))
    assert len(logged) == 1 and logged[0]["cv_group"] == summary["cv_group"] and logged[0]["complete"]
    assert logged[0]["val_dice_mean_std"][0] == pytest.approx(summary["val_dice_mean_std"][0])

    case = data / "imagesTr" / f"{splits[0]['test'][0]}.nii.gz"
    assert main(["predict", "--run", str(cv), "--input", str(case), "--output", str(tmp_path / "ens")]) == 0
    both = [str(cv / "fold_0"), str(cv / "fold_1")]
    assert main(["predict", "--run", *both, "--input", str(case), "--output", str(tmp_path / "two")]) == 0
    ens, two = (np.asarray(nib.load(str(tmp_path / d / case.name)).dataobj) for d in ("ens", "two"))
    np.testing.assert_array_equal(ens, two)
    assert main(["train", "--no-track", "--config", str(config), "--data", str(data), "--fold", "1"]) == 2
    assert "--fold 1: needs --folds N" in capsys.readouterr().err
