import json
import math

import numpy as np
import pytest

from imgx3d.errors import InputError
from imgx3d.evaluation.metrics import evaluate_folders, score_case
from tests.conftest import save_nifti


def test_known_values_with_anisotropic_spacing():
    ref = np.zeros((20, 20, 20), int)
    ref[5:10, 5:10, 5:10] = 1
    pred = ref.copy()
    pred[5:10, 5:10, 10] = 1  # one extra slice along z
    pred[15, 15, 15] = 2      # a false class-2 voxel
    scores = score_case(pred, ref, [1, 2, 3], spacing=(1.0, 1.0, 2.0))
    assert scores[1]["dice"] == pytest.approx(2 * 125 / (125 + 150))
    assert scores[1]["iou"] == pytest.approx(125 / 150)
    assert scores[1]["hd95"] == pytest.approx(2.0)  # one z voxel = 2 mm
    assert scores[2]["dice"] == 0.0 and math.isnan(scores[2]["hd95"])  # predicted, absent in reference
    assert scores[3] == {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "nsd": 1.0}  # absent in both


def test_evaluate_folders_writes_csv_and_summary(tmp_path):
    ref = np.zeros((10, 10, 10), np.uint8)
    ref[2:6, 2:6, 2:6] = 1  # 64 voxels
    ref[7:9, 7:9, 7:9] = 2  # 8 voxels
    half = ref.copy()
    half[2:6, 2:6, 4:6] = 0  # case b: half the organ found (Dice 2*32/96), the vessel exactly
    for case, pred in (("a", ref), ("b", half)):
        save_nifti(tmp_path / "ref" / f"{case}.nii.gz", ref)
        save_nifti(tmp_path / "pred" / f"{case}.nii.gz", pred)
    rows, summary = evaluate_folders(tmp_path / "pred", tmp_path / "ref", {0: "bg", 1: "organ", 2: "vessel"},
                                     tmp_path / "out")
    assert len(rows) == 4
    organ = summary["per_class"]["organ"]["dice"]
    assert organ["mean"] == pytest.approx((1 + 2 / 3) / 2) and organ["std"] == pytest.approx(1 / 6)  # std over cases
    assert summary["per_class"]["organ"]["iou"]["mean"] == pytest.approx((1 + 0.5) / 2)
    assert summary["per_class"]["vessel"]["dice"] == {"mean": 1.0, "std": 0.0}
    assert summary["foreground_mean"]["dice"] == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)
    csv_rows = (tmp_path / "out" / "metrics.csv").read_text().splitlines()
    assert csv_rows[0].startswith("case,class,name,dice") and len(csv_rows) == 5
    assert [r.split(",")[:3] for r in csv_rows[1:]] == [["a", "1", "organ"], ["a", "2", "vessel"],
                                                         ["b", "1", "organ"], ["b", "2", "vessel"]]
    assert float(csv_rows[3].split(",")[3]) == pytest.approx(2 / 3)
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["foreground_mean"]["dice"] == pytest.approx(summary["foreground_mean"]["dice"])


def test_evaluate_refuses_grid_mismatch_and_missing_reference(tmp_path):
    save_nifti(tmp_path / "ref" / "a.nii.gz", np.zeros((4, 4, 4), np.uint8))
    save_nifti(tmp_path / "pred" / "a.nii.gz", np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(InputError, match="not on the grid"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref")
    save_nifti(tmp_path / "pred" / "b.nii.gz", np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(InputError, match="no reference for case 'b'"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref")
