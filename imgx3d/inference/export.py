"""``imgx3d export``: a trained single-pass segmenter as a TorchScript or ONNX file, for use without imgx3d.

What is exported is the *window network*: class probabilities ``(B, K, *roi)`` of a batch of
model-space windows ``(B, C, *roi)`` (batch size free). Everything around it — reading, RAS
reorientation, resampling to the run's spacing, intensity normalisation, the sliding window,
the way back to the native grid, the learned postprocessing — is described in
``imgx3d_export.json`` beside it, so that MONAI's ``sliding_window_inference`` (or any runtime)
can reproduce :class:`~imgx3d.inference.predictor.Predictor` (docs/user-guide.md: "Models that leave imgx3d").

Only methods whose prediction is one network pass per window (:class:`WindowSegmenter`: the
U-Net) can be exported; a diffusion method's prediction is a sampling loop around its network,
not one graph, and is refused in one line.

The export is checked before it is kept: the exported file and the PyTorch network must agree
to ``TOLERANCE`` on a batch of random windows (ONNX is checked with ONNX Runtime when installed).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from imgx3d.checkpoint import Checkpoint
from imgx3d.config import MODEL_SPACE_KEYS
from imgx3d.data.labels import Regions
from imgx3d.errors import CheckpointError, InputError
from imgx3d.files import atomic_write, atomic_write_text
from imgx3d.inference.predictor import ensemble_postprocessing, load_checkpoints
from imgx3d.methods.base import WindowSegmenter, method_from_checkpoint

FORMATS = {"torchscript": "model.pt", "onnx": "model.onnx"}
SETTINGS_FILE = "imgx3d_export.json"
TOLERANCE = 1e-4  # largest difference of exported vs PyTorch probabilities accepted
CHECK_BATCH = 2  # windows in the check batch (a batch of another size than traced: the batch axis stays free)
ONNX_OPSET = 17


class WindowNetwork(nn.Module):
    """The exported graph: windows in, class probabilities out (fp32)."""

    def __init__(self, method: WindowSegmenter):
        super().__init__()
        self.method = method

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        return self.method.window_probabilities(windows)


def window_size(checkpoint: Checkpoint, spatial_dims: int) -> list[int]:
    """The exported network's spatial input size: the sliding window (3D) or the slice size (2D)."""
    cfg = checkpoint.config
    return list(cfg.data.slices.size) if spatial_dims == 2 else list(cfg.infer.roi_size or cfg.data.patch_size)


def export_settings(checkpoint: Checkpoint, fmt: str, spatial_dims: int) -> dict:
    """The JSON beside the exported file: input and output, preprocessing, window, labels, postprocessing."""
    cfg = checkpoint.config
    data = dataclasses.asdict(cfg.data)
    size = window_size(checkpoint, spatial_dims)
    if spatial_dims == 3:
        window = {"roi_size": size, "overlap": cfg.infer.overlap, "mode": cfg.infer.blend,
                  "sw_batch_size": cfg.infer.sw_batch_size, "tta_flips": list(cfg.infer.tta_flips),
                  "tta_shifts": cfg.infer.tta_shifts}
    else:  # per slice: cut along slices.axis, resized to slices.size, intensities per volume to [-1, 1]
        window = {"slices": data["slices"], "tta_flips": list(cfg.infer.tta_flips)}
    return {
        "format": fmt, "file": FORMATS[fmt], "method": checkpoint.method_name, "spatial_dims": spatial_dims,
        "input": {"name": "image", "shape": ["batch", checkpoint.in_channels, *size],
                  "dtype": "float32", "channels": checkpoint.get("channel_names") or [],
                  "space": "model space: the image reoriented to RAS (canonical axes), resampled to "
                           "preprocessing.spacing (when set), normalised by preprocessing.preset"},
        "output": _output(checkpoint, size),
        "labels": {str(value): name for value, name in checkpoint.labels.items()},
        "preprocessing": {key: data[key] for key in MODEL_SPACE_KEYS if key not in ("labels", "patch_size", "slices")},
        "window": window,
        "postprocessing": ensemble_postprocessing([checkpoint]).to_json() if cfg.infer.postprocess else None,
    }


def _output(checkpoint: Checkpoint, size: list[int]) -> dict:
    """What the exported network's output holds: class probabilities, or (``data.regions``) region probabilities
    and how they become labels."""
    regions = Regions.of(checkpoint.config.data, checkpoint.labels)
    if regions is None:
        return {"name": "probabilities", "shape": ["batch", checkpoint.num_classes, *size],
                "meaning": "softmax class probabilities; class index i is label value labels[i]"}
    return {"name": "probabilities", "shape": ["batch", len(regions.names), *size],
            "meaning": "sigmoid region probabilities, channel r is region regions[r]; labels: start from 0 and, "
                       "region by region in order, write region_labels[r] where channel r > 0.5",
            "regions": dict(zip(regions.names, map(list, regions.members))), "region_labels": list(regions.writes)}


def _check_torchscript(path: Path, network: nn.Module, windows: torch.Tensor) -> float:
    loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.inference_mode():
        return float((loaded(windows) - network(windows)).abs().max())


def _check_onnx(path: Path, network: nn.Module, windows: torch.Tensor) -> float | None:
    try:
        import onnxruntime
    except ImportError:  # the file is written all the same; the check needs the runtime
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": windows.numpy()})[0]
    with torch.inference_mode():
        return float(np.abs(got - network(windows).numpy()).max())


def _write(network: nn.Module, example: torch.Tensor, fmt: str, path: Path) -> None:
    with warnings.catch_warnings():
        # Benign here, and checked below against PyTorch: the tracer's notes that shape checks are
        # frozen for the traced window size, and ONNX's that instance norm keeps per-window
        # statistics in eval mode (it has no running statistics to use instead).
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*instance_norm.*")
        _export(network, example, fmt, path)


def _export(network: nn.Module, example: torch.Tensor, fmt: str, path: Path) -> None:
    if fmt == "torchscript":
        with torch.inference_mode():
            traced = torch.jit.trace(network, example, check_trace=False)
        atomic_write(path, lambda tmp: traced.save(str(tmp)))
        return
    # torch's TorchScript-based ONNX exporter: fast, and needs no onnxscript (the dynamo exporter does)
    dynamic = {"image": {0: "batch"}, "probabilities": {0: "batch"}}
    atomic_write(path, lambda tmp: torch.onnx.export(network, (example,), str(tmp), input_names=["image"],
                                                     output_names=["probabilities"], dynamic_axes=dynamic,
                                                     opset_version=ONNX_OPSET, dynamo=False))


def export_run(source: str | Path, fmt: str, output: str | Path, tracking_uri: str | None = None) -> dict:
    """Export the run ``source`` (a run folder, checkpoint or mlflow run id) as ``fmt`` into ``output``.

    Returns:
        The settings written to ``imgx3d_export.json``, with ``max_abs_difference`` (None when ONNX
        Runtime is not installed to check an ONNX file).

    Raises:
        InputError: an unknown format; CheckpointError: an ensemble or a method that is not single-pass.
    """
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    checkpoints = load_checkpoints(source, tracking_uri)
    if len(checkpoints) != 1:
        raise CheckpointError(f"{source}: holds {len(checkpoints)} runs; export one run (e.g. {source}/fold_0)")
    checkpoint = checkpoints[0]
    if checkpoint.previous_stage is not None:
        raise CheckpointError(f"{checkpoint.path}: is a cascade's second stage (data.cascade), whose input is the "
                              "first stage's prediction; its export is not built: export the low-resolution run, or "
                              "serve this one with imgx3d predict / the mlflow model")
    method = method_from_checkpoint(checkpoint).eval()
    if not isinstance(method, WindowSegmenter):
        raise CheckpointError(f"{checkpoint.path}: method '{method.name}' predicts by a sampling loop, not one network "
                              "pass per window; only single-pass segmenters (unet) can be exported")
    network = WindowNetwork(method).eval()
    size = window_size(checkpoint, method.spatial_dims)
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(1, checkpoint.in_channels, *size, generator=generator)
    output = Path(output)
    path = output / FORMATS[fmt]
    _write(network, example, fmt, path)
    windows = torch.randn(CHECK_BATCH, checkpoint.in_channels, *size, generator=generator)
    difference = _check_torchscript(path, network, windows) if fmt == "torchscript" else \
        _check_onnx(path, network, windows)
    if difference is not None and difference > TOLERANCE:
        path.unlink()
        raise CheckpointError(f"{checkpoint.path}: the {fmt} export differs from PyTorch by {difference:.2g} "
                              f"(> {TOLERANCE:g}); it was not kept")
    settings = {**export_settings(checkpoint, fmt, method.spatial_dims), "max_abs_difference": difference}
    atomic_write_text(output / SETTINGS_FILE, json.dumps(settings, indent=1))
    return settings
