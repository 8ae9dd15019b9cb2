"""Fault injection: SIGKILL during training, during a checkpoint write and during prediction;
two predictions sharing an output folder. Nothing is lost or half-written, restarts finish."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.conftest import TINY_OVERRIDES, blob_case, save_nifti, write_msd_dataset

LONG = [*TINY_OVERRIDES, "train.max_steps=40", "train.checkpoint_every=3", "train.val_every=20"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GIT_PYTHON_REFRESH": "quiet"}


def _cli(*argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "imgx3d", *argv], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return out


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` holds (fails if it finished first)."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the process finished before it could be killed: " + proc.stdout.read()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.fixture
def config(tmp_path) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text("dataset: faults\nmethod: {name: unet}\n")
    return str(path)


def test_sigkill_mid_training_then_resume_equals_the_uninterrupted_run(msd_dataset, tmp_path, config):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["--config", config, "--data", str(msd_dataset), "--tracking-uri", uri, *LONG]
    _finish(_cli("train", "--run-dir", str(tmp_path / "full"), *common))
    crashed = _cli("train", "--run-dir", str(tmp_path / "crash"), *common)
    _kill_when(crashed, lambda: (tmp_path / "crash" / "last.pt").exists())
    step = torch.load(tmp_path / "crash" / "last.pt", map_location="cpu", weights_only=False)["step"]
    assert 3 <= step < 40
    _finish(_cli("train", "--resume", str(tmp_path / "crash"), *common))
    _assert_same_weights(tmp_path / "full" / "last.pt", tmp_path / "crash" / "last.pt")
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
    assert len(runs) == 2, "the resumed run continues its mlflow run instead of starting another"
    assert {r.info.status for r in runs} == {"FINISHED"}


KILL_DURING_SAVE = """
import os, pathlib, signal, sys
real_write, calls = pathlib.Path.write_bytes, []
def dying_write(self, data):
    if ".last.pt." in self.name:
        calls.append(self)
    if len(calls) == 2:  # the second last.pt (step 6): half a file, then the process dies
        real_write(self, bytes(data)[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return real_write(self, data)
pathlib.Path.write_bytes = dying_write  # checkpoints are serialised in memory, then written with write_bytes
from imgx3d.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_during_a_checkpoint_write_leaves_the_last_good_checkpoint(msd_dataset, tmp_path, config):
    common = ["--config", config, "--data", str(msd_dataset), "--no-track", *LONG, "train.max_steps=12"]
    _finish(_cli("train", "--run-dir", str(tmp_path / "full"), *common))
    run = tmp_path / "crash"
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, "train", "--run-dir", str(run), *common],
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert list(run.glob(".last.pt.*")), "the killed write was to a temp file"
    # under its final name: the complete checkpoint of step 3
    assert torch.load(run / "last.pt", map_location="cpu", weights_only=False)["step"] == 3
    _finish(_cli("train", "--resume", str(run), *common))
    assert not list(run.glob(".*.pt.*")), "the resume removed the interrupted temp files"
    _assert_same_weights(tmp_path / "full" / "last.pt", run / "last.pt")


@pytest.fixture
def trained_run(msd_dataset, tmp_path, config) -> Path:
    _finish(_cli("train", "--run-dir", str(tmp_path / "run"), "--config", config, "--data", str(msd_dataset),
                 "--no-track", *TINY_OVERRIDES))
    return tmp_path / "run"


@pytest.fixture
def many_volumes(tmp_path) -> Path:
    rng = np.random.default_rng(3)
    for i in range(12):
        image, _ = blob_case(rng, shape=(40, 44, 36))
        save_nifti(tmp_path / "many" / f"v{i:02d}.nii.gz", image, np.diag([0.8, 0.8, 1.2, 1.0]))
    return tmp_path / "many"


def _final_files(folder: Path) -> list[Path]:
    """Files under their final names; ``*.nii.gz`` alone would also match hidden ``.name.XXXX.nii.gz`` temps."""
    return [p for p in sorted(folder.glob("*.nii.gz")) if not p.name.startswith(".")]


def _outputs(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(nib.load(str(p)).dataobj) for p in _final_files(folder)}


def test_sigkill_during_prediction_then_restart_finishes_with_identical_outputs(trained_run, many_volumes, tmp_path):
    _finish(_cli("predict", "--run", str(trained_run), "--input", str(many_volumes), "--output", str(tmp_path / "ref")))
    out = tmp_path / "out"
    proc = _cli("predict", "--run", str(trained_run), "--input", str(many_volumes), "--output", str(out))
    _kill_when(proc, lambda: len(_final_files(out)) >= 2)
    partial = _outputs(out)  # whatever carries a final name loads completely
    assert 2 <= len(partial) < 12 and all(a.shape == (40, 44, 36) for a in partial.values())
    _finish(_cli("predict", "--run", str(trained_run), "--input", str(many_volumes), "--output", str(out)))
    final, reference = _outputs(out), _outputs(tmp_path / "ref")
    assert final.keys() == reference.keys() and len(final) == 12
    for name in final:
        np.testing.assert_array_equal(final[name], reference[name])
    assert not list(out.glob(".*")), "no lock or temp file is left behind"


def test_two_predictions_into_one_folder_share_the_work(trained_run, many_volumes, tmp_path):
    _finish(_cli("predict", "--run", str(trained_run), "--input", str(many_volumes), "--output", str(tmp_path / "ref")))
    out = tmp_path / "shared"
    procs = [_cli("predict", "--run", str(trained_run), "--input", str(many_volumes), "--output", str(out))
             for _ in range(2)]
    for proc in procs:
        assert "12 prediction(s)" in _finish(proc)
    final, reference = _outputs(out), _outputs(tmp_path / "ref")
    assert final.keys() == reference.keys()
    for name in final:
        np.testing.assert_array_equal(final[name], reference[name])
    assert not list(out.glob(".*"))


def test_same_seed_gives_bit_identical_predictions_across_runs_and_workers(tmp_path, config):
    data = write_msd_dataset(tmp_path / "msd")
    image = str(data / "imagesTr" / "case_0.nii.gz")
    outputs = []
    for name, workers in (("a", 0), ("b", 0), ("c", 2)):
        _finish(_cli("train", "--run-dir", str(tmp_path / name), "--config", config, "--data", str(data), "--no-track",
                     *TINY_OVERRIDES, f"data.num_workers={workers}"))
        _finish(_cli("predict", "--run", str(tmp_path / name), "--input", image, "--output", str(tmp_path / f"p{name}")))
        outputs.append((tmp_path / f"p{name}" / "case_0.nii.gz").read_bytes())
    for name in ("b", "c"):  # the weights themselves, not only an arg-max that a few steps barely move
        _assert_same_weights(tmp_path / "a" / "last.pt", tmp_path / name / "last.pt")
    assert outputs[0] == outputs[1] == outputs[2]
    predicted = np.asarray(nib.load(str(tmp_path / "pa" / "case_0.nii.gz")).dataobj)
    assert len(np.unique(predicted)) > 1, "a constant prediction would make the comparison vacuous"
    by_workers = []
    for workers in (0, 3):
        _finish(_cli("predict", "--run", str(tmp_path / "a"), "--input", str(data / "imagesTr"), "--workers",
                     str(workers), "--output", str(tmp_path / f"w{workers}")))
        by_workers.append({p.name: p.read_bytes() for p in sorted((tmp_path / f"w{workers}").glob("*.nii.gz"))})
    assert len(by_workers[0]) == 8 and by_workers[0] == by_workers[1]
