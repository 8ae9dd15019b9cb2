"""Runs you can watch: plain progress lines in a log file as the run goes, train.log in the run folder,
mlflow system metrics, one line per predicted case."""

import json
import os
import subprocess
import sys
import time


from imgx3d.progress import CaseProgress, duration, rank_prefix
from tests.conftest import TINY_OVERRIDES, train_tiny_unet, write_msd_dataset

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GIT_PYTHON_REFRESH": "quiet"}


def test_durations_and_case_lines_read_as_a_person_would(capsys, monkeypatch):
    assert [duration(s) for s in (0, 45.4, 372, 3725)] == ["0s", "45s", "6m12s", "1h02m"]
    clock = iter([100.0, 102.0, 106.0])
    monkeypatch.setattr("imgx3d.progress.time.monotonic", lambda: next(clock))
    progress = CaseProgress("predict", 4)
    progress.advance(note="case_a")
    progress.advance(note="case_b")
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["predict: 1/4 cases, 2.00 s/case, ~6s left (case_a)",
                     "predict: 2/4 cases, 3.00 s/case, ~6s left (case_b)"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert rank_prefix() == "[rank 1] "
    monkeypatch.setenv("RANK", "0")
    assert rank_prefix() == ""


def test_training_into_a_file_reports_steps_and_validations_while_it_runs(tmp_path):
    """`imgx3d train ... > out.txt 2>&1`: step and validation lines are in the file before the run ends,
    and the run folder's train.log holds exactly what was printed."""
    data = write_msd_dataset(tmp_path / "msd")
    config = tmp_path / "cfg.yaml"
    config.write_text("method: {name: unet}\n")
    out = tmp_path / "out.txt"
    overrides = [o for o in TINY_OVERRIDES if not o.startswith(("train.max_steps", "train.val_every",
                                                                "train.checkpoint_every"))]
    with open(out, "w", encoding="utf-8") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "imgx3d", "train", "--no-track", "--config", str(config),
                                 "--data", str(data), "--run-dir", str(tmp_path / "run"), *overrides,
                                 "train.max_steps=100000", "train.max_minutes=0.4", "train.val_every=40",
                                 "train.checkpoint_every=40", "train.log_every=5"],
                                stdout=sink, stderr=subprocess.STDOUT, env=ENV)
    seen_alive = []
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            text = out.read_text(encoding="utf-8")
            steps = [line for line in text.splitlines() if line.startswith("step ")]
            validations = [line for line in text.splitlines() if line.startswith("validation at step ")]
            if len(steps) >= 2 and validations:
                seen_alive = [steps[0], validations[0]]
                break
            time.sleep(0.5)
        assert proc.poll() is None and seen_alive, "no step and validation lines while the run was alive"
    finally:
        assert proc.wait(timeout=300) == 0, out.read_text(encoding="utf-8")[-3000:]
    step_line, validation_line = seen_alive
    assert step_line.startswith("step 5/100000 | loss_model ") and " steps/s | elapsed " in step_line
    assert "(budget)" in step_line and "peak RSS" in step_line
    assert validation_line.startswith("validation at step 40: sphere ") and "best.pt written" in validation_line
    printed = out.read_text(encoding="utf-8")
    assert "test cases (" in printed and "run folder: " in printed
    assert (tmp_path / "run" / "train.log").read_text(encoding="utf-8") == printed


def test_a_tracked_run_records_system_metrics_and_its_log(tmp_path):
    from mlflow.tracking import MlflowClient

    from imgx3d.cli import main

    data = write_msd_dataset(tmp_path / "msd")
    config = tmp_path / "cfg.yaml"
    config.write_text("method: {name: unet}\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [o for o in TINY_OVERRIDES if not o.startswith("train.max_steps")]
    assert main(["train", "--tracking-uri", uri, "--config", str(config), "--data", str(data), "--run-dir",
                 str(tmp_path / "run"), *overrides, "train.max_steps=100000", "train.max_minutes=0.08",
                 "tracking.system_metrics_seconds=1", "tracking.log_model=false"]) == 0
    client = MlflowClient(uri)
    run = client.get_run(json.loads((tmp_path / "run" / "result.json").read_text())["run_id"])
    assert "system/cpu_utilization_percentage" in run.data.metrics
    assert "system/system_memory_usage_megabytes" in run.data.metrics
    assert "train.log" in [a.path for a in client.list_artifacts(run.info.run_id)]


def test_predicting_a_folder_into_a_file_prints_a_line_per_case(tmp_path):
    run, data = train_tiny_unet(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "imgx3d", "predict", "--run", str(run), "--input",
                           str(data / "imagesTr"), "--output", str(tmp_path / "pred")],
                          capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cases = sorted((data / "imagesTr").glob("*.nii.gz"))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("predict: ")]
    assert len(lines) == len(cases) >= 2
    assert lines[0].startswith(f"predict: 1/{len(cases)} cases, ") and " s/case, ~" in lines[0]
    assert lines[-1].startswith(f"predict: {len(cases)}/{len(cases)} cases")


def test_parts_of_a_folder_write_exactly_what_one_process_writes(tmp_path, monkeypatch):
    """--part K/N (nnU-Net's -part_id/-num_parts): two parts together give the one-process outputs, byte for
    byte, each part predicting only its own cases; torchrun ranks split a part further."""
    from imgx3d.cli import main, prediction_share

    run, data = train_tiny_unet(tmp_path)
    cases = sorted(p.name for p in (data / "imagesTr").glob("*.nii.gz"))
    assert main(["predict", "--run", str(run), "--input", str(data / "imagesTr"), "--output",
                 str(tmp_path / "one")]) == 0
    for k in (0, 1):
        assert main(["predict", "--run", str(run), "--input", str(data / "imagesTr"), "--output",
                     str(tmp_path / f"part{k}"), "--part", f"{k}/2"]) == 0
    parts = [sorted(p.name for p in (tmp_path / f"part{k}").glob("*.nii.gz")) for k in (0, 1)]
    assert parts == [cases[0::2], cases[1::2]]
    for k, names in enumerate(parts):
        for name in names:
            assert (tmp_path / f"part{k}" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    (k, n), device = prediction_share("1/2", "cpu")
    assert (k, n, device) == (5, 6, "cpu")
    assert list(range(12))[k::n] == list(range(12))[1::2][2::3]
    assert main(["predict", "--run", str(run), "--input", str(data / "imagesTr"), "--output", str(tmp_path / "x"),
                 "--part", "2/2"]) == 2
