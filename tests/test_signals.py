"""SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C): train, predict and synth stop at a safe
point, say in one line how to continue, exit 143 / 130, and continuing gives what an
uninterrupted run gives."""

from __future__ import annotations

import os
import shlex
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

from imgx3d import interrupts
from imgx3d.cli import main, resume_command
from imgx3d.errors import Interrupted
from tests.conftest import blob_case, save_nifti
from tests.test_faults import LONG, _assert_same_weights, _finish
from tests.test_pig import SLICES, TINY_CLI

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GIT_PYTHON_REFRESH": "quiet"}
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Slows each step or case a little, so that a signal sent once work has started lands mid-run.
SLOWED = """
import sys, time
from imgx3d.training.trainer import Trainer
from imgx3d.inference.predictor import Predictor
real_step, real_predict = Trainer.step, Predictor.predict_case
Trainer.step = lambda self, batch: (time.sleep(0.05), real_step(self, batch))[1]
Predictor.predict_case = lambda self, *a, **k: (time.sleep(0.3), real_predict(self, *a, **k))[1]
from imgx3d.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _start(*argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SLOWED, *argv], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _signal_when(proc: subprocess.Popen, ready, signum: int, timeout: float = 300) -> tuple[str, str]:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "finished before the signal: " + proc.stderr.read()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signum)
    return proc.communicate(timeout=600)


def test_a_second_signal_stops_at_once_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with interrupts.stop_on_signals():
        assert interrupts.requested() is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert interrupts.requested() == signal.SIGTERM
        with pytest.raises(Interrupted, match="stopped at once by a second SIGINT") as err:
            os.kill(os.getpid(), signal.SIGINT)
        assert err.value.exit_code == 130
        with pytest.raises(Interrupted, match="SIGTERM received; stopped: the work") as err:
            interrupts.raise_if_requested("the work")
        assert err.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is before and interrupts.requested() is None


def test_the_resume_command_replaces_the_run_folder():
    argv = ["train", "--config", "c.yaml", "--run-dir", "runs/a b", "--data", "d", "train.max_steps=9"]
    assert resume_command(argv, Path("runs/a b")) == \
        "imgx3d train --resume 'runs/a b' --config c.yaml --data d train.max_steps=9"
    assert resume_command(["train", "--resume=old", "--config", "c"], Path("old")) == \
        "imgx3d train --resume old --config c"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, list[str]]:
    from tests.conftest import write_msd_dataset

    root = tmp_path_factory.mktemp("signals")
    data = write_msd_dataset(root / "msd")
    config = root / "cfg.yaml"
    config.write_text("dataset: signals\nmethod: {name: unet}\n")
    common = ["--config", str(config), "--data", str(data), *LONG]
    _finish(subprocess.Popen([sys.executable, "-m", "imgx3d", "train", "--no-track", "--run-dir", str(root / "full"),
                              *common], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return root / "full", common


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_training_saves_last_pt_and_resuming_equals_the_uninterrupted_run(uninterrupted, tmp_path,
                                                                                       signum, code):
    full, common = uninterrupted
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = tmp_path / "run"
    proc = _start("train", "--tracking-uri", uri, "--run-dir", str(run), *common)
    _, err = _signal_when(proc, lambda: (run / "last.pt").exists(), signum)
    assert proc.returncode == code, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("imgx3d")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    step = torch.load(run / "last.pt", map_location="cpu", weights_only=False)["step"]
    assert 3 < step < 40, "saved at the step reached, not only at the last periodic checkpoint"
    name = signal.Signals(signum).name
    assert lines[0].startswith(f"imgx3d: interrupted: {name} received: training stopped at step {step} and saved it "
                               f"in {run / 'last.pt'}; continue with: imgx3d train --resume {run} ")
    client = MlflowClient(tracking_uri=uri)
    [record] = client.search_runs([client.get_experiment_by_name("signals").experiment_id])
    assert record.info.status == "KILLED" and record.data.tags["imgx3d.interrupted"] == name

    command = shlex.split(lines[0].split("continue with: ", 1)[1])
    _finish(subprocess.Popen([sys.executable, "-m", "imgx3d", *command[1:]], env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True))
    _assert_same_weights(full / "last.pt", run / "last.pt")
    assert client.get_run(record.info.run_id).info.status == "FINISHED"


def test_sigterm_mid_prediction_finishes_the_case_in_hand_and_a_rerun_completes(uninterrupted, tmp_path):
    full, _ = uninterrupted
    rng = np.random.default_rng(5)
    inputs = tmp_path / "in"
    for i in range(8):
        save_nifti(inputs / f"v{i}.nii.gz", blob_case(rng, shape=(24, 20, 18))[0], np.diag([0.9, 0.9, 1.3, 1.0]))
    out = tmp_path / "out"
    argv = ["predict", "--run", str(full), "--input", str(inputs), "--output", str(out)]
    proc = _start(*argv)
    _, err = _signal_when(proc, lambda: any(out.glob("v*.nii.gz")), signal.SIGTERM)
    assert proc.returncode == 143, err[-2000:]
    written = sorted(out.glob("v*.nii.gz"))
    assert 1 <= len(written) < 8
    assert f"of 8 case(s) are in {out}, each complete; run the same command again" in err
    for path in written:
        assert nib.load(str(path)).shape == (24, 20, 18)
    assert not list(out.glob(".*")), "no lock or temp file is left behind"
    assert main(argv) == 0
    assert main([*argv[:-1], str(tmp_path / "ref")]) == 0
    for i in range(8):
        np.testing.assert_array_equal(np.asarray(nib.load(str(out / f"v{i}.nii.gz")).dataobj),
                                      np.asarray(nib.load(str(tmp_path / "ref" / f"v{i}.nii.gz")).dataobj))


def test_sigterm_mid_synthesis_keeps_whole_pairs_and_a_rerun_writes_what_an_uninterrupted_one_does(
        msd_dataset, tmp_path, monkeypatch, capsys):
    from imgx3d.methods.pig import PIGMethod

    assert main(["train", "--config", str(CONFIGS / "hippocampus" / "pig.yaml"), "--data", str(msd_dataset),
                 "--run-dir", str(tmp_path / "pig"), "--no-track", *TINY_CLI, *SLICES, "train.max_steps=2",
                 "train.val_every=2"]) == 0
    common = ["synth", "--run", str(tmp_path / "pig"), "--n", "8", "--batch", "2", "--steps", "3"]
    assert main([*common, "--output", str(tmp_path / "ref")]) == 0
    real_generate, calls = PIGMethod.generate, []

    def generate_then_sigterm(self, *args, **kwargs):
        calls.append(1)
        out = real_generate(self, *args, **kwargs)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while the second block is in hand
        return out

    monkeypatch.setattr(PIGMethod, "generate", generate_then_sigterm)
    capsys.readouterr()
    assert main([*common, "--output", str(tmp_path / "out")]) == 143
    assert "SIGTERM received; stopped: 4 of 8 pair(s) are in" in capsys.readouterr().err
    assert len(list((tmp_path / "out").glob("labelsTr/synth_*.nii.gz"))) == 4
    assert not (tmp_path / "out" / "dataset.json").exists()
    monkeypatch.undo()
    assert main([*common, "--output", str(tmp_path / "out")]) == 0

    def pairs(folder: Path) -> dict[str, bytes]:
        return {p.relative_to(folder).as_posix(): np.asarray(nib.load(str(p)).dataobj).tobytes()
                for p in sorted(folder.glob("*Tr/synth_*.nii.gz"))}

    assert pairs(tmp_path / "out") == pairs(tmp_path / "ref") and len(pairs(tmp_path / "ref")) == 16
