"""Typed configuration: YAML files and ``key=value`` overrides → dataclasses.

Unknown keys, wrong types, choices outside a ``Literal[...]`` and out-of-range values are
:class:`ConfigError`\\ s naming the key. A file may start from another with ``extends:
other.yaml``: sections merge key by key; a ``method`` section naming another method replaces the
parent's whole. ``method:`` becomes the named method's own config dataclass (a :class:`MethodConfig`, see
:mod:`imgx3d.methods.base`), so a loaded config is complete: every default is written out when
a run saves it (``config.yaml``, the checkpoint, mlflow), and a run is rebuilt from what it
saved, not from the defaults of the day.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from imgx3d.errors import ConfigError
from imgx3d.files import atomic_write_text
from imgx3d.registry import method_class

Precision = Literal["auto", "fp32", "bf16", "fp16"]  # train.precision, infer.precision
Axis = Literal[0, 1, 2]  # a model-space (RAS) axis
DBT_CROP_AIR = 0.05  # the dbt preset's crop: air is below 5 % of a tomosynthesis volume's range


@dataclass
class SplitConfig:
    """How cases are divided into train / validation / test.

    Attributes:
        seed: seed of the shuffle; the same seed always gives the same split.
        test_fraction: held-out test share, cut first and never trained or validated on (0: no
            test set). The same seed and fraction give the same test cases with or without folds.
        val_fraction: share of the non-test cases used for validation (without folds).
        folds: if > 0, cross-validation as in nnU-Net: the non-test cases are cut into ``folds``
            parts, ``fold`` is the validation part and the others train (``val_fraction`` unused).
        fold: the validation fold (0 ... folds - 1).
        max_train: if > 0, train on only this many of the training cases (a seeded subset; the
            validation and test cases do not change): low-data experiments, learning curves.
    """

    seed: int = 0
    test_fraction: float = 0.2
    val_fraction: float = 0.1
    folds: int = 0
    fold: int = 0
    max_train: int = 0


@dataclass
class SliceConfig:
    """How 2D methods see volumes (the slice adapter, ``imgx3d.data.slices``).

    Attributes:
        axis: model-space (RAS) axis sliced along: 2 = axial, 1 = coronal, 0 = sagittal.
        size: in-plane size (H, W) of the slices the 2D method sees (SD VAEs: multiples of 8).
        keep_empty: fraction of slices without foreground kept for training (deterministic).
        percentiles: per-volume, per-channel intensity percentiles mapped to [-1, 1].
        predict_batch: slices per forward call at inference.
    """

    axis: Axis = 2
    size: list[int] = field(default_factory=lambda: [256, 256])
    keep_empty: float = 0.1
    percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])
    predict_batch: int = 16


# The data keys that say how a dataset is read (its files, classes and channels): a dataset's
# fingerprint depends on them, and a plan never decides them.
READING_KEYS = ("mode", "layout", "channels", "label_pattern", "image_dir", "label_dir", "labels", "mask_threshold",
                "label_map", "ignore_label", "regions", "region_labels", "color")
# The data keys that define a run's model space (preprocessing, grid, patch, slices): runs ensemble
# only when they agree, and an exported model records them.
MODEL_SPACE_KEYS = ("mode", "channels", "labels", "mask_threshold", "label_map", "regions", "region_labels", "color",
                    "preset", "crop_air", "crop_margin", "ct_window", "mri_norm", "mri_nonzero", "mri_percentiles",
                    "spacing", "patch_size", "slices")


@dataclass
class DataConfig:
    """Dataset layout, preprocessing and training crops.

    Attributes:
        mode: ``volume`` (3D files) or ``image`` (2D PNG/JPG/TIF/GIF/BMP files, each read as a
            one-slice volume; needs a 2D method). Set by ``imgx3d train --volume / --image``.
        layout: ``auto``, ``msd``, ``nnunet``, ``btcv``, ``cases`` (folder per case) or ``pairs``.
        channels: for ``cases``: glob patterns of the image channel files inside each case folder.
        label_pattern: for ``cases``: glob pattern of the label file inside each case folder.
        image_dir, label_dir: for ``pairs``: the image and label folder names under the dataset
            folder (found among common names such as ``images``/``labels``/``masks`` when empty).
        labels: label value → name; taken from dataset.json when empty.
        mask_threshold: binarise label files as ``value > mask_threshold`` (8-bit 0/255 or JPEG
            masks); null keeps the values.
        label_map: file value → class value, applied after ``mask_threshold`` (e.g. ``{0: 1, 255: 0}``
            makes black membranes class 1); predictions are written back in the file's values.
        ignore_label: the label value of voxels that are not annotated (nnU-Net v2's ``ignore``: the highest
            value; taken from a label named ``ignore`` in dataset.json / ``data.labels`` when null). They add
            nothing to the loss or to any metric, so sparse annotation (some slices, scribbles) trains;
            the ``unet`` method only.
        regions: region-based training (nnU-Net's regions, the BraTS convention): region name → the
            label values it unites, e.g. ``{whole tumour: [1, 2, 3, 4], tumour core: [1, 3, 4], enhancing: [4]}``.
            The network has one sigmoid output per region (Dice + binary cross-entropy each); Dice
            is scored per region; a prediction is turned back into labels region by region in this
            order, each later region written over the earlier ones. Taken from a ``dataset.json`` whose
            labels are lists (nnU-Net v2) when empty; the 3D ``unet`` method only.
        region_labels: the label value each region writes when a prediction is turned back into
            labels (nnU-Net's ``regions_class_order``), in the order of ``regions``; empty: each
            region's smallest value that no later region holds.
        cascade: the run folder (or checkpoint) of a low-resolution stage (nnU-Net's ``3d_lowres`` →
            ``3d_cascade_fullres``): its prediction of each case, on this run's model grid, is one more
            input channel per foreground label (after intensity normalisation, which never sees it).
            Its split must hold none of this run's validation or test cases among its training cases;
            the stage (any segmenting run) is stored in this run's checkpoints, so prediction needs only
            this run. A 3D method only (tested with ``unet`` and ``imgx``). Empty: no cascade.
        color: 2D images: ``grey`` (RGB converted to luminance), ``rgb`` (3 channels) or ``green``.
        preset: intensity preset: ``ct``, ``mri``, ``dbt`` or ``none``. ``dbt`` (tomosynthesis):
            percentiles ``mri_percentiles`` of the breast (the voxels above ``crop_air``)
            scaled to [0, 1], and the air cropped away unless ``crop_air`` is set otherwise.
        crop_air: crop each volume to the bounding box of voxels above this fraction of its
            intensity range (plus ``crop_margin`` voxels); predictions are padded back with
            background. null: no crop (``dbt``: 0.05).
        ct_window: HU window mapped to [0, 1] by the CT preset.
        mri_norm: ``zscore`` (per case, per channel, on non-zero voxels if ``mri_nonzero``)
            or ``percentile`` (clip to ``mri_percentiles`` then scale to [0, 1]).
        spacing: target voxel spacing in mm (after reorientation to RAS); null keeps native.
        patch_size: training patch, also the sliding-window size unless ``infer.roi_size``.
        batch_size: patches per training step.
        pos_fraction: share of patches centred on foreground (the rest anywhere).
        flip_axes: spatial axes for random flips (RAS order).
        translate: each training patch shifted by a random whole number of voxels, uniform in
            [−translate, translate] per axis (zero fill), after it is cut: a case smaller than the
            patch is otherwise always centred in it, at one phase of the network's pooling grid.
            0: off; never along an axis of one voxel (a 2D image's).
        affine_prob: probability of a random rotation (±``rotate_deg`` per axis) and
            scaling (±``scale_range``), applied to the patch (nnU-Net-style spatial augmentation).
        intensity_aug: random intensity augmentation, the set ``intensity_scheme`` names.
        intensity_scheme: ``light`` (mild scale, shift, noise and gamma: this toolkit's set for
            minute-long budgets) or ``nnunet`` (nnU-Net v2's default set: noise, blur, brightness,
            contrast, simulated low resolution, gamma and inverted gamma, at nnU-Net's probabilities).
        num_workers: data-loader worker processes.
        cache_gib: host memory (GiB) for the preprocessed training cases of 3D methods (image
            float32, label uint8, crop indices int32: about 4·C + 5 bytes a voxel); the cases beyond
            it are read and preprocessed again each time they are drawn — slower, but a dataset
            larger than the machine's memory trains (a cascade's first stage predicts them once: its
            channels stay in memory, a byte a voxel and label). null: every training case stays in memory.
        slices: the slice adapter of 2D methods (ignored by 3D methods).
        extra: dataset folders of generated pairs (``imgx3d synth``) added to the training cases
            only; validation and test stay real.
        extra_fraction: share of training samples drawn from ``extra``; null: in proportion to
            their number.
    """

    mode: Literal["volume", "image"] = "volume"
    layout: Literal["auto", "msd", "nnunet", "btcv", "cases", "pairs"] = "auto"
    channels: list[str] = field(default_factory=list)
    label_pattern: str = ""
    image_dir: str = ""
    label_dir: str = ""
    labels: dict[int, str] = field(default_factory=dict)
    mask_threshold: float | None = None
    label_map: dict[int, int] = field(default_factory=dict)
    ignore_label: int | None = None
    regions: dict[str, list[int]] = field(default_factory=dict)
    region_labels: list[int] = field(default_factory=list)
    cascade: str = ""
    color: Literal["grey", "rgb", "green"] = "grey"
    preset: Literal["ct", "mri", "dbt", "none"] = "mri"
    crop_air: float | None = None
    crop_margin: int = 4
    ct_window: list[float] = field(default_factory=lambda: [-175.0, 250.0])
    mri_norm: Literal["zscore", "percentile"] = "zscore"
    mri_nonzero: bool = False
    mri_percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])
    spacing: list[float] | None = None
    patch_size: list[int] = field(default_factory=lambda: [64, 64, 64])
    batch_size: int = 2
    pos_fraction: float = 0.67
    flip_axes: list[Axis] = field(default_factory=lambda: [0, 1, 2])
    translate: int = 0
    affine_prob: float = 0.0
    rotate_deg: float = 15.0
    scale_range: float = 0.15
    intensity_aug: bool = True
    intensity_scheme: Literal["light", "nnunet"] = "light"
    num_workers: int = 0
    cache_gib: float | None = None
    split: SplitConfig = field(default_factory=SplitConfig)
    slices: SliceConfig = field(default_factory=SliceConfig)
    extra: list[str] = field(default_factory=list)
    extra_fraction: float | None = None

    @property
    def air_crop(self) -> float | None:
        """The crop threshold in effect: ``crop_air``, or the dbt preset's default."""
        return self.crop_air if self.crop_air is not None or self.preset != "dbt" else DBT_CROP_AIR


@dataclass
class TrainConfig:
    """Optimisation and the training budget.

    Attributes:
        max_steps: stop after this many optimiser steps.
        max_minutes: stop when the (accumulated, across resumes) time exceeds this; 0 = no limit.
        budget_clock: what ``max_minutes`` counts: ``wall`` (elapsed time) or ``cpu`` (this
            process's CPU time, ``time.process_time``: a budget that stays fair when runs share a
            machine; data-loader workers are other processes, so pair it with ``num_workers: 0``).
        optimizer: ``adamw`` or ``sgd`` (Nesterov, momentum 0.99 as nnU-Net).
        betas: AdamW's (beta1, beta2); GANs (DARL) use (0.5, 0.999).
        lr, weight_decay: optimiser settings.
        scheduler: ``cosine`` (linear warmup then cosine to ``min_lr``), ``poly``, ``constant``, or
            ``plateau`` (PyTorch's ``ReduceLROnPlateau`` on the validation Dice: the LR is multiplied by
            ``plateau_factor`` after more than ``plateau_patience`` validations without improvement;
            PIG's schedule, factor 1/4 and patience 4).
        plateau_factor, plateau_patience: the ``plateau`` schedule's settings.
        warmup_steps, min_lr: schedule settings.
        schedule_over: ``steps`` (anneal over ``max_steps``; bit-reproducible) or ``budget``
            (anneal over whichever ends first, steps or ``max_minutes``: a budgeted run always
            finishes its schedule, whatever the machine's speed).
        grad_clip: max gradient norm per parameter group; 0 = off.
        ema: decay of an exponential moving average of the weights (0: off; the LDM / Stable
            Diffusion family, SDSeg included, uses 0.9999). When on, validation, ``best.pt`` (and
            so ``predict`` and ``synth``) use the averaged weights; ``last.pt`` keeps both, and a
            resume continues the average exactly.
        ema_start: the step from which the average is kept (it starts as a copy of the weights).
        precision: ``auto`` (bf16 on GPUs with bf16 tensor cores, compute capability 8.0 and up;
            fp16 with a gradient scaler below that; on the CPU bf16 where it has bf16 instructions,
            AVX512-BF16 or AMX, fp32 elsewhere), ``fp32``, ``bf16`` or ``fp16``.
            The diffusion arithmetic (``q_sample``, posteriors) stays fp32 whatever the setting.
        amp: the setting ``precision`` replaced, kept so that older configs load: ``off`` means
            ``precision: fp32``, ``on`` means ``precision: auto``; ``auto`` defers to ``precision``.
        val_every: validate on whole volumes every N steps.
        val_cases: at most this many validation volumes per validation (0 = all).
        patience: early stopping after N validations without improvement; 0 = off.
        checkpoint_every: write ``last.pt`` every N steps (also at every validation).
        log_every: when the output is not a terminal, a progress line every N steps; 0 (default): one
            every ~30 s (on a terminal a progress bar shows instead).
        test_uncertainty: score the test split's uncertainty beside its Dice (calibration error, error AUC,
            Spearman correlation with Dice; :mod:`imgx3d.evaluation.uncertainty`), logged for ``imgx3d
            compare``; cases that stream or whose whole-volume maps would not fit are left out.
        device: ``auto``, ``cpu`` or ``cuda[:i]``.
    """

    max_steps: int = 1000
    max_minutes: float = 0.0
    budget_clock: Literal["wall", "cpu"] = "wall"
    optimizer: Literal["adamw", "sgd"] = "adamw"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    lr: float = 1e-3
    weight_decay: float = 1e-5
    scheduler: Literal["cosine", "poly", "constant", "plateau"] = "cosine"
    plateau_factor: float = 0.25
    plateau_patience: int = 4
    schedule_over: Literal["steps", "budget"] = "steps"
    warmup_steps: int = 0
    min_lr: float = 1e-6
    grad_clip: float = 1.0
    ema: float = 0.0
    ema_start: int = 0
    precision: Precision = "auto"
    amp: Literal["auto", "on", "off"] = "auto"
    val_every: int = 200
    val_cases: int = 0
    patience: int = 0
    checkpoint_every: int = 200
    log_every: int = 0
    test_uncertainty: bool = True
    device: str = "auto"

    def precision_setting(self) -> str:
        """``precision``, or ``fp32`` where the older ``amp: off`` says so."""
        return "fp32" if self.amp == "off" else self.precision


@dataclass
class InferConfig:
    """Whole-volume inference.

    Attributes:
        roi_size: sliding-window size; empty = ``data.patch_size``.
        overlap: window overlap fraction (nnU-Net: 0.5).
        sw_batch_size: windows per forward pass.
        blend: ``gaussian`` or ``constant`` weighting of overlapping windows.
        tta_flips: spatial axes mirrored for test-time augmentation (all combinations).
        tta_shifts: phase shifts for test-time augmentation of 3D methods: the volume is also predicted
            shifted by 1 … N − 1 voxels along every axis (each mirroring at each shift), and the maps
            are moved back and averaged; 1: none. Not applied by the streaming window.
        streaming: label maps of single-pass 3D methods without whole-volume probability maps
            (``imgx3d.inference.windows``): ``on``, ``off``, or ``auto`` (when those maps would
            exceed ``streaming_above_gib``). With TTA, streaming mirrors each window, not the volume.
        streaming_above_gib: the ``auto`` threshold in GiB of float32 probabilities.
        precision: the networks' autocast precision at inference, as ``train.precision``
            (``auto``: bf16 / fp16 on CUDA by compute capability; on the CPU bf16 where it has bf16
            instructions, fp32 elsewhere); probabilities
            are blended and returned in fp32.
        postprocess: learn at the end of training, from the validation cases, which
            largest-connected-component steps raise Dice (nnU-Net's rule,
            :mod:`imgx3d.inference.postprocess`), and apply them at prediction; false: neither.
    """

    roi_size: list[int] = field(default_factory=list)
    overlap: float = 0.5
    sw_batch_size: int = 4
    blend: Literal["gaussian", "constant"] = "gaussian"
    tta_flips: list[Axis] = field(default_factory=list)
    tta_shifts: int = 1
    streaming: Literal["auto", "on", "off"] = "auto"
    streaming_above_gib: float = 1.0
    precision: Precision = "auto"
    postprocess: bool = True


@dataclass
class TrackingConfig:
    """mlflow settings.

    Attributes:
        uri: tracking URI (default ``sqlite:///mlflow.db`` in the working directory).
        experiment: experiment name (default: the dataset's).
        enabled: log the run at all.
        log_model: log a segmenter's run as an mlflow model (pyfunc) in its ``model`` artifact.
        register: also register that model under this name in the model registry ("": do not).
        system_metrics: record CPU, memory, disk (and GPU, with ``nvidia-ml-py``) use as mlflow
            ``system/...`` metrics while a run trains.
        system_metrics_seconds: the interval between their samples.
    """

    uri: str = "sqlite:///mlflow.db"
    experiment: str = ""
    enabled: bool = True
    log_model: bool = True
    register: str = ""
    system_metrics: bool = True
    system_metrics_seconds: float = 15.0


@dataclass
class ScheduleConfig:
    """A diffusion method's noise chain (``method.schedule``; as a diffusers scheduler owns its own config):
    ``beta_schedule`` over ``base_steps`` steps from ``beta_start`` to ``beta_end``; the method resamples it
    to its training and sampling step counts (:func:`imgx3d.diffusion.schedule.schedule_of`).

    Attributes:
        beta_schedule: ``linear``, ``scaled_linear`` (linear in sqrt(beta): Stable Diffusion, LDM) or ``cosine``.
        base_steps: T, the length of the base chain.
        beta_start, beta_end: the first and last beta.
    """

    beta_schedule: Literal["linear", "scaled_linear", "cosine"] = "linear"
    base_steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02


def schedule_field(beta_schedule: str, base_steps: int, beta_start: float, beta_end: float) -> Any:
    """A method config's ``schedule`` field with that method's published chain as its default."""
    return field(default_factory=lambda: ScheduleConfig(beta_schedule, base_steps, beta_start, beta_end))


@dataclass
class MethodConfig:
    """Base of every method's config dataclass: ``name`` picks the method (default ``unet``); the
    subclass (``Config`` of the method's class) adds its hyperparameters."""

    name: str = "unet"

    def complete(self, train: TrainConfig) -> None:
        """Fill the keys whose default follows from the training schedule (a method that has such
        keys overrides this; they are written to the run's ``config.yaml`` resolved)."""


def method_config(values: dict[str, Any] | None, key: str = "method") -> MethodConfig:
    """The ``method:`` section as the named method's complete config dataclass."""
    values = dict(values or {})
    cls = method_class(values.setdefault("name", MethodConfig.name)).Config
    flat = [k for k in ScheduleConfig.__dataclass_fields__ if k in values]
    if flat and "schedule" in cls.__dataclass_fields__:  # configs and checkpoints before the nested schedule
        values["schedule"] = {**(values.get("schedule") or {}), **{k: values.pop(k) for k in flat}}
    return from_dict(cls, values, prefix=key)


@dataclass
class Config:
    """The whole run configuration; ``method`` is the chosen method's own config dataclass."""

    dataset: str = "dataset"
    seed: int = 0
    method: MethodConfig = field(default_factory=lambda: method_config(None))
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (converting int→float, str keys→int).

    Raises:
        ConfigError: naming ``key`` when the value does not fit.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Literal:
        if isinstance(value, bool) and {"on", "off"} <= set(args):  # YAML 1.1 reads `on` / `off` as booleans
            value = "on" if value else "off"
        if value in args and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be one of {', '.join(map(str, args))}, got {value!r}")
    if tp is MethodConfig:
        return method_config(value if isinstance(value, dict) else _not_a_mapping(key, value), key)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, args, key)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return {coerce(k, args[0], f"{key} key"): coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    return _coerce_scalar(value, tp, key)


def _coerce_union(value: Any, args: tuple[Any, ...], key: str) -> Any:
    """The first member of ``Optional[...]`` / ``A | B`` that ``value`` fits (the first member's error if none)."""
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return coerce(value, arg, key)
        except ConfigError as err:
            errors.append(err)
    raise errors[0]


def _coerce_scalar(value: Any, tp: type, key: str) -> Any:
    """``bool``, ``float``, ``int``, ``str`` or any other class, with YAML 1.1's readings of numbers
    and ``on`` / ``off``."""
    if tp is float and isinstance(value, str):  # PyYAML (YAML 1.1) reads "1e-3" as a string
        try:
            return float(value)
        except ValueError:
            pass
    elif tp is int and isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    elif tp is str and isinstance(value, bool):  # YAML 1.1 reads the documented `on` / `off` as booleans
        return "on" if value else "off"
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if (tp is bool and isinstance(value, bool)) or (tp is str and isinstance(value, str)):
        return value
    if tp is float and number:
        return float(value)
    if tp is int and number and isinstance(value, int):
        return value
    if tp not in (bool, float, int, str) and isinstance(value, tp):
        return value
    raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")


def _not_a_mapping(key: str, value: Any) -> dict[str, Any]:
    raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")


def from_dict(cls: type, values: dict[str, Any] | None, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and wrong types."""
    values = values or {}
    if not isinstance(values, dict):
        raise ConfigError(f"config key '{prefix or '<root>'}' must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = f"'{prefix}.{unknown[0]}'" if prefix else f"'{unknown[0]}'"
        raise ConfigError(
            f"unknown config key {where}; valid keys here: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for field_ in dataclasses.fields(cls):
        if field_.name not in values:
            continue
        value = values[field_.name]
        if isinstance(value, dict) and field_.default_factory is not dataclasses.MISSING \
                and hints[field_.name] is not MethodConfig:  # the method's own defaults come with its name
            default = field_.default_factory()
            if dataclasses.is_dataclass(default):
                value = {**dataclasses.asdict(default), **value}  # a partial section keeps this field's defaults
        kwargs[field_.name] = coerce(value, hints[field_.name], f"{prefix}.{field_.name}" if prefix else field_.name)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain-dict copy of a config dataclass (YAML-serialisable)."""
    return copy.deepcopy(dataclasses.asdict(cfg))


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``tree['a']['b'] = value`` for ``dotted = 'a.b'``, creating levels."""
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
    node[leaf] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Parse ``key=value`` strings; values are YAML (``3``, ``1e-3``, ``[1,2]``, ``null``)."""
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. train.max_steps=100)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override '{item}': value is not valid YAML ({err.problem})") from None
        parsed.append((key.strip(), value))
    return parsed


def infer_overrides(overrides: list[str]) -> dict[str, Any]:
    """``infer.key=value`` strings (``imgx3d predict``'s) as checked values of :class:`InferConfig`'s
    fields, by field name; any other key is a one-line error naming the ones it takes."""
    hints = typing.get_type_hints(InferConfig)
    values = {}
    for key, value in parse_overrides(overrides):
        name = key.removeprefix("infer.")
        if not key.startswith("infer.") or name not in hints:
            raise ConfigError(f"override '{key}': predict takes infer.* keys only ({', '.join(sorted(hints))})")
        values[name] = coerce(value, hints[name], key)
    return values


def infer_with(infer: InferConfig, changes: dict[str, Any]) -> InferConfig:
    """``infer`` with ``changes`` (field name → value), each checked as its config key ``infer.<name>``."""
    hints = typing.get_type_hints(InferConfig)
    unknown = sorted(set(changes) - set(hints))
    if unknown:
        raise ConfigError(f"unknown inference setting '{unknown[0]}'; settings: {', '.join(sorted(hints))}")
    changed = dataclasses.replace(infer, **{k: coerce(list(v) if isinstance(v, tuple) else v, hints[k], f"infer.{k}")
                                           for k, v in changes.items()})
    validate_infer(changed)
    return changed


def merge_sections(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``child`` into ``base``; a ``method`` section naming another method replaces the base's
    whole (keys differ per method), one naming the same method (or none) merges key by key."""
    out = copy.deepcopy(base)
    for key, value in child.items():
        other_method = key == "method" and isinstance(value, dict) and isinstance(out.get(key), dict) and \
            value.get("name", out[key].get("name")) != out[key].get("name")
        if isinstance(value, dict) and isinstance(out.get(key), dict) and not other_method:
            out[key] = merge_sections(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_yaml(path: str | Path, _seen: tuple[Path, ...] = (), *, above_plans: bool = False) -> dict[str, Any]:
    """Read a YAML config, resolving ``extends: other.yaml`` (relative to the file) first.

    A file written by ``imgx3d plan`` (its ``planned:`` key says where it came from) is a plan; with
    ``above_plans`` the plans in the chain contribute nothing, so what is left is what the files
    extending them change: a shipped config's overrides, to apply over a fresh plan.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; pass an existing YAML file with --config")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: 'extends' loops back to itself; fix the chain of extends")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:  # PyYAML's own message spans several lines: keep the place and the problem
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where} ({getattr(err, 'problem', None) or type(err).__name__}); "
                          "fix the syntax") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (data:, train:, ...)")
    parent = tree.pop("extends", None)
    if tree.pop("planned", None) is not None and above_plans:
        tree = {}
    if parent:
        tree = merge_sections(load_yaml(path.parent / parent, (*_seen, path.resolve()), above_plans=above_plans), tree)
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> Config:
    """Load a :class:`Config` from YAML (or ``base``) plus dotted overrides, validating it."""
    tree = copy.deepcopy(base) if base is not None else (load_yaml(path) if path else {})
    for key, value in parse_overrides(overrides or []):
        set_dotted(tree, key, value)
    cfg = from_dict(Config, tree)
    cfg.method.complete(cfg.train)
    validate(cfg)
    return cfg


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}' {message}")


def validate(cfg: Config) -> None:
    """Range checks that types alone cannot express."""
    d, t, i = cfg.data, cfg.train, cfg.infer
    _check(d.mode == "volume" or d.slices.axis == 2, "data.slices.axis", "must be 2 for 2D images (--image)")
    _check(len(set(d.label_map.values())) == len(d.label_map) and all(v >= 0 for v in d.label_map.values()),
           "data.label_map", "must map file values to distinct class values >= 0")
    _check(all(d.regions.values()), "data.regions", "must give each region at least one label value")
    _check(not d.region_labels or len(d.region_labels) == len(d.regions), "data.region_labels",
           "must give one label value per region of data.regions, in their order")
    _check(not d.regions or d.ignore_label is None, "data.regions",
           "cannot be combined with data.ignore_label yet; train on the labels or on the regions of fully labelled cases")
    _check(d.crop_air is None or 0.0 <= d.crop_air < 1.0, "data.crop_air", "must be null or in [0, 1)")
    _check(d.crop_margin >= 0, "data.crop_margin", "must be >= 0")
    _check(len(d.ct_window) == 2 and d.ct_window[0] < d.ct_window[1], "data.ct_window", "must be [low, high] with low < high")
    _check(len(d.patch_size) == 3 and all(p > 0 for p in d.patch_size), "data.patch_size", "must be 3 positive integers")
    sl = d.slices
    _check(len(sl.size) == 2 and all(v > 0 for v in sl.size), "data.slices.size", "must be 2 positive integers [H, W]")
    _check(0.0 <= sl.keep_empty <= 1.0, "data.slices.keep_empty", "must be in [0, 1]")
    _check(len(sl.percentiles) == 2 and 0 <= sl.percentiles[0] < sl.percentiles[1] <= 100, "data.slices.percentiles",
           "must be [low, high] with 0 <= low < high <= 100")
    _check(sl.predict_batch > 0, "data.slices.predict_batch", "must be > 0")
    _check(d.spacing is None or (len(d.spacing) == 3 and all(s > 0 for s in d.spacing)), "data.spacing",
           "must be null or 3 positive numbers (mm)")
    _check(d.batch_size >= 1, "data.batch_size", "must be >= 1")
    _check(d.extra_fraction is None or 0.0 <= d.extra_fraction <= 1.0, "data.extra_fraction",
           "must be null or in [0, 1]")
    _check(0.0 <= d.pos_fraction <= 1.0, "data.pos_fraction", "must be in [0, 1]")
    _check(0.0 <= d.affine_prob <= 1.0, "data.affine_prob", "must be in [0, 1]")
    _check(d.translate >= 0, "data.translate", "must be >= 0 (voxels; 0: no random translation)")
    _check(0.0 <= d.scale_range < 1.0, "data.scale_range", "must be in [0, 1)")
    _check(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    _check(d.cache_gib is None or d.cache_gib >= 0, "data.cache_gib", "must be null or >= 0")
    s = d.split
    _check(0.0 <= s.test_fraction < 1.0, "data.split.test_fraction", "must be in [0, 1)")
    _check(0.0 <= s.val_fraction < 1.0, "data.split.val_fraction", "must be in [0, 1)")
    _check(s.folds == 0 or (s.folds >= 2 and 0 <= s.fold < s.folds), "data.split.folds",
           "must be 0 (holdout) or >= 2 with 0 <= fold < folds")
    _check(s.max_train >= 0, "data.split.max_train", "must be >= 0 (0: every training case)")
    _check(t.max_steps >= 1, "train.max_steps", "must be >= 1")
    _check(t.max_minutes >= 0, "train.max_minutes", "must be >= 0")
    _check(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas", "must be two numbers in [0, 1)")
    _check(t.lr > 0, "train.lr", "must be > 0")
    _check(0.0 < t.plateau_factor < 1.0, "train.plateau_factor", "must be in (0, 1)")
    _check(t.plateau_patience >= 0, "train.plateau_patience", "must be >= 0")
    _check(t.val_every >= 1, "train.val_every", "must be >= 1")
    _check(t.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1")
    _check(t.patience >= 0, "train.patience", "must be >= 0")
    _check(0.0 <= t.ema < 1.0, "train.ema", "must be in [0, 1) (0: no weight averaging; e.g. 0.9999)")
    _check(t.ema_start >= 0, "train.ema_start", "must be >= 0")
    _check(t.log_every >= 0, "train.log_every", "must be >= 0 (0: a line every ~30 s)")
    _check(cfg.tracking.system_metrics_seconds > 0, "tracking.system_metrics_seconds", "must be > 0")
    validate_infer(i)


def validate_infer(i: InferConfig) -> None:
    """Range checks of the ``infer:`` section (also of a predictor's overridden settings)."""
    _check(0.0 <= i.overlap < 1.0, "infer.overlap", "must be in [0, 1)")
    _check(i.sw_batch_size >= 1, "infer.sw_batch_size", "must be >= 1")
    _check(not i.roi_size or len(i.roi_size) == 3, "infer.roi_size", "must be empty or 3 integers")
    _check(i.tta_shifts >= 1, "infer.tta_shifts", "must be >= 1 (1: no shifted predictions)")


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
