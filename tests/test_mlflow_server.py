"""A real ``mlflow server`` (sqlite backend, local artifact store) on 127.0.0.1: training,
prediction from a run id and comparison through HTTP, and a server that goes away mid-run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from imgx3d.cli import main
from imgx3d.tracking import Tracker
from tests.conftest import TINY_OVERRIDES

START_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``mlflow server`` in its own process group, stopped by its PID."""

    def __init__(self, root: Path, port: int):
        self.root, self.port, self.url = root, port, f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "MlflowServer":
        log = open(self.root / "server.log", "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer on {self.url} within {START_TIMEOUT_S} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


@pytest.fixture
def mlflow_server(tmp_path):
    root = tmp_path / "server"
    root.mkdir()
    server = MlflowServer(root, _free_port()).start()
    yield server
    server.stop()


def test_train_predict_compare_through_a_real_server(mlflow_server, msd_dataset, tmp_path, capsys, monkeypatch):
    url = mlflow_server.url
    for seed in (0, 1):
        assert main(["train", "--config", str(Path(__file__).parents[1] / "configs" / "demo.yaml"),
                     "--data", str(msd_dataset), "--run-dir", str(tmp_path / f"run{seed}"), "--seed", str(seed),
                     "--tracking-uri", url, "--experiment", "served", *TINY_OVERRIDES]
                    + (["--register", "blobs"] if seed else [])) == 0
    client = MlflowClient(tracking_uri=url)
    exp = client.get_experiment_by_name("served")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    run = runs[0]
    assert "test/dice_mean" in run.data.metrics and run.data.params["n_parameters"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"checkpoint", "test_metrics", "config.yaml", "split.json"} <= artifacts
    assert "best.pt" in {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "checkpoint")}
    image = sorted((msd_dataset / "imagesTr").glob("*.nii.gz"))[0]
    assert main(["predict", "--run", run.info.run_id, "--tracking-uri", url, "--input", str(image),
                 "--output", str(tmp_path / "pred")]) == 0
    assert (tmp_path / "pred" / image.name).is_file()
    _check_mlflow_model(url, runs, image, tmp_path, monkeypatch)
    capsys.readouterr()
    assert main(["compare", "--experiment", "served", "--tracking-uri", url, "--output", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "Wilcoxon" in out and out.count("| run1 |") >= 1
    comparison_runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("imgx3d.kind")]
    assert len(comparison_runs) == 1
    logged = {Path(a.path).name for a in client.list_artifacts(comparison_runs[0].info.run_id, "comparison")}
    assert {"table.md", "table.csv", "paired.csv", "dice_boxplots.png", "validation_curves.png"} <= logged


def _check_mlflow_model(url: str, runs: list, image: Path, tmp_path: Path, monkeypatch) -> None:
    """The registered run (seed 1) loads through mlflow's own API, from the run and from the
    registry, and segments as imgx3d predict does; predict --model takes the registry's URI."""
    import mlflow.pyfunc
    import nibabel as nib
    import numpy as np

    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    registered = next(r for r in runs if r.data.tags.get("registered_model"))
    assert registered.data.tags["registered_model"] == "models:/blobs/1"
    assert main(["predict", "--model", "models:/blobs/1", "--input", str(image),
                 "--output", str(tmp_path / "reg")]) == 0
    expected = np.asarray(nib.load(str(tmp_path / "reg" / image.name)).dataobj)
    volume = nib.load(str(image))
    for uri in (f"runs:/{registered.info.run_id}/model", "models:/blobs/1"):
        model = mlflow.pyfunc.load_model(uri)
        assert model.metadata.signature is not None
        labels = model.predict({"image": np.asarray(volume.dataobj, np.float32), "affine": volume.affine})
        assert labels.shape == expected.shape and (labels > 0).any()
        np.testing.assert_array_equal(labels, expected)


def test_training_survives_a_server_that_goes_away_and_loses_no_metric(mlflow_server, tmp_path, capsys, monkeypatch):
    from imgx3d import tracking

    clock = types.SimpleNamespace(now=1000.0)  # the tracker's monotonic clock, moved by hand
    monkeypatch.setattr(tracking, "time", types.SimpleNamespace(monotonic=lambda: clock.now, time=time.time,
                                                               sleep=time.sleep))
    tracker = Tracker(mlflow_server.url, "flaky", run_name="r")
    tracker.keep_locally(tmp_path / "kept.jsonl")
    tracker.log_metrics({"loss": 1.0}, step=1)
    mlflow_server.stop()
    real_perform, tries = tracker._perform, []
    monkeypatch.setattr(tracker, "_perform", lambda *a: tries.append(a[0]) or real_perform(*a))
    tracker.log_metrics({"loss": 0.5}, step=2)  # must not raise: the failure is kept
    assert tries == ["metrics"]
    clock.now += tracking.RETRY_SECONDS - 1
    tracker.log_metrics({"loss": 0.25}, step=3)
    tracker.set_tags({"stop_reason": "max steps"})
    assert tries == ["metrics"], "while the server is away, calls are kept without trying it (no waiting on it)"
    clock.now += 2  # past the retry interval: the next call tries the server again, oldest kept call first
    tracker.log_metrics({"loss": 0.125}, step=4)
    assert tries == ["metrics", "metrics"]
    assert "stopped answering" in capsys.readouterr().err
    kept = [json.loads(line) for line in (tmp_path / "kept.jsonl").read_text().splitlines()]
    assert [k["op"] for k in kept] == ["metrics", "metrics", "tags", "metrics"]
    mlflow_server.start()
    tracker.end("FINISHED")
    run = MlflowClient(tracking_uri=mlflow_server.url).get_run(tracker.run_id)
    history = MlflowClient(tracking_uri=mlflow_server.url).get_metric_history(tracker.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5), (3, 0.25), (4, 0.125)]
    assert run.info.status == "FINISHED" and run.data.tags["stop_reason"] == "max steps"
