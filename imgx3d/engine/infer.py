"""Whole-volume inference: sliding window, flip TTA, native-grid NIfTI output.

The engine owns the windowing (``make_window``) and hands it to ``Method.predict``; a
U-Net calls it once, a diffusion method once per reverse step. Predictions are mapped
back to the input's native grid and written with the input's affine and header.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from tqdm.auto import tqdm

from imgx3d.config import Config, DataConfig, InferConfig, SliceConfig, from_dict
from imgx3d.data.io import is_volume_path, label_dtype, strip_suffix, write_nifti
from imgx3d.data.slices import predict_by_slices
from imgx3d.data.transforms import Preprocessor
from imgx3d.errors import CheckpointError, InputError
from imgx3d.methods.base import Method, Windowed, build_method, load_method_state

CHECKPOINT_FORMAT = "imgx3d-checkpoint-v1"


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_window(cfg: InferConfig, patch_size: list[int]) -> Windowed:
    """The sliding-window runner handed to ``Method.predict``: MONAI gaussian blending."""
    roi = list(cfg.roi_size or patch_size)

    def window(fn, x: torch.Tensor) -> torch.Tensor:
        return sliding_window_inference(x, roi, cfg.sw_batch_size, fn, overlap=cfg.overlap, mode=cfg.blend)

    return window


def class_map(probs: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """Index of the most probable class along dim 0 (first maximum on ties).

    ``torch.max(dim=0).indices``, not ``torch.argmax``: on CPU the latter is ~9x slower for
    a reduction over the leading dimension (1.9 s vs 0.2 s for 3 x 256 x 256 x 128).
    """
    return probs.max(0, keepdim=keepdim).indices


def predict_probabilities(method: Method, image: torch.Tensor, window: Windowed,
                          tta_flips: list[int] | tuple[int, ...] = (), slices: SliceConfig | None = None) -> torch.Tensor:
    """Class probabilities (K, ...) for one model-space image (C, ...), averaged over flips.

    3D methods run on the whole volume through ``window``; 2D methods (``spatial_dims == 2``)
    through the slice adapter with ``slices`` (default settings if None). With
    ``tta_flips = [0, 1, 2]`` the 8 mirrorings of nnU-Net are used.
    """
    x = image[None]
    combos = [c for r in range(len(tta_flips) + 1) for c in itertools.combinations(sorted(tta_flips), r)]
    if method.spatial_dims == 2:
        slice_cfg = slices or SliceConfig()

        def run(volume: torch.Tensor) -> torch.Tensor:
            return predict_by_slices(method, volume, slice_cfg)
    else:
        def run(volume: torch.Tensor) -> torch.Tensor:
            return method.predict(volume, window)
    total = None
    with torch.inference_mode():
        for axes in combos:
            dims = [a + 2 for a in axes]
            probs = run(x.flip(dims) if dims else x)
            probs = probs.flip(dims) if dims else probs
            total = probs if total is None else total + probs
    return (total / len(combos) if len(combos) > 1 else total)[0]


@dataclass
class Predictor:
    """A trained method plus everything needed to predict files on their native grid."""

    method: Method
    config: Config
    labels: dict[int, str]
    in_channels: int
    device: torch.device

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto") -> "Predictor":
        """Load a checkpoint written by the trainer (``best.pt`` / ``last.pt``)."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: checkpoint not found; pass a best.pt/last.pt from a run folder")
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:
            raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}); pass a best.pt from imgx3d train") from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path}: not an imgx3d checkpoint; pass a best.pt from imgx3d train")
        config = from_dict(Config, state["config"])
        method = build_method(config.method, state["num_classes"], state["in_channels"])
        load_method_state(method, state["model"], str(path))
        dev = resolve_device(device)
        method.to(dev).eval()
        labels = {int(k): v for k, v in state["labels"].items()}
        return cls(method, config, labels, state["in_channels"], dev)

    @property
    def preprocessor(self) -> Preprocessor:
        """Preprocessing as in training."""
        return Preprocessor(self.config.data)

    def predict_paths(self, paths: list[Path], probabilities: bool = False
                      ) -> tuple[np.ndarray, torch.Tensor | None, Any]:
        """Predict one case from its channel files.

        Returns:
            (label map on the native grid, native-grid probabilities (K, X, Y, Z) if asked
            for, the reference volume whose affine/header the outputs are written with).
        """
        pre = self.preprocessor
        array, ref = pre.read_image(paths, self.in_channels)
        grid = pre.grid_map(ref)
        image = pre.image_to_model(array, grid).to(self.device)
        window = make_window(self.config.infer, self.config.data.patch_size)
        probs = predict_probabilities(self.method, image, window, self.config.infer.tta_flips,
                                      self.config.data.slices).cpu()
        native = pre.to_native(probs, grid) if probabilities or grid.model_shape != grid.ras_shape else None
        if native is not None:
            labelmap = class_map(native).numpy()
        else:  # same grid up to axis order: argmax first, then move only the label map
            labelmap = pre.to_native(class_map(probs, keepdim=True), grid)[0].numpy()
        values = np.array(sorted(self.labels), dtype=np.int64)
        if len(values) != probs.shape[0] or not np.array_equal(values, np.arange(len(values))):
            labelmap = values[np.clip(labelmap, 0, len(values) - 1)]
        return labelmap, native if probabilities else None, ref


def resolve_inputs(inputs: list[str | Path], data_cfg: DataConfig, in_channels: int) -> list[tuple[str, list[Path]]]:
    """Turn ``--input`` files/folders into cases ``(case_id, channel files)``.

    Single-channel models: every volume file (or DICOM series folder) is a case.
    Multi-channel models: nnU-Net style ``CASE_0000`` … files are grouped; folders of case
    folders are matched with ``data.channels``; a 4D NIfTI is one case.
    """
    cases: list[tuple[str, list[Path]]] = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise InputError(f"{path}: not found; check --input")
        if path.is_file():
            cases.append((strip_suffix(path.name), [path]))
            continue
        files = sorted(p for p in path.iterdir() if p.is_file() and is_volume_path(p) and not p.name.startswith("."))
        if in_channels > 1 and data_cfg.channels:
            from imgx3d.data.catalog import find_cases

            cfg = from_dict(DataConfig, {"layout": "cases", "channels": data_cfg.channels,
                                         "labels": {0: "background", 1: "x"}})
            cases += [(c.case_id, c.images) for c in find_cases(path, cfg).cases]
        elif in_channels > 1 and any(strip_suffix(p.name)[-5:-4] == "_" for p in files):
            groups: dict[str, list[Path]] = {}
            for p in files:
                groups.setdefault(strip_suffix(p.name)[:-5], []).append(p)
            cases += sorted(groups.items())
        elif files:
            cases += [(strip_suffix(p.name), [p]) for p in files]
        elif any(p.is_file() for p in path.iterdir()):
            cases.append((path.name, [path]))  # a DICOM series folder
    if not cases:
        raise InputError(f"{', '.join(map(str, inputs))}: no input volumes found (.nii/.nii.gz/.nrrd/.mha or DICOM folders)")
    ids = [c for c, _ in cases]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise InputError(f"--input: two inputs share the case name '{dup[0]}'; rename one so outputs do not collide")
    return cases


def check_output_folder(output: Path, inputs: list[str | Path]) -> None:
    """Refuse to write into (or below) an input folder, or next to input files."""
    out = output.resolve()
    for item in inputs:
        path = Path(item).resolve()
        folder = path if path.is_dir() else path.parent
        if out == folder or (path.is_dir() and folder in out.parents):
            raise InputError(f"{output}: is inside the input folder {folder}; choose an --output folder outside the inputs")


def predict_to_folder(predictor: Predictor, inputs: list[str | Path], output: str | Path, overwrite: bool = False,
                      probabilities: bool = False) -> list[Path]:
    """Predict every input case into ``output/<case>.nii.gz`` (atomic writes, skip existing)."""
    output = Path(output)
    check_output_folder(output, inputs)
    cases = resolve_inputs(inputs, predictor.config.data, predictor.in_channels)
    output.mkdir(parents=True, exist_ok=True)
    dtype = label_dtype(predictor.labels)
    written = []
    for case_id, paths in tqdm(cases, desc="predict", unit="case", disable=None):
        target = output / f"{case_id}.nii.gz"
        if target.exists() and not overwrite:
            written.append(target)
            continue
        labelmap, probs, ref = predictor.predict_paths(paths, probabilities)
        write_nifti(labelmap, target, ref, dtype=dtype)
        if probs is not None:
            write_nifti(probs.permute(1, 2, 3, 0).numpy(), output / f"{case_id}_probabilities.nii.gz", ref,
                        dtype=np.float32)
        written.append(target)
    return written
