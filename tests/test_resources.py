"""Resource faults: no room to write (full disk, file-size limit), out of memory (host, GPU).

Each writer is run with a fault injected where the file reaches its final name (``os.replace``
raising ENOSPC, see :func:`disk_full`) or in a subprocess under ``RLIMIT_FSIZE`` (the kernel's
own EFBIG mid-write). Every fault ends in one line naming the file and the fix, exit code 2,
no file half-written under its final name, the previous file intact, and a rerun finishes.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import resource
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from imgx3d.cli import main
from imgx3d.errors import ResourceError, resource_error
from imgx3d.evaluation.compare import compare, write_csv
from imgx3d.evaluation.plots import metric_boxplots
from imgx3d.inference import predictor as infer
from imgx3d.inference.predictor import WINDOW_PATH_VOLUMES, estimate_host_memory
from imgx3d.methods.unet import UNetMethod
from tests.conftest import TINY_OVERRIDES, train_tiny_unet, write_msd_dataset
from tests.test_compare import record

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GIT_PYTHON_REFRESH": "quiet"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny U-Net run folder and its dataset."""
    return train_tiny_unet(tmp_path_factory.mktemp("resources"))


def disk_full(monkeypatch, pattern: str) -> list[str]:
    """Make the disk "fill up" when a file whose name matches ``pattern`` is put in place; returns the
    names refused. Every imgx3d writer ends with ``os.replace(temp, final)`` (``atomic_write``)."""
    real_replace, refused = os.replace, []

    def replace(src, dst, *args, **kwargs):
        if fnmatch.fnmatch(Path(dst).name, pattern):
            refused.append(Path(dst).name)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    return refused


def _one_line(capsys, code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("imgx3d: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _no_temp_files(folder: Path) -> None:
    assert not [p for p in folder.rglob(".*") if p.is_file() and not p.name.endswith(".lock")], \
        "a temp file was left behind"


def test_resource_error_maps_exactly_the_no_room_errnos():
    for code, words in ((errno.ENOSPC, "disk is full"), (errno.EFBIG, "file-size limit"),
                        (errno.EDQUOT, "quota"), (errno.EROFS, "read-only")):
        mapped = resource_error(OSError(code, os.strerror(code)), "/out/x.nii.gz")
        assert isinstance(mapped, ResourceError) and str(mapped).startswith("/out/x.nii.gz: could not be written")
        assert words in str(mapped) and errno.errorcode[code] in str(mapped)
    for code in (errno.EACCES, errno.ENOENT, errno.EIO):
        assert resource_error(OSError(code, "x"), "/out/x") is None


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint_and_resume_finishes(tmp_path, monkeypatch,
                                                                                          capsys):
    data = write_msd_dataset(tmp_path / "msd")
    config = tmp_path / "cfg.yaml"
    config.write_text("method: {name: unet}\n")
    argv = ["train", "--no-track", "--config", str(config), "--data", str(data), *TINY_OVERRIDES]
    real_replace, writes = os.replace, []

    def replace(src, dst, *args, **kwargs):  # the second last.pt (step 6) finds the disk full
        if Path(dst).name == "last.pt":
            writes.append(dst)
            if len(writes) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    run = tmp_path / "run"
    line = _one_line(capsys, main([*argv, "--run-dir", str(run)]))
    assert f"{run / 'last.pt'}: could not be written: the disk is full (ENOSPC)" in line
    assert torch.load(run / "last.pt", map_location="cpu", weights_only=False)["step"] == 3, "the step-3 checkpoint"
    _no_temp_files(run)
    monkeypatch.setattr(os, "replace", real_replace)
    assert main([*argv, "--resume", str(run)]) == 0
    assert torch.load(run / "last.pt", map_location="cpu", weights_only=False)["step"] == 6


@pytest.mark.parametrize("pattern, extra", [("case_0.nii.gz", []), ("case_0_probabilities.nii.gz", ["--probabilities"]),
                                            ("case_0.png", ["--overlay", "OVERLAY"])],
                         ids=["label map", "probability map", "overlay plot"])
def test_a_full_disk_while_predicting_is_one_line_and_a_rerun_finishes(trained, tmp_path, monkeypatch, capsys,
                                                                       pattern, extra):
    run, data = trained
    extra = [str(tmp_path / "overlays") if e == "OVERLAY" else e for e in extra]
    out = tmp_path / "out"
    argv = ["predict", "--run", str(run), "--input", str(data / "imagesTr"), "--output", str(out), *extra]
    refused = disk_full(monkeypatch, pattern)
    line = _one_line(capsys, main(argv))
    assert refused == [pattern]
    folder = tmp_path / "overlays" if "--overlay" in extra else out
    assert f"{folder / pattern}: could not be written: the disk is full" in line and "run the same command" in line
    assert not (folder / pattern).exists()
    _no_temp_files(out)
    monkeypatch.undo()
    assert main(argv + ["--overwrite"]) == 0
    assert len([p for p in out.glob("case_*.nii.gz") if "probabilities" not in p.name]) == 8


def test_a_full_disk_while_writing_metrics_is_one_line(trained, tmp_path, monkeypatch, capsys):
    run, data = trained
    pred = run / "test_predictions"
    refused = disk_full(monkeypatch, "metrics.csv")
    line = _one_line(capsys, main(["evaluate", "--pred", str(pred), "--ref", str(data / "labelsTr"), "--output",
                                   str(tmp_path / "scores")]))
    assert refused == ["metrics.csv"] and f"{tmp_path / 'scores' / 'metrics.csv'}: could not be written" in line


@pytest.mark.parametrize("pattern", ["table.csv", "paired.csv", "box.png"])
def test_a_full_disk_while_writing_comparison_tables_or_plots_names_the_file(tmp_path, monkeypatch, pattern):
    runs = [record("unet", "unet", [0.8, 0.85, 0.9], 0.8), record("imgx", "imgx", [0.82, 0.8, 0.91], 0.81)]
    result = compare(runs)
    (tmp_path / "table.csv").write_text("the previous table\n")
    disk_full(monkeypatch, pattern)
    with pytest.raises(ResourceError, match=f"{tmp_path / pattern}: could not be written: the disk is full"):
        write_csv(result, tmp_path / "table.csv", tmp_path / "paired.csv")
        metric_boxplots(runs, "dice", tmp_path / "box.png")
    if pattern == "table.csv":
        assert (tmp_path / "table.csv").read_text() == "the previous table\n", "the previous file stays as it was"
    _no_temp_files(tmp_path)


FSIZE_LIMIT = """
import resource, sys
limit = int(sys.argv.pop(1))
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from imgx3d.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _limited(limit: int, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", FSIZE_LIMIT, str(limit), *argv], env=ENV, capture_output=True,
                          text=True, timeout=600)


def test_a_file_size_limit_while_predicting_is_one_line_exit_2_and_a_rerun_finishes(trained, tmp_path):
    run, data = trained
    image = data / "imagesTr" / "case_0.nii.gz"
    out = tmp_path / "out"
    proc = _limited(64, "predict", "--run", str(run), "--input", str(image), "--output", str(out))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert f"{out / 'case_0.nii.gz'}: could not be written: the file is larger than this process may write" \
        in proc.stderr and "(EFBIG)" in proc.stderr
    assert not (out / "case_0.nii.gz").exists()
    _no_temp_files(out)
    proc = _limited(resource.RLIM_INFINITY, "predict", "--run", str(run), "--input", str(image), "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert nib.load(str(out / "case_0.nii.gz")).shape == (20, 24, 16)


def test_a_file_size_limit_while_checkpointing_is_one_line_exit_2(tmp_path):
    data = write_msd_dataset(tmp_path / "msd")
    config = tmp_path / "cfg.yaml"
    config.write_text("method: {name: unet}\n")
    run = tmp_path / "run"
    proc = _limited(32_000, "train", "--no-track", "--config", str(config), "--data", str(data), "--run-dir", str(run),
                    *TINY_OVERRIDES)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("imgx3d")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"{run}/" in lines[0] and ".pt: could not be written" in lines[0] and "(EFBIG)" in lines[0]
    assert not list(run.glob("*.pt")) and (run / "config.yaml").is_file()
    _no_temp_files(run)


def _oom(*_args, **_kwargs):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def test_out_of_gpu_memory_in_training_names_the_settings_and_the_checkpoint_to_resume(tmp_path, monkeypatch, capsys):
    from imgx3d.training.trainer import Trainer

    data = write_msd_dataset(tmp_path / "msd")
    config = tmp_path / "cfg.yaml"
    config.write_text("method: {name: unet}\n")
    real_step = Trainer.step

    def step(self, batch):
        return _oom() if self.state.step == 4 else real_step(self, batch)

    monkeypatch.setattr(Trainer, "step", step)
    run = tmp_path / "run"
    line = _one_line(capsys, main(["train", "--no-track", "--config", str(config), "--data", str(data), "--run-dir",
                                   str(run), *TINY_OVERRIDES]))
    assert "out of GPU memory at training step 4" in line
    assert "data.batch_size (now 2)" in line and "data.patch_size (now [16, 16, 16])" in line
    assert f"continue from {run / 'last.pt'} with --resume {run}" in line


def test_out_of_gpu_memory_in_prediction_retries_once_with_lighter_windows(trained, tmp_path, monkeypatch, capsys):
    run, data = trained
    image = data / "imagesTr" / "case_1.nii.gz"
    assert main(["predict", "--run", str(run), "--input", str(image), "--output", str(tmp_path / "ref")]) == 0
    real_predict, calls = UNetMethod.predict, []

    def predict_once_oom(self, volume, window):
        calls.append(volume.device)
        return _oom() if len(calls) == 1 else real_predict(self, volume, window)

    monkeypatch.setattr(UNetMethod, "predict", predict_once_oom)
    capsys.readouterr()
    assert main(["predict", "--run", str(run), "--input", str(image), "--output", str(tmp_path / "out")]) == 0
    assert len(calls) == 2 and "out of GPU memory; trying again with windows one at a time" in capsys.readouterr().err
    np.testing.assert_array_equal(np.asarray(nib.load(str(tmp_path / "out" / "case_1.nii.gz")).dataobj),
                                  np.asarray(nib.load(str(tmp_path / "ref" / "case_1.nii.gz")).dataobj))

    monkeypatch.setattr(UNetMethod, "predict", _oom)
    line = _one_line(capsys, main(["predict", "--run", str(run), "--input", str(image), "--output",
                                   str(tmp_path / "never")]))
    assert f"{image}: out of GPU memory even with windows one at a time" in line and "--device cpu" in line
    assert not list((tmp_path / "never").glob("*.nii.gz"))


def test_memory_estimate_counts_the_window_maps_and_the_streaming_slab():
    full = estimate_host_memory(14, 1, (512, 512, 300), (512, 512, 300), [96, 96, 96], streaming=False,
                                probabilities=False)
    voxels = 512 * 512 * 300
    host = 4 * voxels + WINDOW_PATH_VOLUMES * 4 * 14 * voxels + 8 * voxels
    assert full == int(1.25 * host)
    stream = estimate_host_memory(14, 1, (512, 512, 300), (512, 512, 300), [96, 96, 96], streaming=True,
                                  probabilities=False)
    slab = 4 * 14 * 512 * 512 * 96  # K maps (the weighted sums), one window deep
    assert stream == int(1.25 * (4 * voxels + slab + 8 * voxels + 8 * voxels))
    assert stream < full / 4
    with_probs = estimate_host_memory(3, 2, (10, 10, 10), (20, 20, 20), [8, 8, 8], streaming=False, probabilities=True)
    assert with_probs == int(1.25 * (4 * 2 * 1000 + 3 * 4 * 3 * 1000 + 4 * 3 * 8000 + 8 * 8000))


def test_a_volume_too_large_for_free_memory_streams_or_is_refused_in_one_line(trained, tmp_path, monkeypatch, capsys):
    run, data = trained
    image = data / "imagesTr" / "case_2.nii.gz"
    voxels = 20 * 24 * 16
    full = estimate_host_memory(3, 1, (20, 24, 16), (20, 24, 16), [16, 16, 16], streaming=False, probabilities=False)
    streamed = []
    real_stream = infer.Predictor._stream
    monkeypatch.setattr(infer.Predictor, "_stream", lambda self, *a: streamed.append(1) or real_stream(self, *a))
    monkeypatch.setattr(infer, "available_host_bytes", lambda: full - 1)  # the window path does not fit
    assert main(["predict", "--run", str(run), "--input", str(image), "--output", str(tmp_path / "s")]) == 0
    assert streamed == [1], "it went through the streaming window instead"

    monkeypatch.setattr(infer, "available_host_bytes", lambda: voxels)  # nothing fits
    line = _one_line(capsys, main(["predict", "--run", str(run), "--input", str(image), "--output",
                                   str(tmp_path / "r")]))
    assert f"{image}: predicting it needs about" in line and "of host memory (3 classes on a 20x24x16 model grid)" in line
    assert "data.spacing" in line and not (tmp_path / "r" / "case_2.nii.gz").exists()
    # only the fixes that apply: streaming was tried already, no probability maps were asked for
    assert "infer.streaming" not in line and "--probabilities" not in line, line
    line = _one_line(capsys, main(["predict", "--run", str(run), "--input", str(image), "--output",
                                   str(tmp_path / "p"), "--probabilities"]))
    assert "predict without --probabilities (the streaming window then applies)" in line, line


def test_a_full_disk_while_writing_synthetic_pairs_is_one_line_and_a_rerun_completes(msd_dataset, tmp_path,
                                                                                   monkeypatch, capsys):
    from tests.test_pig import SLICES, TINY_CLI

    configs = Path(__file__).resolve().parents[1] / "configs"
    assert main(["train", "--config", str(configs / "hippocampus" / "pig.yaml"), "--data", str(msd_dataset),
                 "--run-dir", str(tmp_path / "pig"), "--no-track", *TINY_CLI, *SLICES, "train.max_steps=2",
                 "train.val_every=2"]) == 0
    argv = ["synth", "--run", str(tmp_path / "pig"), "--n", "4", "--batch", "2", "--steps", "2", "--output",
            str(tmp_path / "pairs")]
    refused = disk_full(monkeypatch, "synth_00003.nii.gz")
    line = _one_line(capsys, main(argv))
    assert refused == ["synth_00003.nii.gz"]
    assert f"{tmp_path / 'pairs' / 'imagesTr' / 'synth_00003.nii.gz'}: could not be written: the disk is full" in line
    assert not (tmp_path / "pairs" / "dataset.json").exists()
    _no_temp_files(tmp_path / "pairs")
    monkeypatch.undo()
    assert main(argv) == 0
    assert len(list((tmp_path / "pairs").glob("labelsTr/synth_*.nii.gz"))) == 4


def test_a_volume_larger_than_free_memory_is_refused_from_its_header(tmp_path, monkeypatch):
    """NIfTI and SimpleITK formats: the header's size is checked against the free host memory before
    any voxel is allocated."""
    import SimpleITK as sitk

    from imgx3d.data import io as volume_io
    from imgx3d.data.io import read_volume
    from imgx3d.errors import InputError

    nifti = tmp_path / "big.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((20, 20, 10), np.float32), np.eye(4)), str(nifti))
    nrrd = tmp_path / "big.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((10, 20, 20), np.int16)), str(nrrd))
    monkeypatch.setattr(volume_io, "available_host_bytes", lambda: 10_000)
    with pytest.raises(InputError, match=r"big.nii.gz: its 20x20x10 voxels need 0.00 GiB to read but 0.00 GiB of memory"):
        read_volume(nifti)
    with pytest.raises(InputError, match=r"big.nrrd: its 20x20x10x1 voxels need .* crop or resample"):
        read_volume(nrrd)
    monkeypatch.setattr(volume_io, "available_host_bytes", lambda: 10**9)
    assert read_volume(nifti).array.shape == (20, 20, 10) and read_volume(nrrd).array.shape == (20, 20, 10)
