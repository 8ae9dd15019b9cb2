import nibabel as nib
import numpy as np
import pytest

from imgx3d.cli import main
from imgx3d.data.demo import DEMO_AFFINE, DEMO_SHAPE, make_case


def test_demo_volumes_have_three_distinct_structures():
    image, label = make_case(np.random.default_rng(0))
    assert image.shape == label.shape == DEMO_SHAPE
    assert set(np.unique(label)) == {0, 1, 2, 3}
    background = image[label == 0]
    assert image[label == 1].mean() > background.mean() + background.std()   # bright blob
    assert image[label == 2].mean() < background.mean() - background.std()   # dark tube


@pytest.mark.parametrize("method", ["unet", "imgx"])
def test_demo_runs_end_to_end(tmp_path, capsys, method):
    code = main(["demo", "--method", method, "--workdir", str(tmp_path / "demo"), "--cases", "8",
                 "train.max_steps=4", "train.val_every=2", "method.channels=[4,8,16,32]", "data.patch_size=[32,32,32]"])
    out = capsys.readouterr().out
    assert code == 0
    assert "foreground mean" in out and "mlflow run" in out
    predictions = sorted((tmp_path / "demo" / "predictions").glob("*.nii.gz"))
    assert len(predictions) == 2  # 25 % of 8 held out
    for path in predictions:
        img = nib.load(str(path))
        assert img.shape == DEMO_SHAPE
        np.testing.assert_allclose(img.affine, DEMO_AFFINE, atol=1e-5)
    # the printed and saved evaluation is that of these predictions against the held-out labels
    import json
    import re

    from mlflow.tracking import MlflowClient

    from imgx3d.data.demo import DEMO_LABELS
    from imgx3d.evaluation.metrics import evaluate_folders

    _, again = evaluate_folders(tmp_path / "demo" / "predictions", tmp_path / "demo" / "references", DEMO_LABELS)
    saved = json.loads((tmp_path / "demo" / "evaluation" / "summary.json").read_text())
    assert saved["foreground_mean"]["dice"] == pytest.approx(again["foreground_mean"]["dice"])
    assert saved["cases"] == 2 and set(saved["per_class"]) == {"blob", "tube", "box"}
    assert f"{again['foreground_mean']['dice']:.4f}" in out
    for path in predictions:  # label values of the demo's classes only
        assert set(np.unique(np.asarray(nib.load(str(path)).dataobj)).tolist()) <= set(DEMO_LABELS)
    run_id = re.search(r"mlflow run (\w+)", out).group(1)
    run = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["train/steps"] == 4
    assert run.data.tags["method"] == method
