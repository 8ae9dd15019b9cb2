import json

import numpy as np
import pytest

from imgx3d.config import DataConfig, SplitConfig
from imgx3d.data.catalog import find_cases, make_split
from imgx3d.errors import InputError
from tests.conftest import save_nifti

VOL = np.zeros((4, 4, 4), np.float32)


def _label(value=1):
    a = np.zeros((4, 4, 4), np.uint8)
    a[1, 1, 1] = value
    return a


def test_msd(msd_dataset):
    catalog = find_cases(msd_dataset)
    assert catalog.layout == "msd" and len(catalog.cases) == 8
    assert catalog.labels == {0: "background", 1: "sphere", 2: "cube"} and catalog.num_classes == 3


def test_msd_listing_absent_file_and_malformed_json(msd_dataset):
    meta = json.loads((msd_dataset / "dataset.json").read_text())
    meta["training"].append({"image": "./imagesTr/ghost.nii.gz", "label": "./labelsTr/ghost.nii.gz"})
    (msd_dataset / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="ghost.nii.gz, which does not exist"):
        find_cases(msd_dataset)
    (msd_dataset / "dataset.json").write_text("{not json")
    with pytest.raises(InputError, match="malformed JSON"):
        find_cases(msd_dataset)


def test_nnunet_v2(tmp_path):
    for case in ("a", "b"):
        for c in range(2):
            save_nifti(tmp_path / "imagesTr" / f"{case}_{c:04d}.nii.gz", VOL)
        save_nifti(tmp_path / "labelsTr" / f"{case}.nii.gz", _label())
    (tmp_path / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "tumour": 1}, "file_ending": ".nii.gz"}))
    catalog = find_cases(tmp_path)
    assert catalog.layout == "nnunet" and catalog.channel_names == ["T1", "T2"]
    assert [len(c.images) for c in catalog.cases] == [2, 2]
    assert catalog.labels == {0: "background", 1: "tumour"}


def test_btcv(tmp_path):
    for n in ("0001", "0002"):
        save_nifti(tmp_path / "img" / f"img{n}.nii.gz", VOL)
        save_nifti(tmp_path / "label" / f"label{n}.nii.gz", _label())
    catalog = find_cases(tmp_path)
    assert catalog.layout == "btcv" and [c.case_id for c in catalog.cases] == ["btcv_0001", "btcv_0002"]
    assert catalog.num_classes == 14


def test_case_folders_with_predefined_split(tmp_path):
    for group, case in (("train", "p1"), ("train", "p2"), ("validation", "p3"), ("test", "p4")):
        for name in ("Flair_x.nii.gz", "T1c_x.nii.gz"):
            save_nifti(tmp_path / group / case / name, VOL)
        save_nifti(tmp_path / group / case / "OT.nii.gz", _label(4))
    cfg = DataConfig(channels=["Flair*", "T1c*"], label_pattern="OT*", labels={1: "a", 2: "b", 3: "c", 4: "d"})
    catalog = find_cases(tmp_path, cfg)
    assert catalog.layout == "cases" and catalog.in_channels == 2 and catalog.num_classes == 5
    split = make_split(catalog, SplitConfig())
    assert (split.train, split.val, split.test) == (["p1", "p2"], ["p3"], ["p4"])


def test_pairs_with_labels_inferred(tmp_path):
    for i in range(3):
        save_nifti(tmp_path / "images" / f"c{i}.nii.gz", VOL)
        save_nifti(tmp_path / "labels" / f"c{i}.nii.gz", _label(i + 1))
    catalog = find_cases(tmp_path)
    assert catalog.layout == "pairs" and catalog.labels == {0: "background", 1: "label_1", 2: "label_2", 3: "label_3"}


def test_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        find_cases(tmp_path / "nothing")
    (tmp_path / "empty" / "images").mkdir(parents=True)
    with pytest.raises(InputError, match="no cases found"):
        find_cases(tmp_path / "empty")
    (tmp_path / "odd").mkdir()
    with pytest.raises(InputError, match="layout not recognised"):
        find_cases(tmp_path / "odd")


def test_split_is_deterministic_disjoint_and_complete(msd_dataset):
    catalog = find_cases(msd_dataset)
    a = make_split(catalog, SplitConfig(seed=3, test_fraction=0.25, val_fraction=0.2))
    b = make_split(catalog, SplitConfig(seed=3, test_fraction=0.25, val_fraction=0.2))
    c = make_split(catalog, SplitConfig(seed=4, test_fraction=0.25, val_fraction=0.2))
    assert a == b and a != c
    assert (len(a.train), len(a.val), len(a.test)) == (5, 1, 2)
    assert sorted(a.train + a.val + a.test) == sorted(x.case_id for x in catalog.cases)


def test_folds_validate_each_non_test_case_once_and_leave_the_test_set_alone(msd_dataset):
    catalog = find_cases(msd_dataset)  # 8 cases: 2 for test, 6 cut into 3 folds of 2
    holdout = make_split(catalog, SplitConfig(seed=3, test_fraction=0.25))
    folds = [make_split(catalog, SplitConfig(seed=3, test_fraction=0.25, folds=3, fold=k)) for k in range(3)]
    assert all(f.test == holdout.test for f in folds)  # the same test cases with or without folds
    validated = [case for f in folds for case in f.val]
    assert sorted(validated) == sorted(set(x.case_id for x in catalog.cases) - set(holdout.test))
    assert len(validated) == len(set(validated)) == 6
    for f in folds:
        assert len(f.val) == 2 and sorted(f.train + f.val) == sorted(validated)
    no_test = [make_split(catalog, SplitConfig(seed=3, test_fraction=0, folds=4, fold=k)) for k in range(4)]
    assert all(not f.test for f in no_test)
    assert sorted(c for f in no_test for c in f.val) == sorted(x.case_id for x in catalog.cases)


def test_max_train_keeps_a_seeded_subset_and_the_same_val_and_test(msd_dataset):
    catalog = find_cases(msd_dataset)
    full = make_split(catalog, SplitConfig(seed=3, test_fraction=0.25, val_fraction=0.2))
    low = make_split(catalog, SplitConfig(seed=3, test_fraction=0.25, val_fraction=0.2, max_train=2))
    assert len(low.train) == 2 and set(low.train) < set(full.train)
    assert (low.val, low.test) == (full.val, full.test)
