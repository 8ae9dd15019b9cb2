"""Whole-volume inference: sliding window, flip TTA, native-grid NIfTI output.

The engine owns the windowing (``make_window``) and hands it to ``Method.predict``; a
U-Net calls it once, a diffusion method once per reverse step. Predictions are mapped
back to the input's native grid and written with the input's affine and header.
"""

from __future__ import annotations

import collections
import itertools
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from tqdm.auto import tqdm

from imgx3d.config import Config, DataConfig, InferConfig, SliceConfig, from_dict
from imgx3d.data.io import (
    Volume,
    check_exists,
    class_to_file,
    is_image_path,
    is_volume_path,
    label_dtype,
    strip_suffix,
    write_image2d,
    write_nifti,
)
from imgx3d.data.slices import predict_by_slices
from imgx3d.data.transforms import GridMap, Preprocessor
from imgx3d.errors import CheckpointError, ConfigError, InputError, ResourceError
from imgx3d.inference.windows import streaming_argmax
from imgx3d.interrupts import raise_if_requested, requested
from imgx3d.methods.base import Method, Windowed, build_method, load_method_state
from imgx3d.resources import (
    available_host_bytes,
    choose_precision,
    gib,
    use_fast_cuda_kernels,
)

CHECKPOINT_FORMAT = "imgx3d-checkpoint-v1"


def resolve_device(name: str = "auto", what: str = "--device") -> torch.device:
    """``auto`` → CUDA when available, else CPU; a device this machine lacks is a one-line error
    naming ``what`` (the flag or config key that asked for it)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{what} {name}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{what} {name}: no CUDA device is available here (this torch build: "
                          f"{'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU only'}); use cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"{what} {name}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                          "use one of cuda:0 … or auto")
    return device


def make_window(cfg: InferConfig, patch_size: list[int], sw_device: torch.device | None = None,
                output_device: torch.device | None = None) -> Windowed:
    """The sliding-window runner handed to ``Method.predict``: MONAI gaussian blending.

    Args:
        sw_device, output_device: where each window runs and where the blended whole-volume
            output is held (MONAI's ``sw_device`` / ``device``); None: the input's device.
    """
    roi = list(cfg.roi_size or patch_size)

    def window(fn, x: torch.Tensor) -> torch.Tensor:
        return sliding_window_inference(x, roi, cfg.sw_batch_size, fn, overlap=cfg.overlap, mode=cfg.blend,
                                        sw_device=sw_device, device=output_device)

    return window


# Whole-volume float32 maps of K classes held at once by the window path: MONAI's output and
# its weight map, the returned probabilities, and the flip-TTA sum (an estimate: a diffusion
# method's reverse steps hold a few more, which the margin below leaves room for).
WINDOW_PATH_VOLUMES = 3
MEMORY_MARGIN = 1.25  # headroom over the estimate for temporaries and the allocator


def estimate_host_memory(n_classes: int, in_channels: int, model_shape: tuple[int, ...],
                         native_shape: tuple[int, ...], roi: list[int], streaming: bool, probabilities: bool) -> int:
    """Host bytes predicting one volume holds at its peak, from its shapes alone (before any model work).

    Whole-volume outputs always live on the host (on CUDA too: windows go to the GPU), so the
    host is where a large volume runs out of memory.

    The model-space input, then either the window path's whole-volume maps
    (:data:`WINDOW_PATH_VOLUMES` of ``K`` float32 values per voxel) or the streaming window's
    slab (``K + 1`` maps one ``roi`` deep, see :mod:`imgx3d.inference.windows`) and its int64 label map; native-grid
    probabilities and the label map on the input's grid come on top.
    """
    model = int(np.prod(model_shape, dtype=np.int64))
    native = int(np.prod(native_shape, dtype=np.int64))
    image = 4 * in_channels * model
    if streaming:
        depth = min(roi[2], model_shape[2])
        held = 4 * (n_classes + 1) * int(np.prod(model_shape[:2], dtype=np.int64)) * depth + 8 * model
    else:
        held = WINDOW_PATH_VOLUMES * 4 * n_classes * model
    return int(MEMORY_MARGIN * (image + held + (4 * n_classes * native if probabilities else 0) + 8 * native))


def class_map(probs: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """Index of the most probable class along dim 0 (first maximum on ties).

    ``torch.max(dim=0).indices``, not ``torch.argmax``: on CPU the latter is ~9x slower for
    a reduction over the leading dimension (1.9 s vs 0.2 s for 3 x 256 x 256 x 128).
    """
    return probs.max(0, keepdim=keepdim).indices


def flip_combinations(tta_flips: list[int] | tuple[int, ...]) -> list[list[int]]:
    """Every subset of the spatial ``tta_flips`` axes as tensor dims of a ``(B, C, X, Y, Z)`` batch
    (the empty one first: the unmirrored prediction)."""
    return [[a + 2 for a in c] for r in range(len(tta_flips) + 1) for c in itertools.combinations(sorted(tta_flips), r)]


def predict_probabilities(method: Method, image: torch.Tensor, window: Windowed,
                          tta_flips: list[int] | tuple[int, ...] = (), slices: SliceConfig | None = None) -> torch.Tensor:
    """Class probabilities (K, ...) for one model-space image (C, ...), averaged over flips.

    3D methods run on the whole volume through ``window``; 2D methods (``spatial_dims == 2``)
    through the slice adapter with ``slices`` (default settings if None). With
    ``tta_flips = [0, 1, 2]`` the 8 mirrorings of nnU-Net are used.
    """
    x = image[None]
    combos = flip_combinations(tta_flips)
    if method.spatial_dims == 2:
        slice_cfg = slices or SliceConfig()

        def run(volume: torch.Tensor) -> torch.Tensor:
            return predict_by_slices(method, volume, slice_cfg)
    else:
        def run(volume: torch.Tensor) -> torch.Tensor:
            return method.predict(volume, window)
    total = None
    with torch.inference_mode():
        for dims in combos:
            probs = run(x.flip(dims) if dims else x)
            probs = probs.flip(dims) if dims else probs
            total = probs if total is None else total + probs
    return (total / len(combos) if len(combos) > 1 else total)[0]


@dataclass
class LoadedCase:
    """A case read and preprocessed for prediction."""

    image: torch.Tensor  # (C, X', Y', Z') model space
    grid: GridMap
    reference: Volume  # the first channel's file: the outputs' grid and header


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
        use_fast_cuda_kernels(dev)
        labels = {int(k): v for k, v in state["labels"].items()}
        return cls(method, config, labels, state["in_channels"], dev)

    @property
    def preprocessor(self) -> Preprocessor:
        """Preprocessing as in training."""
        return Preprocessor(self.config.data)

    def load(self, paths: list[Path]) -> LoadedCase:
        """Read one case's channel files and bring them to model space (no model work: safe to
        run in a reader thread while another case is predicted)."""
        check_input_kind(paths[0], self.config.data)
        pre = self.preprocessor
        array, ref = pre.read_image(paths, self.in_channels)
        grid = pre.grid_map(ref)
        return LoadedCase(pre.image_to_model(array, grid), grid, ref)

    def predict_loaded(self, case: LoadedCase, probabilities: bool = False
                       ) -> tuple[np.ndarray, torch.Tensor | None, Any]:
        """Predict a loaded case; returns what :meth:`predict_paths` returns.

        The memory the prediction needs is estimated first: a volume whose whole-volume maps
        would not fit the free host memory goes through the streaming window when the method
        allows it, and is refused in one line when even that would not fit. On CUDA windows run
        on the GPU and the volume-sized outputs stay on the host; out of GPU memory all the same,
        it is tried once more with windows one at a time.

        Raises:
            ResourceError: the volume cannot be predicted within this machine's memory.
        """
        streaming = self._streams(case.image) and not probabilities
        streaming = streaming or self._must_stream(case, probabilities, streaming)
        try:
            return self._predict(case, probabilities, streaming, self.config.infer)
        except torch.cuda.OutOfMemoryError:
            name = case.reference.path or "the volume"
            print(f"imgx3d: warning: {name}: out of GPU memory; trying again with windows one at a time",
                  file=sys.stderr)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            one_window = replace(self.config.infer, sw_batch_size=1)
            try:
                return self._predict(case, probabilities, streaming, one_window)
            except torch.cuda.OutOfMemoryError:
                raise ResourceError(
                    f"{name}: out of GPU memory even with windows one at a time; lower "
                    f"infer.roi_size (now {self.config.infer.roi_size or self.config.data.patch_size}), predict on "
                    "the CPU with --device cpu, or use a GPU with more memory") from None

    def _must_stream(self, case: LoadedCase, probabilities: bool, streaming: bool) -> bool:
        """True when the whole-volume maps would not fit the free host memory but the streaming
        window would; a one-line :class:`ResourceError` when neither would."""
        infer, grid = self.config.infer, case.grid
        roi = list(infer.roi_size or self.config.data.patch_size)

        def need(stream: bool) -> int:
            return estimate_host_memory(self.method.num_classes, case.image.shape[0], tuple(case.image.shape[1:]),
                                        grid.native_shape, roi, stream, probabilities)

        free = available_host_bytes()
        if free is None or need(streaming) <= free:
            return False
        can_stream = (not streaming and not probabilities and infer.streaming != "off"
                      and self.method.spatial_dims == 3 and self.method.window_probabilities() is not None)
        if can_stream and need(True) <= free:
            return True
        shape = "x".join(map(str, case.image.shape[1:]))
        raise ResourceError(
            f"{case.reference.path or 'the volume'}: predicting it needs about {gib(need(streaming))} of host memory "
            f"({self.method.num_classes} classes on a {shape} model grid) but {gib(free)} is free; set a coarser "
            "data.spacing, predict without --probabilities"
            + ("" if streaming or can_stream else ", use infer.streaming: on with a single-pass 3D method")
            + ", or lower infer.sw_batch_size and free memory")

    def _autocast(self, infer: InferConfig) -> torch.autocast:
        """The networks' precision at inference (``infer.precision``; fp32: autocast off)."""
        dtype = choose_precision(infer.precision, self.device)
        return torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def _model_space_probabilities(self, image: torch.Tensor, infer: InferConfig) -> torch.Tensor:
        """Class probabilities (K, X', Y', Z') of a model-space image, in fp32 on the host.

        On CUDA the windows go to the GPU and the whole-volume output stays on the host
        (MONAI's ``sw_device`` / ``device``), so GPU memory holds windows, not volumes.
        """
        if self.device.type == "cuda":
            window = make_window(infer, self.config.data.patch_size, self.device, torch.device("cpu"))
        else:
            window = make_window(infer, self.config.data.patch_size)
            image = image.to(self.device)
        return predict_probabilities(self.method, image, window, infer.tta_flips, self.config.data.slices).float().cpu()

    def model_space_classes(self, image: torch.Tensor) -> torch.Tensor:
        """Class indices (X', Y', Z') of a model-space image (C, X', Y', Z'), by the same windows,
        precision and memory rules as :meth:`predict_loaded` (streaming where it applies), without
        test-time augmentation: what validation during training scores."""
        infer = replace(self.config.infer, tta_flips=[])
        with self._autocast(infer):
            if self._streams(image):
                return self._stream(image, infer).reshape(image.shape[1:])
            return class_map(self._model_space_probabilities(image, infer))

    def _predict(self, case: LoadedCase, probabilities: bool, streaming: bool, infer: InferConfig
                 ) -> tuple[np.ndarray, torch.Tensor | None, Any]:
        """One attempt at :meth:`predict_loaded` with these window settings."""
        pre, grid = self.preprocessor, case.grid
        with self._autocast(infer):
            if streaming:
                return self._labels_to_native(self._stream(case.image, infer), grid), None, case.reference
            probs = self._model_space_probabilities(case.image, infer)
        native = pre.to_native(probs, grid) if probabilities or grid.model_shape != grid.cropped_shape else None
        if native is not None:
            labelmap = class_map(native).numpy()
        else:  # same grid up to axis order: argmax first, then move only the label map
            labelmap = pre.to_native(class_map(probs, keepdim=True), grid)[0].numpy()
        return self._class_values(labelmap, probs.shape[0]), native if probabilities else None, case.reference

    def _class_values(self, labelmap: np.ndarray, n_classes: int) -> np.ndarray:
        """Class indices → the dataset's label values (when they are not 0 … K-1)."""
        values = np.array(sorted(self.labels), dtype=np.int64)
        if len(values) != n_classes or not np.array_equal(values, np.arange(len(values))):
            labelmap = values[np.clip(labelmap, 0, len(values) - 1)]
        return labelmap

    def _streams(self, image: torch.Tensor) -> bool:
        """Whether this prediction goes through the memory-bounded sliding window."""
        infer = self.config.infer
        if infer.streaming == "off" or self.method.spatial_dims != 3 or self.method.window_probabilities() is None:
            return False
        full_gib = 4 * self.method.num_classes * image[0].numel() / 2**30
        return infer.streaming == "on" or full_gib > infer.streaming_above_gib

    def _stream(self, image: torch.Tensor, infer: InferConfig) -> torch.Tensor:
        """Model-space class indices of a single-pass method, window by window (flip TTA per window)."""
        fn = self.method.window_probabilities()
        combos = flip_combinations(infer.tta_flips)

        def mirrored(x: torch.Tensor) -> torch.Tensor:
            return (sum(fn(x.flip(d)).flip(d) if d else fn(x) for d in combos) / len(combos)).float()

        # On CPU, windows go one at a time: batching them measured no faster (1.08x vs 1.12x of
        # MONAI's time on 512x512x300x14) and held 0.66 GiB more (scripts/bench_sliding_window.py).
        batch = infer.sw_batch_size if self.device.type == "cuda" else 1
        with torch.inference_mode():
            return streaming_argmax(mirrored, image[None].to(self.device), infer.roi_size or self.config.data.patch_size,
                                    batch, infer.overlap, infer.blend).cpu()

    def _labels_to_native(self, labels: torch.Tensor, grid: GridMap) -> np.ndarray:
        """Model-space class indices → native-grid label values (nearest resampling back)."""
        labels = labels[None].long()
        if tuple(labels.shape[1:]) != grid.cropped_shape:
            labels = F.interpolate(labels[None].float(), size=grid.cropped_shape, mode="nearest-exact")[0].long()
        native = self.preprocessor.to_native(labels, grid)[0].numpy()
        return self._class_values(native, self.method.num_classes)

    def predict_paths(self, paths: list[Path], probabilities: bool = False
                      ) -> tuple[np.ndarray, torch.Tensor | None, Any]:
        """Predict one case from its channel files.

        Returns:
            (label map on the native grid, native-grid probabilities (K, X, Y, Z) if asked
            for, the reference volume whose affine/header the outputs are written with).
        """
        return self.predict_loaded(self.load(paths), probabilities)


def check_input_kind(path: Path, data_cfg: DataConfig) -> None:
    """Refuse a 2D image for a run trained on volumes, and a volume for a run trained on 2D images."""
    if data_cfg.mode == "volume" and is_image_path(Path(path)):
        raise InputError(f"{path}: is a 2D image but this run was trained on volumes; use a run trained with --image")
    if data_cfg.mode == "image" and not is_image_path(Path(path)):
        raise InputError(f"{path}: this run was trained on 2D images (--image); pass PNG/JPEG/TIFF/GIF/BMP files")


def prediction_path(output: Path, case_id: str, data_cfg: DataConfig) -> Path:
    """Where a case's label map goes: ``<case>.png`` for 2D images, ``<case>.nii.gz`` for volumes."""
    return output / f"{case_id}{'.png' if data_cfg.mode == 'image' else '.nii.gz'}"


def write_labelmap(labelmap: np.ndarray, path: Path, reference: Volume, labels: dict[int, str],
                   data_cfg: DataConfig) -> None:
    """Write class values as the dataset's own label values (``data.label_map`` / ``mask_threshold``
    undone), as a PNG for 2D images or a NIfTI on the reference's grid."""
    values = class_to_file(labelmap, data_cfg)
    if path.suffix == ".png":
        write_image2d(values, path)
    else:
        largest = int(class_to_file(np.array(sorted(labels)), data_cfg).max())
        write_nifti(values, path, reference, dtype=label_dtype({largest: ""}))


def resolve_inputs(inputs: list[str | Path], data_cfg: DataConfig, in_channels: int) -> list[tuple[str, list[Path]]]:
    """Turn ``--input`` files/folders into cases ``(case_id, channel files)``.

    Single-channel models (and runs trained on 2D images): every volume file (or DICOM series
    folder), or every 2D image, is a case.
    Multi-channel models: nnU-Net style ``CASE_0000`` … files are grouped; folders of case
    folders are matched with ``data.channels``; a 4D NIfTI is one case.
    """
    cases: list[tuple[str, list[Path]]] = []
    for item in inputs:
        path = Path(item)
        check_exists(path, "check --input")
        if path.is_file():
            cases.append((strip_suffix(path.name), [path]))
            continue
        wanted = is_image_path if data_cfg.mode == "image" else is_volume_path
        files = sorted(p for p in path.iterdir() if p.is_file() and wanted(p) and not p.name.startswith("."))
        if data_cfg.mode == "image":
            cases += [(strip_suffix(p.name), [p]) for p in files]
        elif in_channels > 1 and data_cfg.channels:
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
        kinds = "2D images (.png/.jpg/.tif/.gif/.bmp)" if data_cfg.mode == "image" else \
            "input volumes (.nii/.nii.gz/.nrrd/.mha or DICOM folders)"
        raise InputError(f"{', '.join(map(str, inputs))}: no {kinds} found")
    ids = [c for c, _ in cases]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise InputError(f"--input: two inputs share the case name '{dup[0]}'; rename one so outputs do not collide")
    return cases


def check_output_folder(output: Path, inputs: list[str | Path]) -> None:
    """Refuse to write into (or below) an input folder, or next to input files."""
    out = Path(os.path.realpath(output))
    for item in inputs:
        check_exists(Path(item), "check --input")
        path = Path(os.path.realpath(item))
        folder = path if path.is_dir() else path.parent
        if out == folder or (path.is_dir() and folder in out.parents):
            raise InputError(f"{output}: is inside the input folder {folder}; choose an --output folder outside the inputs")


class _Pipeline:
    """Reading ahead and writing behind the model: ``workers`` reader threads (0: everything in
    the calling thread, in order) and one writer thread. Results and errors come back in order."""

    def __init__(self, workers: int):
        self.readers = ThreadPoolExecutor(workers) if workers > 0 else None
        self.writer = ThreadPoolExecutor(1) if workers > 0 else None
        self.writes: list = []

    def read(self, fn, *args):
        """Start ``fn(*args)``; returns a callable that gives its result (or raises its error)."""
        if self.readers is None:
            return lambda: fn(*args)
        future = self.readers.submit(fn, *args)
        return future.result

    def write(self, fn, *args, done) -> None:
        """Run ``fn(*args)`` behind the model, then ``done()`` (also when it fails)."""
        def run():
            try:
                fn(*args)
            finally:
                done()
        if self.writer is None:
            run()
        else:
            self.writes.append(self.writer.submit(run))

    def drain(self) -> None:
        """Wait for every write; the first write error is raised."""
        writes, self.writes = self.writes, []
        for future in writes:
            future.result()

    def __enter__(self) -> "_Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        for pool in (self.readers, self.writer):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)


LOCK_GRACE_S = 10.0  # a lock file without a PID yet is its creator's for this long


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only; PermissionError means it exists
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def claim_case(output: Path, case_id: str) -> Path | None:
    """Take ``output/.<case>.lock`` (atomic create) for this process; None while another live
    process holds it. A lock whose process died is taken over."""
    lock = output / f".{case_id}.lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                text, age = lock.read_text(encoding="utf-8").strip(), time.time() - lock.stat().st_mtime
            except OSError:  # released meanwhile
                continue
            if (text.isdigit() and _alive(int(text))) or (not text and age < LOCK_GRACE_S):
                return None
            lock.unlink(missing_ok=True)  # its process died mid-case
            continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return lock
    return None


def predict_to_folder(predictor: Predictor, inputs: list[str | Path], output: str | Path, overwrite: bool = False,
                      probabilities: bool = False, overlay_dir: str | Path | None = None,
                      workers: int = 0) -> list[Path]:
    """Predict every input case into ``output/<case>.nii.gz`` (``.png`` for 2D images); with
    ``overlay_dir``, also a contour montage ``<case>.png`` of each newly predicted case there.

    With ``workers`` > 0, that many threads read and preprocess the next cases while the model
    predicts, and a writer thread saves results behind it (same outputs as ``workers=0``).
    Safe to interrupt and to share: outputs are written atomically (never half-written under
    their final name), existing ones are skipped, so a restarted run finishes the rest; a case
    another live process is predicting into the same folder is waited for, not redone.
    """
    from imgx3d.evaluation.plots import overlay_montage

    output = Path(output)
    check_output_folder(output, inputs)
    data_cfg = predictor.config.data
    cases = resolve_inputs(inputs, data_cfg, predictor.in_channels)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"{output}: cannot create the output folder ({err.strerror}); choose a writable --output") from None
    done: dict[str, Path] = {}
    pending = [(case_id, paths, overwrite) for case_id, paths in cases]

    def write(case_id: str, target: Path, labelmap: np.ndarray, probs: torch.Tensor | None, ref: Volume) -> None:
        write_labelmap(labelmap, target, ref, predictor.labels, data_cfg)
        if probs is not None:
            write_nifti(probs.permute(1, 2, 3, 0).numpy(), output / f"{case_id}_probabilities.nii.gz", ref,
                        dtype=np.float32)
        if overlay_dir is not None:
            overlay_montage(ref.array[0], labelmap, predictor.labels, Path(overlay_dir) / f"{case_id}.png", title=case_id)

    with tqdm(total=len(cases), desc="predict", unit="case", disable=None) as bar, _Pipeline(workers) as pipe:
        while pending:
            busy: list = []
            ahead: collections.deque = collections.deque()  # claimed cases whose reading has started

            def predict_next() -> None:
                case_id, target, lock, loaded = ahead.popleft()
                try:
                    labelmap, probs, ref = predictor.predict_loaded(loaded(), probabilities)
                except BaseException:
                    lock.unlink(missing_ok=True)
                    raise
                pipe.write(write, case_id, target, labelmap, probs, ref, done=lambda: lock.unlink(missing_ok=True))
                done[case_id] = target
                bar.update()

            try:
                for case_id, paths, redo in pending:
                    if requested() is not None:  # stop claiming cases; the ones read ahead are dropped
                        break
                    target = prediction_path(output, case_id, data_cfg)
                    if target.exists() and not redo:
                        done[case_id] = target
                        bar.update()
                        continue
                    lock = claim_case(output, case_id)
                    if lock is None:  # another process is on it: its result will do
                        busy.append((case_id, paths, False))
                        continue
                    ahead.append((case_id, target, lock, pipe.read(predictor.load, paths)))
                    if len(ahead) > workers:
                        predict_next()
                while ahead and requested() is None:
                    predict_next()
            finally:
                for _, _, lock, _ in ahead:
                    lock.unlink(missing_ok=True)
                pipe.drain()
            raise_if_requested(f"{len(done)} of {len(cases)} case(s) are in {output}, each complete; run the same "
                               "command again to predict the rest")
            if busy:
                time.sleep(0.5)
            pending = busy
    return [done[case_id] for case_id, _ in cases]
