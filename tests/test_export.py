"""Models that leave imgx3d: TorchScript and ONNX exports equal the PyTorch network, and MONAI's
sliding window over the exported ONNX file (as the README shows) reproduces imgx3d's probabilities."""

from __future__ import annotations

import json
from pathlib import Path

import onnxruntime
import pytest
import torch
from monai.inferers import sliding_window_inference

from imgx3d.checkpoint import Checkpoint, checkpoint_state
from imgx3d.cli import main
from imgx3d.config import load_config
from imgx3d.errors import CheckpointError
from imgx3d.inference.export import export_run
from imgx3d.inference.predictor import Predictor
from imgx3d.methods.base import build_method
from tests.conftest import train_tiny_unet


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    return train_tiny_unet(tmp_path_factory.mktemp("export"))


def test_onnx_export_run_by_monai_sliding_window_equals_imgx3d(run, tmp_path, capsys):
    run_dir, data = run
    assert main(["export", "--run", str(run_dir), "--format", "onnx", "--output", str(tmp_path / "onnx")]) == 0
    assert "max |exported - PyTorch|" in capsys.readouterr().out
    settings = json.loads((tmp_path / "onnx" / "imgx3d_export.json").read_text(encoding="utf-8"))
    assert settings["input"]["shape"] == ["batch", 1, 16, 16, 16] and settings["max_abs_difference"] < 1e-4
    assert settings["labels"] == {"0": "background", "1": "sphere", "2": "cube"}
    # what the README shows: the exported file in MONAI's sliding window, on the model-space image
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / settings["file"]))
    window = settings["window"]

    def network(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"image": x.numpy()})[0])

    predictor = Predictor.load(run_dir, device="cpu")
    image = predictor.read([data / "imagesTr" / "case_0.nii.gz"]).image
    exported = sliding_window_inference(image[None], window["roi_size"], window["sw_batch_size"], network,
                                        overlap=window["overlap"], mode=window["mode"])[0]
    ours = predictor._model_space_probabilities(image, predictor.settings)
    torch.testing.assert_close(exported, ours, atol=1e-4, rtol=0)


def test_torchscript_export_takes_any_batch_and_equals_pytorch(run, tmp_path):
    run_dir, _ = run
    settings = export_run(run_dir, "torchscript", tmp_path / "ts")
    scripted = torch.jit.load(str(tmp_path / "ts" / "model.pt"))
    method = Predictor.load(run_dir, device="cpu").method
    windows = torch.randn(3, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(scripted(windows), method.window_probabilities(windows), atol=1e-4, rtol=0)
    assert settings["format"] == "torchscript" and settings["postprocessing"] is not None


def test_a_sampling_method_is_not_exported(tmp_path):
    cfg = load_config(None, ["method.name=imgx", "method.channels=[4,8]", "method.strides=[2]"])
    method = build_method(cfg.method, 2, 1)
    state = checkpoint_state(cfg, method.state_dict(), num_classes=2, in_channels=1, labels={0: "bg", 1: "fg"})
    with pytest.raises(CheckpointError, match="predicts by a sampling loop, not one network pass per window"):
        export_run(Checkpoint(tmp_path / "best.pt", cfg, state), "onnx", tmp_path / "out")
    assert not (tmp_path / "out").exists()
