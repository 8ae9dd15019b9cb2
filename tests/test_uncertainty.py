"""Uncertainty maps from the spread of a prediction's members, their per-case score, and how good they are."""

import math

import nibabel as nib
import numpy as np
import pytest
import torch

from imgx3d.evaluation.uncertainty import case_uncertainty, error_auc, expected_calibration_error, region_of_interest
from imgx3d.inference.uncertainty import Spread, entropy
from tests.conftest import train_tiny_unet


def test_entropy_and_mutual_information_by_hand():
    """Two members at one voxel, (0.9, 0.1) and (0.5, 0.5): mean (0.7, 0.3); H = 0.6109 nats; the members'
    mean entropy (0.3251 + 0.6931) / 2 = 0.5091; mutual information 0.1018. A second voxel where they agree
    has no mutual information."""
    spread = Spread()
    spread.add(torch.tensor([[0.9, 0.2], [0.1, 0.8]]))
    spread.add(torch.tensor([[0.5, 0.2], [0.5, 0.8]]))
    h, mutual = spread.maps()
    h_mean = -(0.7 * math.log(0.7) + 0.3 * math.log(0.3))
    members = (-(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) + math.log(2)) / 2
    assert h[0].item() == pytest.approx(h_mean, abs=1e-6) and mutual[0].item() == pytest.approx(h_mean - members,
                                                                                                abs=1e-6)
    assert mutual[1].item() == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(spread.mean, torch.tensor([[0.7, 0.2], [0.3, 0.8]]))
    alone = Spread()
    alone.add(torch.tensor([[1.0], [0.0]]))
    assert alone.maps().shape == (1, 1) and alone.maps().item() == 0.0  # certain: 0, not NaN
    assert entropy(torch.full((4, 1), 0.25)).item() == pytest.approx(math.log(4))


def test_case_score_error_auc_and_calibration_by_hand():
    entropy_map = np.array([[0.0, math.log(3)], [0.2 * math.log(3), 0.9 * math.log(3)]])
    foreground = np.array([[False, True], [True, False]])
    score = case_uncertainty(entropy_map, foreground, 3, 0.5, 4)
    assert score.foreground_entropy == pytest.approx(0.6) and score.uncertain_ml == pytest.approx(1.0)
    # errors at the two most uncertain voxels of four: AUC 1; reversed: 0; a tie between an error and a
    # correct voxel counts half
    assert error_auc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert error_auc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1])) == 0.0
    assert error_auc(np.array([0.5, 0.5]), np.array([0, 1])) == 0.5
    # two bins: confidence 0.95 (4 voxels, 3 right: |0.75 - 0.95| = 0.2) and 0.55 (2 voxels, both right: 0.45)
    ece = expected_calibration_error(np.array([0.95] * 4 + [0.55] * 2), np.array([1, 1, 1, 0, 1, 1]), bins=10)
    assert ece == pytest.approx((4 * 0.2 + 2 * 0.45) / 6)
    pred, ref = np.zeros((20, 20, 20), int), np.zeros((20, 20, 20), int)
    pred[8:10, 8:10, 8:10], ref[9:12, 9:11, 9:10] = 1, 2
    assert region_of_interest(pred, ref, 2) == (slice(6, 14), slice(6, 13), slice(6, 12))


def test_predict_writes_native_grid_maps_with_members_and_costs_nothing_when_off(tmp_path, monkeypatch):
    from imgx3d.cli import main

    run, data = train_tiny_unet(tmp_path)
    source = sorted((data / "imagesTr").glob("*.nii.gz"))
    base = ["predict", "--run", str(run), "--input", str(data / "imagesTr")]
    assert main([*base, "--output", str(tmp_path / "alone"), "--uncertainty"]) == 0
    assert main([*base, "--output", str(tmp_path / "tta"), "--uncertainty", "--tta"]) == 0
    import imgx3d.inference.predictor as predictor_module

    monkeypatch.setattr(predictor_module, "Spread", lambda: pytest.fail("a Spread without --uncertainty"))
    assert main([*base, "--output", str(tmp_path / "off")]) == 0
    assert main([*base, "--output", str(tmp_path / "tta_off"), "--tta"]) == 0
    for image in source:
        case = image.name.removesuffix(".nii.gz")
        native = nib.load(image)
        alone = nib.load(tmp_path / "alone" / f"{case}_uncertainty.nii.gz")
        both = nib.load(tmp_path / "tta" / f"{case}_uncertainty.nii.gz")
        assert alone.shape == native.shape and both.shape == (*native.shape, 2)  # entropy only; + mutual information
        assert np.allclose(alone.affine, native.affine) and np.allclose(both.affine, native.affine)
        maps = both.get_fdata()
        assert (maps >= 0).all() and maps[..., 1].max() > 0 and (maps[..., 1] <= maps[..., 0] + 1e-5).all()
        # the label maps are those of the same prediction without --uncertainty
        assert (tmp_path / "off" / f"{case}.nii.gz").read_bytes() == (tmp_path / "alone" / f"{case}.nii.gz").read_bytes()
        assert (tmp_path / "tta_off" / f"{case}.nii.gz").read_bytes() == (tmp_path / "tta" / f"{case}.nii.gz").read_bytes()
    assert not list((tmp_path / "off").glob("*_uncertainty*")) and not (tmp_path / "off" / "uncertainty.csv").exists()
    table = (tmp_path / "tta" / "uncertainty.csv").read_text().splitlines()
    assert table[0] == "case,foreground_entropy,uncertain_ml,members,map" and len(table) == len(source) + 1
    scores = [float(line.split(",")[1]) for line in table[1:]]
    assert scores == sorted(scores, reverse=True) and {line.split(",")[3] for line in table[1:]} == {"8"}


def test_imgx_samples_join_the_spread_and_leave_the_prediction_unchanged():
    from imgx3d.inference.predictor import predict_probabilities
    from imgx3d.methods.base import build_method

    torch.manual_seed(0)
    method = build_method({"name": "imgx", "channels": [8, 16], "strides": [2], "num_samples": 3}, 3, 1).eval()
    with torch.no_grad():
        for p in method.parameters():
            p.normal_(0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
    image = torch.randn(1, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    whole = lambda fn, x: fn(x)  # noqa: E731
    plain = predict_probabilities(method, image, whole, tta_flips=[0])
    spread = Spread()
    recorded = predict_probabilities(method, image, whole, tta_flips=[0], spread=spread)
    torch.testing.assert_close(recorded, plain)
    assert spread.count == 6  # 2 mirrorings x 3 samples
    assert spread.maps().shape == (2, 8, 8, 8) and spread.maps()[1].max() > 0
