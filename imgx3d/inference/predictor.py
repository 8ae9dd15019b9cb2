"""One prediction path: ``Predictor.load(source, settings)`` → ``predict`` → a native-grid ``Prediction``.

A predictor runs one trained segmenter or an ensemble of several (the folds of a
cross-validation, or runs trained on the same data settings): their class probabilities are
averaged in model space, window by window where the volume streams. The run's learned
postprocessing (:mod:`imgx3d.inference.postprocess`) is applied to the native-grid label map.

``imgx3d predict``, test-split scoring, validation during training, the demo, the notebook and
the Python API all go through :class:`Predictor`: it reads a case into model space
(:func:`imgx3d.data.geometry.to_model`), runs the method through its window (3D sliding, 2D
slice, or the memory-bounded streaming window of :mod:`imgx3d.inference.windows`) with flip TTA,
in the settings' precision, and maps the result back with the case's
:class:`~imgx3d.data.geometry.Inverse`: the label map and probabilities come back as
:class:`~imgx3d.data.io.Volume`\\ s on the input's grid, carrying its affine and header.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from imgx3d.checkpoint import Checkpoint, load_checkpoint
from imgx3d.config import (
    MODEL_SPACE_KEYS,
    Config,
    DataConfig,
    InferConfig,
    SliceConfig,
    TrackingConfig,
    infer_with,
)
from imgx3d.data.geometry import ModelCase, class_map, to_model, to_native
from imgx3d.data.io import Volume, is_image_path
from imgx3d.data.labels import LabelCodec, Regions
from imgx3d.data.transforms import Preprocessor
from imgx3d.errors import CheckpointError, ConfigError, InputError, ResourceError
from imgx3d.inference.cascade import PreviousStage
from imgx3d.inference.images import ImageObject, like, to_volume
from imgx3d.inference.postprocess import CaseCandidates, Postprocessing, learn_postprocessing
from imgx3d.inference.uncertainty import Spread
from imgx3d.inference.windows import (ConcurrentBatches, make_window, predict_by_slices, streaming_argmax,
                                      window_streams)
from imgx3d.methods.base import (
    Codec,
    Generator,
    Method,
    Sampler,
    Segmenter,
    Window,
    WindowSegmenter,
    method_from_checkpoint,
    regions_of,
)
from imgx3d.resources import (
    available_host_bytes,
    autocast,
    choose_precision,
    gib,
    resolve_device,
    use_fast_cpu_kernels,
    use_fast_cuda_kernels,
)


def _settings_from_config(cls: type, infer: InferConfig, device: str = "auto", **overrides: Any) -> Any:
    """``infer`` with ``overrides`` (None values ignored; each checked as the config key ``infer.<name>``)."""
    changed = infer_with(infer, {k: v for k, v in overrides.items() if v is not None})
    values = dataclasses.asdict(changed)
    return cls(device=device or "auto", **{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _settings_fields() -> list[tuple[str, Any, Any]]:
    """``device``, then every :class:`~imgx3d.config.InferConfig` field with its default (lists as tuples)."""
    fields: list[tuple[str, Any, Any]] = [("device", str, dataclasses.field(default="auto"))]
    for f in dataclasses.fields(InferConfig):
        default = f.default if f.default is not dataclasses.MISSING else tuple(f.default_factory())
        fields.append((f.name, Any, dataclasses.field(default=default)))
    return fields


# How a predictor runs: the run's ``infer:`` config, overridden by the caller, plus ``device``
# (``auto``, ``cpu``, ``cuda[:i]``). Its fields are made from InferConfig's, so a setting has one
# home (its default and its documentation there); immutable: a changed setting is a new object
# (``dataclasses.replace``), never an edit of the run's config.
InferSettings = dataclasses.make_dataclass(
    "InferSettings", _settings_fields(), frozen=True,
    namespace={"from_config": classmethod(_settings_from_config), "__module__": __name__,
               "__doc__": "How a predictor runs: InferConfig's fields (lists as tuples) and ``device``."})


@dataclass(frozen=True)
class Prediction:
    """A prediction on the input's native grid.

    Attributes:
        labels: class values (the dataset's label values), with the input's affine and header.
        probabilities: ``(K, X, Y, Z)`` float32 class probabilities when asked for, else None.
        uncertainty: when asked for, ``(1, X, Y, Z)`` predictive entropy, or ``(2, X, Y, Z)`` predictive
            entropy and mutual information when several members were averaged (nats; see
            :mod:`imgx3d.inference.uncertainty`); else None.
        members: how many predictions were averaged (mirrorings × shifts × ensemble members × samples;
            counted when the uncertainty was asked for).
    """

    labels: Volume
    probabilities: Volume | None = None
    uncertainty: Volume | None = None
    members: int = 1


# Whole-volume float32 maps of K classes held at once by the window path: MONAI's output and
# its weight map, the returned probabilities, and the flip-TTA sum (an estimate: a diffusion
# method's reverse steps hold a few more, which the margin below leaves room for).
WINDOW_PATH_VOLUMES = 3
MEMORY_MARGIN = 1.25  # headroom over the estimate for temporaries and the allocator


def estimate_host_memory(n_classes: int, in_channels: int, model_shape: tuple[int, ...],
                         native_shape: tuple[int, ...], roi: list[int], streaming: bool, probabilities: bool,
                         members: int = 1) -> int:
    """Host bytes predicting one volume holds at its peak, from its shapes alone (before any model work).

    Whole-volume outputs always live on the host (on CUDA too: windows go to the GPU), so the
    host is where a large volume runs out of memory.

    The model-space input, then either the window path's whole-volume maps
    (:data:`WINDOW_PATH_VOLUMES` of ``K`` float32 values per voxel) or the streaming window's
    slab (``K`` maps one ``roi`` deep, see :func:`~imgx3d.inference.windows.streaming_argmax`) and its int64 label map; native-grid
    probabilities and the label map on the input's grid come on top. An ensemble (``members`` > 1)
    holds one more whole-volume map on the window path (the running sum); streaming, the same slab.
    """
    model = int(np.prod(model_shape, dtype=np.int64))
    native = int(np.prod(native_shape, dtype=np.int64))
    image = 4 * in_channels * model
    if streaming:
        depth = min(roi[2], model_shape[2])
        held = 4 * n_classes * int(np.prod(model_shape[:2], dtype=np.int64)) * depth + 8 * model
    else:
        held = (WINDOW_PATH_VOLUMES + (members > 1)) * 4 * n_classes * model
    return int(MEMORY_MARGIN * (image + held + (4 * n_classes * native if probabilities else 0) + 8 * native))


def flip_combinations(tta_flips: list[int] | tuple[int, ...]) -> list[list[int]]:
    """Every subset of the spatial ``tta_flips`` axes as tensor dims of a ``(B, C, X, Y, Z)`` batch
    (the empty one first: the unmirrored prediction)."""
    return [[a + 2 for a in c] for r in range(len(tta_flips) + 1) for c in itertools.combinations(sorted(tta_flips), r)]


def shift_paddings(tta_shifts: int, spatial_dims: int = 3) -> list[list[int]]:
    """``F.pad`` paddings of the ``tta_shifts`` phase shifts: shift s pads s voxels before and
    ``tta_shifts - 1 - s`` after along every spatial axis, so every shifted volume has the same size
    (the same windows, the same padding to the window) and its content sits s voxels further on."""
    return [[p for _ in range(spatial_dims) for p in (s, tta_shifts - 1 - s)] for s in range(max(1, tta_shifts))]


def predict_probabilities(method: Method, image: torch.Tensor, window: Window,
                          tta_flips: list[int] | tuple[int, ...] = (), slices: SliceConfig | None = None,
                          tta_shifts: int = 1, spread: Spread | None = None) -> torch.Tensor:
    """Class probabilities (K, ...) for one model-space image (C, ...), averaged over flips and shifts.

    3D methods run on the whole volume through ``window``; 2D methods (``spatial_dims == 2``)
    through the slice adapter with ``slices`` (default settings if None). With
    ``tta_flips = [0, 1, 2]`` the 8 mirrorings of nnU-Net are used. With ``tta_shifts = N`` a 3D
    method also sees the volume shifted by 0 … N − 1 voxels along every axis (each mirroring at each
    shift; see :func:`shift_paddings`; 2D methods: unused), and every map is moved back before the mean.
    ``spread``: every pass (and every sample of a :class:`~imgx3d.methods.base.Sampler`) is also
    added to it, moved back, for the uncertainty maps; the result is the same.

    Why shifts: a U-Net's strided poolings see a volume at one phase of their grid, and the output
    carries that grid's aliasing; averaging phases is an ensemble of the same weights at no training
    cost. On the hippocampus bench split (30 CPU-minutes, 2 seeds, 40 test cases; ``benchmarks/tta.py``)
    2 shifts with the axis-0 mirror raised test Dice 0.8723 → 0.8767 (+0.0050 / +0.0039 per seed;
    validation +0.0013), 4 shifts to 0.8780; a second trained model averaged in instead: +0.0007. A
    network trained on shifted patches (``data.translate``) is less tied to one phase and gains less:
    0.8770 → 0.8791 at ±2 voxels, 0.8788 → 0.8800 at ±4 (+0.0008 / +0.0017; over 3 seeds 0.8785 → 0.8797).
    """
    x = image[None]
    combos = flip_combinations(tta_flips)
    paddings = shift_paddings(tta_shifts if method.spatial_dims == 3 else 1)
    if method.spatial_dims == 2:
        slice_cfg = slices or SliceConfig()

        def run(volume: torch.Tensor) -> torch.Tensor:
            return predict_by_slices(method, volume, slice_cfg)
    else:
        def run(volume: torch.Tensor) -> torch.Tensor:
            return method.predict(volume, window)
    sampled = spread is not None and isinstance(method, Sampler) and method.spatial_dims == 3
    total = None
    with torch.inference_mode():
        for pad in paddings:
            shifted = F.pad(x, pad) if any(pad) else x
            back = tuple(slice(pad[2 * a], pad[2 * a] + n) for a, n in enumerate(x.shape[2:]))

            def undo(probs: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
                return (probs.flip(dims) if dims else probs)[(slice(None), slice(None), *back)]

            for dims in combos:
                volume = shifted.flip(dims) if dims else shifted
                if sampled:  # each sample joins the spread; the prediction combines them as predict does
                    samples = method.sample_probabilities(volume, window)
                    probs = undo(method.combine_samples(_recorded(samples, spread, lambda p: undo(p, dims))), dims)
                else:
                    probs = undo(run(volume), dims)
                    if spread is not None:
                        spread.add(probs[0])
                total = probs if total is None else total + probs
    passes = len(combos) * len(paddings)
    return (total / passes if passes > 1 else total)[0]


def _recorded(samples: Iterator[torch.Tensor], spread: Spread, undo: Callable[[torch.Tensor], torch.Tensor]
              ) -> Iterator[torch.Tensor]:
    """``samples`` passed on unchanged, each also added to ``spread`` (moved back by ``undo``)."""
    for probs in samples:
        spread.add(undo(probs)[0])
        yield probs


def check_input_kind(path: Path, data_cfg: DataConfig) -> None:
    """Refuse a 2D image for a run trained on volumes, and a volume for a run trained on 2D images."""
    if data_cfg.mode == "volume" and is_image_path(Path(path)):
        raise InputError(f"{path}: is a 2D image but this run was trained on volumes; use a run trained with --image")
    if data_cfg.mode == "image" and not is_image_path(Path(path)):
        raise InputError(f"{path}: this run was trained on 2D images (--image); pass PNG/JPEG/TIFF/GIF/BMP files")


def _not_a_segmenter(method: Method, source: Path) -> CheckpointError:
    """The one-line refusal of a run whose method does not segment, naming what to do with it instead."""
    if isinstance(method, Generator):
        hint = "it generates image/mask pairs: use 'imgx3d synth --run RUN', then train a segmenter with data.extra"
    elif isinstance(method, Codec):
        hint = "it is a latent codec: use its run folder as method.codec.path of sdseg, and predict with that run"
    else:
        hint = "predict with a segmenter's run (unet, imgx, sdseg, darl)"
    return CheckpointError(f"{source}: method '{method.name}' does not segment; {hint}")


# The data settings that define a run's model space and window: runs ensembled together must agree on them.
def check_ensemble(checkpoints: list[Checkpoint]) -> None:
    """Refuse, in one line, runs that cannot be averaged: other classes, channels, dimensionality or
    data settings (the model space their probabilities live in)."""
    first = checkpoints[0]
    if len(checkpoints) > 1 and any(c.previous_stage is not None for c in checkpoints):
        cascade = next(c for c in checkpoints if c.previous_stage is not None)
        raise CheckpointError(f"{cascade.path}: a cascade's stage (data.cascade) cannot be ensembled yet (each member "
                              "would need its own low-resolution input); predict with one run at a time")
    for other in checkpoints[1:]:
        pairs = {"labels": (first.labels, other.labels), "input channels": (first.in_channels, other.in_channels)}
        pairs.update({f"data.{k}": (getattr(first.config.data, k), getattr(other.config.data, k))
                      for k in MODEL_SPACE_KEYS})
        for what, (a, b) in pairs.items():
            if a != b:
                raise CheckpointError(f"{other.path}: cannot be ensembled with {first.path}: {what} differs ({b} vs "
                                      f"{a}); ensemble runs trained on the same classes and data settings")


def ensemble_sources(source: str | Path) -> list[Path] | None:
    """The fold runs of a cross-validation folder (``fold_*/best.pt``), or None when ``source`` is not one."""
    path = Path(source)
    folds = sorted(path.glob("fold_*/best.pt")) if path.is_dir() and not (path / "best.pt").exists() else []
    return folds or None


def load_checkpoints(source: str | Path | Checkpoint | list, tracking_uri: str | None = None) -> list[Checkpoint]:
    """The checkpoints ``source`` names: a checkpoint file, a run folder (its ``best.pt``), an mlflow
    run id, a cross-validation folder (its ``fold_*/best.pt``), or a list of these."""
    sources = list(source) if isinstance(source, (list, tuple)) else [source]
    if len(sources) == 1 and not isinstance(sources[0], Checkpoint):
        sources = ensemble_sources(sources[0]) or sources
    checkpoints = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, item in enumerate(sources):
            if isinstance(item, Checkpoint):
                checkpoints.append(item)
            elif Path(item).exists():
                checkpoints.append(load_checkpoint(item))
            else:  # an mlflow run id
                from imgx3d.tracking import download_run_checkpoint

                folder = Path(tmp) / str(i)
                folder.mkdir()
                path = download_run_checkpoint(str(item), tracking_uri or TrackingConfig.uri, folder)
                checkpoints.append(load_checkpoint(path))
    return checkpoints


def ensemble_postprocessing(checkpoints: list[Checkpoint]) -> Postprocessing:
    """The postprocessing of one run (its learned decision), or of an ensemble: decided again on the
    members' validation cases pooled (nnU-Net decides a cross-validation's on all folds' cases)."""
    if len(checkpoints) == 1:
        return Postprocessing.from_json(checkpoints[0].get("postprocessing"))
    records = [checkpoint.get("postprocessing_validation") for checkpoint in checkpoints]
    if any(r is None for r in records):
        return Postprocessing()  # a member without validation records: nothing is known to help
    regions = Regions.of(checkpoints[0].config.data, checkpoints[0].labels)
    classes = [c for c in (regions.scored if regions else checkpoints[0].labels) if c != 0]
    return learn_postprocessing([CaseCandidates.from_json(case) for r in records for case in r], classes)[0]


class Predictor:
    """One trained segmenter, or an ensemble of them, plus everything needed to predict files on
    their native grid.

    Args:
        method: a :class:`~imgx3d.methods.base.Segmenter` (moved to the settings' device, eval
            mode), or a list of them trained on the same classes and data settings (an ensemble:
            class probabilities averaged).
        config: the run's complete config (data preprocessing, slice view, patch size); an
            ensemble's first member's.
        labels: class value → name.
        settings: how to run; default: the run's ``infer:`` config on the best device.
        postprocessing: the largest-component steps learned from validation (applied unless
            ``settings.postprocess`` is false).
    """

    def __init__(self, method: Method | list[Method], config: Config, labels: dict[int, str],
                 settings: InferSettings | None = None, postprocessing: Postprocessing = Postprocessing(),
                 previous_stage: PreviousStage | None = None):
        self.members = list(method) if isinstance(method, (list, tuple)) else [method]
        self.method = self.members[0]
        self.config, self.labels, self.postprocessing = config, labels, postprocessing
        self.settings = settings or InferSettings.from_config(config.infer)
        self.device = resolve_device(self.settings.device)
        self.previous_stage = previous_stage
        self.preprocessor = Preprocessor(config.data, previous_stage)
        self.codec = LabelCodec(labels, config.data)
        for member in self.members:
            member.to(self.device).eval()
            use_fast_cpu_kernels(member, self.device, training=False)
        use_fast_cuda_kernels(self.device)

    @classmethod
    def load(cls, source: str | Path | Checkpoint | list, settings: InferSettings | None = None,
             tracking_uri: str | None = None, **overrides) -> "Predictor":
        """A predictor from a checkpoint file, a run folder (its ``best.pt``) or an mlflow run id; from
        several of them (a list), or a cross-validation folder (``fold_*/best.pt``), an ensemble.

        Args:
            settings: how to run; default: the (first) run's ``infer:`` config with ``overrides``
                (e.g. ``device="cpu"``, ``overlap=0.5``, ``tta_flips=(0, 1, 2)``).
            tracking_uri: where an mlflow run id is looked up.

        Raises:
            CheckpointError: not a checkpoint, a run whose method does not segment, or runs that
                cannot be ensembled (one line).
        """
        return cls.from_checkpoints(load_checkpoints(source, tracking_uri), settings, **overrides)

    @classmethod
    def from_checkpoints(cls, checkpoints: list[Checkpoint], settings: InferSettings | None = None,
                         **overrides) -> "Predictor":
        """A predictor of one checkpoint, or an ensemble of several (see :meth:`load`)."""
        check_ensemble(checkpoints)
        methods = [method_from_checkpoint(checkpoint) for checkpoint in checkpoints]
        for method, checkpoint in zip(methods, checkpoints):
            if not isinstance(method, Segmenter):
                raise _not_a_segmenter(method, checkpoint.path)
            if method.spatial_dims != methods[0].spatial_dims:
                raise CheckpointError(f"{checkpoint.path}: cannot be ensembled with {checkpoints[0].path}: a "
                                      f"{method.spatial_dims}D method with a {methods[0].spatial_dims}D one; ensemble "
                                      "runs that see the volume alike (all per slice, or all 3D)")
        first = checkpoints[0]
        settings = settings or InferSettings.from_config(first.config.infer, **overrides)
        stage = first.previous_stage
        previous = PreviousStage.from_checkpoint(stage, settings.device) if stage is not None else None
        return cls(methods, first.config, first.labels, settings, ensemble_postprocessing(checkpoints), previous)

    @property
    def in_channels(self) -> int:
        """Image channels the method takes (a cascade's previous stage adds its own to them)."""
        return self.method.in_channels - (self.previous_stage.channels if self.previous_stage is not None else 0)

    def read(self, paths: list[Path]) -> ModelCase:
        """Read one case's channel files and bring them to model space (no model work: safe to run
        in a reader thread while another case is predicted)."""
        check_input_kind(paths[0], self.config.data)
        _, volume = self.preprocessor.read_image(paths, self.in_channels)
        return to_model(volume, self.config.data, self.codec, self.preprocessor.model_image)

    def from_volume(self, volume: Volume) -> ModelCase:
        """An in-memory image (checked as a file is) in model space: what :meth:`read` does for files."""
        _, volume = self.preprocessor.checked_image(volume, self.in_channels)
        return to_model(volume, self.config.data, self.codec, self.preprocessor.model_image)

    def predict_files(self, paths: list[Path], probabilities: bool = False) -> Prediction:
        """Predict one case from its channel files."""
        return self.predict_case(self.read(paths), probabilities)

    def predict(self, image: ModelCase | str | Path | ImageObject, probabilities: bool = False) -> Any:
        """The prediction of one image on its own grid, whatever holds it.

        Args:
            image: a file path (or DICOM folder); a nibabel image, a SimpleITK image or an
                ``(array, affine)`` pair (see :mod:`imgx3d.inference.images`); or a case read by
                :meth:`read` / :meth:`from_volume`.
            probabilities: also return the class probabilities.

        Returns:
            For an in-memory image without ``probabilities``, the label map as the same kind
            (nibabel → ``Nifti1Image``, SimpleITK → ``SimpleITK.Image``, pair → ``(labels, affine)``);
            otherwise a :class:`Prediction` (label and probability volumes).
        """
        if isinstance(image, ModelCase):
            return self.predict_case(image, probabilities)
        if isinstance(image, (str, Path)):
            return self.predict_files([Path(image)], probabilities)
        # an in-memory image (a kind it cannot read is a one-line InputError)
        prediction = self.predict_case(self.from_volume(to_volume(image)), probabilities)
        return prediction if probabilities else like(image, prediction.labels)

    def predict_case(self, case: ModelCase, probabilities: bool = False, uncertainty: bool = False) -> Prediction:
        """The native-grid prediction of a case read by :meth:`read` (with its class probabilities and
        its uncertainty maps when asked for: both need the whole-volume maps, so neither streams).

        The memory the prediction needs is estimated first: a volume whose whole-volume maps
        would not fit the free host memory goes through the streaming window when the method
        allows it, and is refused in one line when even that would not fit. On CUDA windows run
        on the GPU and the volume-sized outputs stay on the host; out of GPU memory all the same,
        it is tried once more with windows one at a time.

        Raises:
            ResourceError: the volume cannot be predicted within this machine's memory.
        """
        if uncertainty and regions_of(self.method) is not None:
            raise ConfigError(f"{case.source.path or 'the volume'}: uncertainty maps are entropies of class "
                              "probabilities; a region-based run (data.regions) predicts overlapping regions: "
                              "predict without --uncertainty")
        whole_maps = probabilities or uncertainty
        streaming = self._streams(case.image) and not whole_maps
        streaming = streaming or self._must_stream(case, whole_maps, streaming)
        return self._postprocessed(self._predict_with_retry(case, probabilities, streaming, uncertainty))

    def whole_maps_fit(self, case: ModelCase) -> bool:
        """Whether asking :meth:`predict_case` for probabilities or uncertainty leaves the prediction as it is:
        the case would not stream, and its whole-volume maps fit the free host memory."""
        if self._streams(case.image):
            return False
        try:
            return not self._must_stream(case, True, False)
        except ResourceError:
            return False

    def _postprocessed(self, prediction: Prediction) -> Prediction:
        """The learned postprocessing applied to the label map (when the settings ask for it)."""
        if not (self.settings.postprocess and self.postprocessing):
            return prediction
        labels = prediction.labels
        foreground = [c for c in self.labels if c != 0]
        kept = self.postprocessing.apply(labels.array, foreground, regions_of(self.method))
        return dataclasses.replace(prediction, labels=dataclasses.replace(labels, array=kept))

    def _predict_with_retry(self, case: ModelCase, probabilities: bool, streaming: bool,
                            uncertainty: bool = False) -> Prediction:
        """:meth:`_predict`, once more with windows one at a time when the GPU runs out of memory."""
        try:
            return self._predict(case, probabilities, streaming, self.settings, uncertainty)
        except torch.cuda.OutOfMemoryError:
            name = case.source.path or "the volume"
            print(f"imgx3d: warning: {name}: out of GPU memory; trying again with windows one at a time",
                  file=sys.stderr)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            try:
                one_at_a_time = dataclasses.replace(self.settings, sw_batch_size=1)
                return self._predict(case, probabilities, streaming, one_at_a_time, uncertainty)
            except torch.cuda.OutOfMemoryError:
                raise ResourceError(
                    f"{name}: out of GPU memory even with windows one at a time; lower "
                    f"infer.roi_size (now {list(self.settings.roi_size or self.config.data.patch_size)}), predict on "
                    "the CPU with --device cpu, or use a GPU with more memory") from None

    def model_space_classes(self, image: torch.Tensor) -> torch.Tensor:
        """Class indices (X', Y', Z') of a model-space image (C, X', Y', Z'), by the same windows,
        precision and memory rules as :meth:`predict` (streaming where it applies), without
        test-time augmentation: what validation during training scores."""
        settings = dataclasses.replace(self.settings, tta_flips=(), tta_shifts=1)
        with self._autocast(settings):
            if self._streams(image):
                return self._stream(image, settings).reshape(image.shape[1:])
            return self._classes_of(self._model_space_probabilities(image, settings))

    # -- internals ---------------------------------------------------------------------------
    def _predict(self, case: ModelCase, probabilities: bool, streaming: bool, settings: InferSettings,
                 uncertainty: bool = False) -> Prediction:
        """One attempt at :meth:`predict` with these window settings."""
        inverse, grid = case.inverse, case.inverse.grid
        spread = Spread() if uncertainty else None
        with self._autocast(settings):
            if streaming:
                return Prediction(inverse.labels(self._stream(case.image, settings), self.method.num_classes))
            probs = self._model_space_probabilities(case.image, settings, spread)
        native = inverse.probabilities(probs) if probabilities or grid.model_shape != grid.cropped_shape else None
        labels = inverse.labels_from_probabilities(probs, native, self._classes_of)
        maps = None
        if spread is not None:  # each map on its own: outside a crop it is 0, not a probability of 1
            native_maps = torch.cat([to_native(m[None].cpu(), grid) for m in spread.maps()])
            maps = inverse.probability_volume(native_maps)
        return Prediction(labels, inverse.probability_volume(native) if probabilities else None, maps,
                          spread.count if spread is not None else 1)

    def _must_stream(self, case: ModelCase, probabilities: bool, streaming: bool) -> bool:
        """True when the whole-volume maps would not fit the free host memory but the streaming
        window would; a one-line :class:`ResourceError` when neither would."""
        settings, grid = self.settings, case.inverse.grid
        roi = list(settings.roi_size or self.config.data.patch_size)

        def need(stream: bool) -> int:
            return estimate_host_memory(self.method.num_classes, case.image.shape[0], tuple(case.image.shape[1:]),
                                        grid.native_shape, roi, stream, probabilities, len(self.members))

        free = available_host_bytes()
        if free is None or need(streaming) <= free:
            return False
        can_stream = not streaming and not probabilities and settings.streaming != "off" and self._single_pass
        if can_stream and need(True) <= free:
            return True
        shape = "x".join(map(str, case.image.shape[1:]))
        fixes = ["train with a coarser data.spacing"]  # only what applies to this run and this call
        if probabilities:
            fixes.append("predict without --probabilities" + (" (the streaming window then applies)"
                                                              if self._single_pass and not streaming else ""))
        elif settings.streaming == "off" and self._single_pass:
            fixes.append("set infer.streaming: auto (a window at a time)")
        raise ResourceError(
            f"{case.source.path or 'the volume'}: predicting it needs about {gib(need(streaming))} of host memory "
            f"({self.method.num_classes} classes on a {shape} model grid) but {gib(free)} is free; "
            f"{', '.join(fixes)}, or lower infer.sw_batch_size and free memory")

    def _classes_of(self, probs: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
        """Class indices of averaged output maps ``(K, ...)``: their argmax, or with regions (``data.regions``)
        the regions' labels written in order (:meth:`~imgx3d.data.labels.Regions.decode`)."""
        regions = regions_of(self.method)
        return class_map(probs, keepdim) if regions is None else regions.decode(probs, keepdim)

    @property
    def _single_pass(self) -> bool:
        """3D methods whose prediction is one network pass per window: they can stream (region outputs
        are turned into labels from whole maps, so they do not)."""
        return all(m.spatial_dims == 3 and isinstance(m, WindowSegmenter) and regions_of(m) is None
                   for m in self.members)

    def _autocast(self, settings: InferSettings) -> torch.autocast:
        """The networks' precision at inference (``infer.precision``; fp32: autocast off)."""
        return autocast(self.device, self.precision(settings))

    def precision(self, settings: InferSettings | None = None) -> torch.dtype | None:
        """The autocast dtype the networks predict in (None: fp32). ``auto`` does not pick bf16 for a method whose
        labels it changes (``Method.bf16_labels``): fp16 on a GPU, fp32 on a CPU instead."""
        settings = settings or self.settings
        dtype = choose_precision(settings.precision, self.device)
        moved = sorted({m.name for m in self.members if not getattr(m, "bf16_labels", True)})
        if dtype == torch.bfloat16 and moved:
            if settings.precision == "auto":
                return torch.float16 if self.device.type == "cuda" else None
            warnings.warn(f"infer.precision bf16: {', '.join(moved)} labels a few % of its foreground boundary "
                          "differently from fp32 under bf16 (benchmarks/precision.py); infer.precision auto or fp32 "
                          "predicts the fp32 labels", stacklevel=2)
        return dtype

    def _model_space_probabilities(self, image: torch.Tensor, settings: InferSettings,
                                   spread: Spread | None = None) -> torch.Tensor:
        """Class probabilities (K, X', Y', Z') of a model-space image, in fp32 on the host.

        On CUDA the windows go to the GPU and the whole-volume output stays on the host
        (MONAI's ``sw_device`` / ``device``), so GPU memory holds windows, not volumes.
        """
        if self.device.type == "cuda":
            window = make_window(settings, self.config.data.patch_size, self.device, torch.device("cpu"))
        else:
            window = make_window(settings, self.config.data.patch_size)
            image = image.to(self.device)
        total = None
        with torch.inference_mode():
            for member in self.members:  # an ensemble: the sum of its members' maps (in place), then the mean
                probs = predict_probabilities(member, image, window, settings.tta_flips, self.config.data.slices,
                                              settings.tta_shifts, spread)
                total = probs.float() if total is None else total.add_(probs)
            return (total.div_(len(self.members)) if len(self.members) > 1 else total).cpu()

    def _streams(self, image: torch.Tensor) -> bool:
        """Whether this prediction goes through the memory-bounded sliding window."""
        if self.settings.streaming == "off" or not self._single_pass:
            return False
        full_gib = 4 * self.method.num_classes * image[0].numel() / 2**30
        return self.settings.streaming == "on" or full_gib > self.settings.streaming_above_gib

    def _stream(self, image: torch.Tensor, settings: InferSettings) -> torch.Tensor:
        """Model-space class indices of a single-pass method, window by window (flip TTA per window;
        shifts would need every window's neighbours moved too: not applied, with a warning)."""
        combos = flip_combinations(settings.tta_flips)
        if settings.tta_shifts > 1:
            warnings.warn(f"infer.tta_shifts ({settings.tta_shifts}) is not applied by the streaming window (a volume "
                          "above infer.streaming_above_gib, or infer.streaming: on); infer.streaming: off applies it "
                          "when the whole-volume maps fit in memory", stacklevel=2)

        def averaged(x: torch.Tensor) -> torch.Tensor:  # an ensemble's members, window by window
            return sum(m.window_probabilities(x).float() for m in self.members) / len(self.members)

        fn = averaged if len(self.members) > 1 else self.method.window_probabilities

        def mirrored(x: torch.Tensor) -> torch.Tensor:
            return (sum(fn(x.flip(d)).flip(d) if d else fn(x) for d in combos) / len(combos)).float()

        # On CPU, windows go one per call: batching them measured no faster (1.08x vs 1.12x of
        # MONAI's time on 512x512x300x14) and held 0.66 GiB more (benchmarks/sliding_window.py);
        # two such calls run at once (ConcurrentBatches).
        chunk = settings.sw_batch_size if self.device.type == "cuda" else 1
        with torch.inference_mode(), ConcurrentBatches(mirrored, chunk, window_streams(self.device)) as batches:
            return streaming_argmax(batches, image[None].to(self.device), settings.roi_size or self.config.data.patch_size,
                                    batches.batch_size, settings.overlap, settings.blend).cpu()
