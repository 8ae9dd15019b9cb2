"""The bad-input catalogue: every case is one line on stderr naming the file (or key) and the
fix, exit code 2, no traceback, and the inputs byte-identical afterwards."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from imgx3d.cli import main
from tests.conftest import TINY_OVERRIDES, save_nifti, tree_digest, write_msd_dataset
from tests.test_io import write_dicom_series

LPS = np.diag([-1.0, -1.0, 1.5, 1.0])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny trained U-Net checkpoint and its (clean) dataset, shared by the predict cases."""
    root = tmp_path_factory.mktemp("trained")
    data = write_msd_dataset(root / "msd")
    config = root / "cfg.yaml"
    config.write_text("method: {name: unet}\n")
    assert main(["train", "--no-track", "--config", str(config), "--data", str(data), "--run-dir", str(root / "run"),
                 *TINY_OVERRIDES]) == 0
    return root / "run" / "best.pt"


def _image(root: Path, i: int = 0) -> Path:
    return root / "imagesTr" / f"case_{i}.nii.gz"


def _label(root: Path, i: int = 0) -> Path:
    return root / "labelsTr" / f"case_{i}.nii.gz"


def _rewrite(path: Path, array: np.ndarray | None = None, affine: np.ndarray | None = None) -> Path:
    img = nib.load(str(path))
    save_nifti(path, np.asarray(img.dataobj) if array is None else array, img.affine if affine is None else affine)
    return path


def _train(root: Path, tmp: Path, *extra: str) -> list[str]:
    config = tmp / "cfg.yaml"
    if not config.exists():
        config.write_text("method: {name: unet}\n")
    return ["train", "--no-track", "--config", str(config), "--data", str(root), "--run-dir", str(tmp / "run"),
            *TINY_OVERRIDES, *extra]


def _predict(ckpt: Path, inputs: list[Path], output: Path) -> list[str]:
    return ["predict", "--checkpoint", str(ckpt), "--input", *map(str, inputs), "--output", str(output)]


# Each case breaks a fresh copy of the dataset (``root``) and returns (argv, what the message must name).
def truncated(root, tmp, ckpt):
    path = _image(root)
    path.write_bytes(path.read_bytes()[:200])
    return _train(root, tmp), f"{path}: unreadable or truncated"


def wrong_magic(root, tmp, ckpt):
    _image(root).write_bytes(gzip.compress(b"definitely not a NIfTI header " * 40))
    return _train(root, tmp), f"{_image(root)}: unreadable or truncated"


def size_mismatch(root, tmp, ckpt):
    path = root / "imagesTr" / "raw.nii"  # uncompressed: the header promises more voxels than the file has
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), LPS), str(path))
    path.write_bytes(path.read_bytes()[:-512])
    return _predict(ckpt, [path], tmp / "out"), f"{path}: unreadable or truncated NIfTI file .*Expected"


def four_d_label(root, tmp, ckpt):
    _rewrite(_label(root, 1), np.zeros((20, 24, 16, 2), np.uint8))
    return _train(root, tmp), f"{_label(root, 1)}: is 4D .* split it"


def two_d_file(root, tmp, ckpt):
    path = save_nifti(tmp / "in" / "flat.nii.gz", np.ones((16, 16), np.float32))
    return _predict(ckpt, [path], tmp / "out"), f"{path}: is 2D .* --image"


def zero_size(root, tmp, ckpt):
    path = save_nifti(tmp / "in" / "empty.nii.gz", np.ones((16, 0, 8), np.float32))
    return _predict(ckpt, [path], tmp / "out"), f"{path}: has a zero-size dimension"


def nan_voxels(root, tmp, ckpt):
    data = np.asarray(nib.load(str(_image(root, 4))).dataobj).copy()
    data[1, 1, 1] = np.nan
    _rewrite(_image(root, 4), data)
    return _train(root, tmp), f"{_image(root, 4)}: contains 1 NaN or infinite"


def inf_voxels(root, tmp, ckpt):
    data = np.asarray(nib.load(str(_image(root, 5))).dataobj).copy()
    data[2, 2, 2] = -np.inf
    _rewrite(_image(root, 5), data)
    return _train(root, tmp), f"{_image(root, 5)}: contains 1 NaN or infinite"


def constant_image(root, tmp, ckpt):
    path = save_nifti(tmp / "in" / "flat.nii.gz", np.full((16, 16, 8), 3.0, np.float32))
    return _predict(ckpt, [path], tmp / "out"), f"{path}: image is constant"


def unexpected_label(root, tmp, ckpt):
    data = np.asarray(nib.load(str(_label(root, 3))).dataobj).copy()
    data[0, 0, 0] = 7
    _rewrite(_label(root, 3), data)
    return _train(root, tmp), rf"{_label(root, 3)}: label values \[7\] are not among"


def float_label(root, tmp, ckpt):
    data = np.asarray(nib.load(str(_label(root, 2))).dataobj).astype(np.float32)
    data[0, 0, 0] = 0.5
    _rewrite(_label(root, 2), data)
    return _train(root, tmp), f"{_label(root, 2)}: label map has non-integer values"


def negative_label(root, tmp, ckpt):
    data = np.asarray(nib.load(str(_label(root, 2))).dataobj).astype(np.int16)
    data[0, 0, 0] = -1
    _rewrite(_label(root, 2), data)
    return _train(root, tmp), f"{_label(root, 2)}: label map has negative values"


def shape_mismatch(root, tmp, ckpt):
    save_nifti(_label(root, 1), np.zeros((5, 5, 5), np.uint8), LPS)
    return _train(root, tmp), f"{_label(root, 1)}: label shape"


def affine_mismatch(root, tmp, ckpt):
    _rewrite(_label(root, 2), affine=np.diag([-1.0, -1.0, 3.0, 1.0]))
    return _train(root, tmp), f"{_label(root, 2)}: label affine differs"


def sheared_affine(root, tmp, ckpt):
    shear = LPS.copy()
    shear[0, 2] = 0.4
    path = save_nifti(tmp / "in" / "tilted.nii.gz", np.random.default_rng(0).random((16, 16, 8)).astype(np.float32), shear)
    return _predict(ckpt, [path], tmp / "out"), f"{path}: affine is sheared .* orthogonal grid"


def zero_spacing(root, tmp, ckpt):
    img = nib.Nifti1Image(np.random.default_rng(0).random((16, 16, 8)).astype(np.float32), np.eye(4))
    img.set_qform(None, code=0)
    img.set_sform(np.diag([1.0, 0.0, 1.0, 1.0]), code=1)
    path = tmp / "in" / "zero.nii.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return _predict(ckpt, [path], tmp / "out"), f"{path}: zero voxel spacing"


def dicom_mixed_series(root, tmp, ckpt):
    folder = write_dicom_series(tmp / "in" / "mixed", (np.arange(6 * 7 * 4).reshape(6, 7, 4) % 50).astype(np.int16))
    other = write_dicom_series(tmp / "other", np.ones((6, 7, 3), np.int16))
    for f in other.iterdir():  # a second series (other UID) in the same folder
        data = f.read_bytes().replace(b"1.2.826.0.1.3680043.2.1125.1.42", b"1.2.826.0.1.3680043.2.1125.1.43")
        (folder / f"b_{f.name}").write_bytes(data)
    return _predict(ckpt, [folder], tmp / "out"), f"{folder}: holds 2 DICOM series; put each series in its own folder"


def dicom_missing_slices(root, tmp, ckpt):
    folder = write_dicom_series(tmp / "in" / "gappy", (np.arange(6 * 7 * 6).reshape(6, 7, 6) % 50).astype(np.int16))
    (folder / "slice003.dcm").unlink()
    return _predict(ckpt, [folder], tmp / "out"), f"{folder}: DICOM series has a gap .* slices are missing"


def empty_input_folder(root, tmp, ckpt):
    (tmp / "in").mkdir()
    return _predict(ckpt, [tmp / "in"], tmp / "out"), rf"{tmp / 'in'}: no input volumes \(.nii/.nii.gz/.nrrd/.mha or DICOM folders\) found"


def empty_dataset(root, tmp, ckpt):
    shutil.rmtree(root)
    (root / "images").mkdir(parents=True)
    return _train(root, tmp), f"{root}: no cases found"


def symlink_loop(root, tmp, ckpt):
    (tmp / "in").mkdir()
    a, b = tmp / "in" / "a.nii.gz", tmp / "in" / "b.nii.gz"
    a.symlink_to(b)
    b.symlink_to(a)
    return _predict(ckpt, [a], tmp / "out"), f"{a}: is a broken symbolic link or a link loop"


def json_malformed(root, tmp, ckpt):
    (root / "dataset.json").write_text('{"training": [')
    return _train(root, tmp), f"{root / 'dataset.json'}: malformed JSON"


def json_missing_keys(root, tmp, ckpt):
    meta = json.loads((root / "dataset.json").read_text())
    del meta["training"]
    (root / "dataset.json").write_text(json.dumps(meta))
    return _train(root, tmp), f"{root / 'dataset.json'}: .*training"


def json_absent_file(root, tmp, ckpt):
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"][0]["image"] = "./imagesTr/ghost.nii.gz"
    (root / "dataset.json").write_text(json.dumps(meta))
    return _train(root, tmp), f"{root / 'dataset.json'}: lists .*ghost.nii.gz, which does not exist; fix the entry or add the file"


def duplicate_ids(root, tmp, ckpt):
    pairs = tmp / "pairs"
    for folder in ("images", "labels"):
        (pairs / folder).mkdir(parents=True)
        shutil.copy(_image(root) if folder == "images" else _label(root), pairs / folder / "a.nii.gz")
        shutil.copy(_image(root, 1) if folder == "images" else _label(root, 1), pairs / folder / "a.nii")
    return _train(pairs, tmp), f"{pairs}: duplicate case id 'a'"


def config_unknown_key(root, tmp, ckpt):
    return _train(root, tmp, "train.learning_rate=0.1"), "unknown config key 'train.learning_rate'"


def config_wrong_type(root, tmp, ckpt):
    return _train(root, tmp, "train.max_steps=lots"), "config key 'train.max_steps' must be int, got 'lots'"


def config_out_of_range(root, tmp, ckpt):
    return _train(root, tmp, "data.pos_fraction=1.5"), r"config key 'data.pos_fraction' must be in \[0, 1\]"


def config_missing_file(root, tmp, ckpt):
    argv = _train(root, tmp)
    argv[argv.index("--config") + 1] = str(tmp / "nope.yaml")
    return argv, f"{tmp / 'nope.yaml'}: config file not found"


def checkpoint_other_method(root, tmp, ckpt):
    run = tmp / "other"
    run.mkdir()
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    torch.save(state, run / "last.pt")
    config = tmp / "imgx.yaml"
    config.write_text("method: {name: imgx}\n")
    return ["train", "--no-track", "--config", str(config), "--data", str(root), "--resume", str(run)], \
        f"{run / 'last.pt'}: was trained with method 'unet'"


def checkpoint_incompatible_shape(root, tmp, ckpt):
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    state["config"]["method"]["channels"] = [8, 16, 32]  # the weights are [4, 8, 16]
    torch.save(state, tmp / "changed.pt")
    return _predict(tmp / "changed.pt", [_image(root)], tmp / "out"), f"{tmp / 'changed.pt'}: .*(shape|match)"


def not_a_checkpoint(root, tmp, ckpt):
    (tmp / "junk.pt").write_bytes(b"not a torch file")
    return _predict(tmp / "junk.pt", [_image(root)], tmp / "out"), f"{tmp / 'junk.pt'}: not a readable checkpoint"


def output_inside_input(root, tmp, ckpt):
    return _predict(ckpt, [root / "imagesTr"], root / "imagesTr" / "pred"), \
        f"{root / 'imagesTr' / 'pred'}: is inside the input folder"


def output_not_writable(root, tmp, ckpt):
    return _predict(ckpt, [_image(root)], Path("/proc/imgx3d-out")), "/proc/imgx3d-out: cannot create the output folder"


def image_for_volume_run(root, tmp, ckpt):
    (tmp / "in").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp / "in" / "x.png")
    return _predict(ckpt, [tmp / "in" / "x.png"], tmp / "out"), f"{tmp / 'in' / 'x.png'}: is a 2D image but this run"


def masks_0_255_without_threshold(root, tmp, ckpt):
    pngs = tmp / "pngs"
    for folder, value in (("images", 90), ("labels", 255)):
        (pngs / folder).mkdir(parents=True)
        array = np.zeros((16, 16), np.uint8)
        array[4:9, 4:9] = value
        Image.fromarray(array).save(pngs / folder / "0.png")
    config = tmp / "sd.yaml"
    config.write_text("method: {name: unet, spatial_dims: 2}\n")
    return ["train", "--image", "--no-track", "--config", str(config), "--data", str(pngs)], \
        f"{pngs}: label files hold values .* data.mask_threshold=127"


def unreachable_tracking(root, tmp, ckpt):
    argv = [a for a in _train(root, tmp) if a != "--no-track"]
    return argv + ["--tracking-uri", "http://127.0.0.1:9"], "mlflow tracking URI 'http://127.0.0.1:9' unusable"


def unreadable_file(root, tmp, ckpt):
    return _predict(ckpt, [_image(root, 6)], tmp / "out"), f"{_image(root, 6)}: cannot be read .*permissions"


def _absurd_header(path: Path, gz: bool) -> Path:
    """A NIfTI whose header claims 4000^3 float32 voxels (256 GB) over 8x8x8 voxels of data."""
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), LPS), str(path))
    raw = bytearray(gzip.decompress(path.read_bytes()) if gz else path.read_bytes())
    raw[42:48] = np.array([4000, 4000, 4000], "<i2").tobytes()  # dim[1..3]
    path.write_bytes(gzip.compress(bytes(raw)) if gz else bytes(raw))
    return path


def absurd_header_gz(root, tmp, ckpt):
    (tmp / "in").mkdir()
    path = _absurd_header(tmp / "in" / "huge.nii.gz", gz=True)
    return _predict(ckpt, [path], tmp / "out"), f"{path}: unreadable or truncated NIfTI file \\(Expected 256000000352 bytes"


def absurd_header_plain(root, tmp, ckpt):
    (tmp / "in").mkdir()
    path = _absurd_header(tmp / "in" / "huge.nii", gz=False)
    return _predict(ckpt, [path], tmp / "out"), f"{path}: unreadable or truncated NIfTI file \\(Expected 256000000352 bytes"


def absurd_header_in_dataset(root, tmp, ckpt):
    path = _image(root, 3)
    data = np.asarray(nib.load(str(path)).dataobj)
    save_nifti(path, data, LPS)
    _absurd_header(path, gz=True)
    return _train(root, tmp), f"{path}: unreadable or truncated NIfTI file .*header is corrupt"


def truncated_gzip_stream(root, tmp, ckpt):
    path = _label(root, 5)
    path.write_bytes(path.read_bytes()[:-40])  # the end of the gzip stream and its trailer are gone
    return _train(root, tmp), f"{path}: unreadable or truncated NIfTI file"


def resume_without_last_pt(root, tmp, ckpt):
    (tmp / "empty_run").mkdir()
    argv = _train(root, tmp)
    return [*argv, "--resume", str(tmp / "empty_run")], f"{tmp / 'empty_run'}: no last.pt to resume from"


def negative_workers(root, tmp, ckpt):
    return [*_predict(ckpt, [_image(root)], tmp / "out"), "--workers", "-1"], "--workers -1: must be >= 0"


def same_case_name_twice(root, tmp, ckpt):
    (tmp / "in").mkdir()
    other = tmp / "in" / "case_0.nii"
    nib.save(nib.load(str(_image(root))), str(other))
    return _predict(ckpt, [_image(root), other], tmp / "out"), "two inputs share the case name 'case_0'"


def output_is_a_file(root, tmp, ckpt):
    (tmp / "taken.txt").write_text("not a folder")
    return _predict(ckpt, [_image(root)], tmp / "taken.txt"), f"{tmp / 'taken.txt'}: cannot create the output folder"


def truncated_checkpoint(root, tmp, ckpt):
    (tmp / "half.pt").write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    return _predict(tmp / "half.pt", [_image(root)], tmp / "out"), f"{tmp / 'half.pt'}: not a readable checkpoint"


def run_folder_without_checkpoint(root, tmp, ckpt):
    (tmp / "norun").mkdir()
    return ["predict", "--run", str(tmp / "norun"), "--input", str(_image(root)), "--output", str(tmp / "out")], \
        f"{tmp / 'norun' / 'best.pt'}: checkpoint not found"


def config_invalid_yaml(root, tmp, ckpt):
    (tmp / "cfg.yaml").write_text("method: {name: unet\n")
    return _train(root, tmp), f"{tmp / 'cfg.yaml'}: not valid YAML at line 2, column 1 .*; fix the syntax"


def config_extends_loop(root, tmp, ckpt):
    (tmp / "cfg.yaml").write_text("extends: other.yaml\n")
    (tmp / "other.yaml").write_text("extends: cfg.yaml\n")
    return _train(root, tmp), "'extends' loops back to itself"


def config_unknown_method(root, tmp, ckpt):
    return _train(root, tmp, "method.name=nnunet"), "unknown method 'nnunet'; available: "


def override_without_equals(root, tmp, ckpt):
    return _train(root, tmp, "train.max_steps"), "override 'train.max_steps' must look like key=value"


def config_method_key_unknown(root, tmp, ckpt):
    return _train(root, tmp, "method.depth=5"), "unknown config key 'method.depth'"


def dataset_folder_missing(root, tmp, ckpt):
    argv = _train(root, tmp)
    argv[argv.index("--data") + 1] = str(tmp / "no_such_data")
    return argv, f"{tmp / 'no_such_data'}: dataset folder not found; check --data"


def evaluate_without_matching_references(root, tmp, ckpt):
    (tmp / "preds").mkdir()
    shutil.copy(_label(root), tmp / "preds" / "other_name.nii.gz")
    return ["evaluate", "--pred", str(tmp / "preds"), "--ref", str(root / "labelsTr")], \
        f"{root / 'labelsTr'}: no reference for case 'other_name'"


def too_few_cases_for_the_split(root, tmp, ckpt):
    return _train(root, tmp, "data.split.test_fraction=0.95"), f"{root}: only 8 labelled cases; too few for the configured split"


def more_folds_than_cases(root, tmp, ckpt):
    return (_train(root, tmp, "data.split.folds=7"),
            f"{root}: 6 labelled cases outside the test set cannot make 7 folds; use fewer folds or a smaller "
            "data.split.test_fraction")


def device_not_on_this_machine(root, tmp, ckpt):
    return [*_predict(ckpt, [_image(root)], tmp / "out"), "--device", "cuda:99"], "--device cuda:99: "


def synth_with_a_segmenter_run(root, tmp, ckpt):
    return ["synth", "--run", str(ckpt), "--n", "2", "--output", str(tmp / "pairs_out")], \
        "method 'unet' does not generate image/mask pairs"


CASES = [truncated, wrong_magic, size_mismatch, four_d_label, two_d_file, zero_size, nan_voxels, inf_voxels,
         constant_image, unexpected_label, float_label, negative_label, shape_mismatch, affine_mismatch, sheared_affine,
         zero_spacing, dicom_mixed_series, dicom_missing_slices, empty_input_folder, empty_dataset, symlink_loop,
         json_malformed, json_missing_keys, json_absent_file, duplicate_ids, config_unknown_key, config_wrong_type,
         config_out_of_range, config_missing_file, checkpoint_other_method, checkpoint_incompatible_shape,
         not_a_checkpoint, output_inside_input, output_not_writable, image_for_volume_run,
         masks_0_255_without_threshold, unreachable_tracking, unreadable_file, absurd_header_gz, absurd_header_plain,
         absurd_header_in_dataset, truncated_gzip_stream, resume_without_last_pt, negative_workers, same_case_name_twice,
         output_is_a_file, truncated_checkpoint, run_folder_without_checkpoint, config_invalid_yaml, config_extends_loop,
         config_unknown_method, override_without_equals, config_method_key_unknown, dataset_folder_missing,
         evaluate_without_matching_references, synth_with_a_segmenter_run, too_few_cases_for_the_split,
         more_folds_than_cases, device_not_on_this_machine]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_is_one_line_exit_2_inputs_untouched(case, trained, tmp_path, capsys, monkeypatch):
    root = write_msd_dataset(tmp_path / "data")
    argv, expected = case(root, tmp_path, trained)
    if case is unreadable_file:  # tests run as root, which permission bits do not stop: deny it the way a user meets it
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(_image(root, 6))
                            else real_access(p, mode, **kw))
    before = {p: tree_digest(p) for p in (root, tmp_path / "in", tmp_path / "pairs", tmp_path / "pngs") if p.exists()}
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("imgx3d: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(expected, err), err
    for folder, digest in before.items():
        assert tree_digest(folder) == digest, f"{folder} changed"
