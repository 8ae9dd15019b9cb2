"""The CLI: user errors are one line with exit code 2, inputs stay byte-identical; the full flow works."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from imgx3d.cli import main
from tests.conftest import TINY_OVERRIDES, save_nifti, tree_digest

TRAIN = ["train", "--volume", "--no-track", "--config"]


def _run(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def _config(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("method: {name: unet}\n")
    return str(path)


def test_other_user_errors(msd_dataset, tmp_path, capsys):
    code, err = _run(capsys, TRAIN + [_config(tmp_path), "--data", str(tmp_path / "nowhere")])
    assert code == 2 and "nowhere: dataset folder not found" in err
    code, err = _run(capsys, TRAIN + [_config(tmp_path), "--data", str(msd_dataset), "train.nonsense=1"])
    assert code == 2 and "unknown config key 'train.nonsense'" in err
    flat = save_nifti(tmp_path / "flat" / "x.nii.gz", np.ones((8, 8), np.float32))
    ckpt = tmp_path / "none.pt"
    code, err = _run(capsys, ["predict", "--checkpoint", str(ckpt), "--input", str(flat), "--output", str(tmp_path / "o")])
    assert code == 2 and "checkpoint not found" in err


def test_cli_train_predict_evaluate_with_mlflow(msd_dataset, tmp_path, capsys):
    before = tree_digest(msd_dataset)
    code = main(["train", "--volume", "--config", _config(tmp_path), "--data", str(msd_dataset),
                 "--run-dir", str(tmp_path / "run"), *TINY_OVERRIDES])
    out = capsys.readouterr().out
    assert code == 0, out
    run_id = out.split("mlflow run: ")[1].split()[0]
    split = json.loads((tmp_path / "run" / "split.json").read_text())

    # predict by mlflow run id, from the run's logged checkpoint
    inputs = [str(msd_dataset / "imagesTr" / f"{c}.nii.gz") for c in split["test"]]
    assert main(["predict", "--run", run_id, "--input", *inputs, "--output", str(tmp_path / "pred")]) == 0
    for case in split["test"]:
        pred = nib.load(str(tmp_path / "pred" / f"{case}.nii.gz"))
        src = nib.load(str(msd_dataset / "imagesTr" / f"{case}.nii.gz"))
        assert pred.shape == src.shape
        np.testing.assert_allclose(pred.affine, src.affine, atol=1e-5)
        assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2}

    # the output folder may not be an input folder
    code, err = _run(capsys, ["predict", "--run", str(tmp_path / "run"), "--input", str(msd_dataset / "imagesTr"),
                              "--output", str(msd_dataset / "imagesTr")])
    assert code == 2 and "inside the input folder" in err

    ref = tmp_path / "ref"
    ref.mkdir()
    for case in split["test"]:
        shutil.copy(msd_dataset / "labelsTr" / f"{case}.nii.gz", ref)
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(ref), "--output", str(tmp_path / "ev")]) == 0
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["cases"] == len(split["test"]) and set(summary["per_class"]) == {"label_1", "label_2"}
    assert tree_digest(msd_dataset) == before

    from mlflow.tracking import MlflowClient

    run = MlflowClient("sqlite:///mlflow.db").get_run(run_id)
    assert run.data.tags["method"] == "unet" and run.info.status == "FINISHED"
    assert "val/dice_mean" in run.data.metrics and "test/dice_mean" in run.data.metrics
    assert {"test/uncertainty/ece", "test/uncertainty/error_auc"} <= set(run.data.metrics), "what compare shows"
    artifacts = {a.path for a in MlflowClient("sqlite:///mlflow.db").list_artifacts(run_id)}
    assert {"config.yaml", "split.json", "checkpoint", "test_metrics"} <= artifacts


def test_console_script_prints_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "imgx3d", "evaluate", "--pred", str(tmp_path / "p"),
                             "--ref", str(tmp_path / "r")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.strip().count("\n") == 0
    assert "not a folder" in result.stderr


def test_train_method_flag_keeps_the_keys_the_new_method_shares():
    from imgx3d.cli import _load, build_parser

    config = Path(__file__).resolve().parents[1] / "configs" / "hippocampus" / "sdseg.yaml"
    args = build_parser().parse_args(["train", "--config", str(config), "--method", "vae", "--data", "x"])
    cfg = _load(args).config
    assert type(cfg.method).__name__ == "VAEConfig" and cfg.method.name == "vae"
    assert cfg.method.codec.widths == [16, 32, 64, 64], "the codec section the sdseg config wrote"


def test_mlflow_environment_variables_are_honoured_below_the_flags(msd_dataset, tmp_path, monkeypatch):
    """MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_NAME are used when no flag (or config key) says
    otherwise; runs are tagged with the imgx3d version and the working directory's git commit."""
    import subprocess

    from mlflow.tracking import MlflowClient

    from imgx3d.cli import main
    from tests.conftest import TINY_OVERRIDES

    env_store, flag_store = f"sqlite:///{tmp_path / 'env.db'}", f"sqlite:///{tmp_path / 'flag.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env_store)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for command in (["init", "-q"], ["-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q", "--allow-empty",
                                     "-m", "x"]):
        subprocess.run(["git", *command], check=True, cwd=work)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=work).stdout.strip()
    config = tmp_path / "cfg.yaml"
    config.write_text("method: {name: unet}\n")
    common = ["train", "--config", str(config), "--data", str(msd_dataset), *TINY_OVERRIDES]
    assert main([*common, "--run-dir", str(tmp_path / "a")]) == 0
    runs = MlflowClient(tracking_uri=env_store).search_runs(
        [MlflowClient(tracking_uri=env_store).get_experiment_by_name("from-env").experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["mlflow.source.git.commit"] == commit
    from importlib.metadata import version

    assert runs[0].data.tags["imgx3d_version"] == version("imgx3d")
    assert main([*common, "--run-dir", str(tmp_path / "b"), "--tracking-uri", flag_store, "--experiment", "flag"]) == 0
    assert MlflowClient(tracking_uri=flag_store).get_experiment_by_name("flag") is not None, "the flags win"
    assert len(MlflowClient(tracking_uri=env_store).search_runs(
        [MlflowClient(tracking_uri=env_store).get_experiment_by_name("from-env").experiment_id])) == 1
