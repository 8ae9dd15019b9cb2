"""The seams between the workflow stages and a method: ``Method`` and its ``TrainingPlan`` for
training, the roles a trained run may have (``Segmenter``, ``Generator``, ``Codec``, ...). Methods
register by name in :mod:`imgx3d.registry`.

A method is an ``nn.Module`` that owns its networks and losses. The trainer, the predictor,
synthesis and tracking use only these interfaces, so adding a method touches no other file but
its own module and its configs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal, Protocol, runtime_checkable

import torch
from torch import nn

from imgx3d.checkpoint import Checkpoint
from imgx3d.config import MethodConfig, SliceConfig, method_config
from imgx3d.data.labels import Regions
from imgx3d.errors import CheckpointError, ConfigError
from imgx3d.registry import method_class

# window(fn, x): run fn over windows of x and blend the outputs (3D: sliding windows of a
# (B, C, X, Y, Z) volume; 2D: each batch of slices is one window). Built by imgx3d.inference.windows.
Window = Callable[[Callable[[torch.Tensor], torch.Tensor], torch.Tensor], torch.Tensor]

CODEC_GROUP = "codec"  # the parameter group of a latent codec trained in the first stage


@dataclass(frozen=True)
class Stage:
    """A stretch of training in which one parameter group learns.

    Attributes:
        group: the parameter group trained (``loss/<group>``); ``""``: every group the method returns losses for.
        steps: how many steps it lasts; None: to the end of training.
        lr_scale: multiplier of ``train.lr`` for its group.
    """

    group: str = ""
    steps: int | None = None
    lr_scale: float = 1.0


@dataclass(frozen=True)
class TrainingPlan:
    """What the trainer needs to know about a method, declared once instead of flags.

    Attributes:
        stages: consecutive stages (one by default: every group, every step).
        keep: ``best`` (``best.pt`` = the best validation ``val/dice_mean``) or ``latest`` (generators:
            the latest validated weights; their validation score is a diagnostic, not a selector).
        uses_labels: False (self-supervised): training never reads label files.
        idle_parameters: True when some trainable weights sit out a step within a stage (a dropped
            condition, a late loss term): DDP must search for unused parameters.
    """

    stages: tuple[Stage, ...] = (Stage(),)
    keep: Literal["best", "latest"] = "best"
    uses_labels: bool = True
    idle_parameters: bool = False

    def stage_at(self, step: int) -> tuple[Stage, int]:
        """The stage training step ``step`` falls in, and the step counted from that stage's start."""
        start = 0
        for stage in self.stages[:-1]:
            if step < start + (stage.steps or 0):
                return stage, step - start
            start += stage.steps or 0
        return self.stages[-1], step - start  # the last stage runs on

    def stage_index(self, step: int) -> int:
        """The index in ``stages`` of the stage training step ``step`` falls in."""
        end = 0
        for index, stage in enumerate(self.stages[:-1]):
            end += stage.steps or 0
            if step < end:
                return index
        return len(self.stages) - 1

    def lr_scale(self, group: str) -> float:
        """The LR multiplier of ``group`` (the stage that trains it; 1 otherwise)."""
        return next((stage.lr_scale for stage in self.stages if stage.group == group), 1.0)

    @property
    def find_unused_parameters(self) -> bool:
        """Whether DDP must look for weights that took no part in a step (staged or sparse training)."""
        return self.idle_parameters or len(self.stages) > 1


def codec_first(train_codec: bool, codec_steps: int, lr_scale: float, *stages: Stage) -> tuple[Stage, ...]:
    """The shared "train the codec first, then freeze it" stage in front of a method's own stages
    (nothing in front when the codec comes pretrained)."""
    return ((Stage(CODEC_GROUP, codec_steps, lr_scale),) if train_codec else ()) + stages


class Method(nn.Module):
    """What the trainer needs of a method, and nothing else.

    Subclasses set ``name``, ``spatial_dims`` and ``Config`` (their :class:`MethodConfig`
    dataclass, the ``method:`` section of a config file), declare a :class:`TrainingPlan` (a
    class attribute, or ``self.plan`` when it depends on the config) and implement
    ``training_step``. What a trained run can do is a role it implements: :class:`Segmenter`,
    :class:`Generator`, :class:`Codec` (and :class:`WindowSegmenter`, :class:`SelfValidating`,
    :class:`FeatureExtractor`); the stages check roles with ``isinstance``, never names or flags.
    """

    name: ClassVar[str]
    spatial_dims: int  # 3: volumetric; 2: runs per slice (a method may set it per instance, e.g. unet)
    Config: ClassVar[type[MethodConfig]]
    plan: TrainingPlan = TrainingPlan()
    # whether training leaves voxels labelled IGNORE_INDEX (data.ignore_label: not annotated) out of the loss;
    # the workflow refuses a dataset with an ignore label for a method that does not
    partial_labels: bool = False
    # whether bf16 autocast predicts the labels fp32 does (benchmarks/precision.py); False: ``infer.precision: auto``
    # predicts in fp16 on a GPU and fp32 on a CPU instead of bf16 (an explicit ``bf16`` is still obeyed)
    bf16_labels: bool = True
    # region-based training (data.regions): one sigmoid output per region; set by build_method through use_regions
    regions: Regions | None = None

    def __init__(self, cfg: Any, num_classes: int, in_channels: int):
        super().__init__()
        self.cfg, self.num_classes, self.in_channels = cfg, num_classes, in_channels

    def use_regions(self, regions: Regions) -> None:
        """Train and predict ``regions`` (one sigmoid output each, ``num_classes`` of them) instead of classes.

        Raises:
            ConfigError: the method trains on labels only (every method but the 3D ``unet``).
        """
        raise ConfigError(f"data.regions: method '{self.name}' trains on label maps only; region-based training "
                          "needs the 3D unet method (method.name: unet)")

    def size_multiple(self) -> int:
        """What the sides of a window (or slice) must be a multiple of for the method's networks: their
        downsampling, times a latent codec's (the planner sizes slices and patches by it)."""
        return 1

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters per optimiser; ``training_step`` returns ``loss/<group>`` for each group it trains."""
        return {"model": [p for p in self.parameters() if p.requires_grad]}

    def training_step(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        """Losses (``loss/<group>``) and other scalars for one batch of patches (or slices)."""
        raise NotImplementedError(f"{type(self).__name__} must define training_step")

    def codec_group(self, codec: nn.Module) -> dict[str, list[nn.Parameter]]:
        """``{"codec": its parameters}`` when the plan trains the codec first, else nothing (it is frozen)."""
        trains = any(stage.group == CODEC_GROUP for stage in self.plan.stages)
        return {CODEC_GROUP: list(codec.parameters())} if trains else {}

    def codec_stage(self, codec: Any, step: int, codec_input: Callable[[], torch.Tensor],
                    kl_weight: float) -> dict[str, torch.Tensor] | None:
        """The shared codec-first stage (see :func:`codec_first`): while the plan is in it, the codec's
        own loss on ``codec_input()``; after it (or with a pretrained codec), the codec frozen and None."""
        if self.plan.stage_at(step)[0].group == CODEC_GROUP:
            return {f"loss/{CODEC_GROUP}": codec.training_loss(codec_input(), kl_weight)}
        codec.requires_grad_(False)
        return None


@runtime_checkable
class Segmenter(Protocol):
    """A method whose run predicts label maps (``imgx3d predict``, test-split scoring): unet, imgx, sdseg, darl."""

    def predict(self, image: torch.Tensor, window: Window) -> torch.Tensor:
        """Class probabilities ``(B, K, ...)`` for whole images ``(B, C, ...)`` of the same spatial size."""


@runtime_checkable
class WindowSegmenter(Segmenter, Protocol):
    """A segmenter whose prediction is one network pass per window (the U-Net): the streaming window
    blends its per-window probabilities slab by slab, without whole-volume maps."""

    def window_probabilities(self, window: torch.Tensor) -> torch.Tensor:
        """Class probabilities of one batch of windows."""


@runtime_checkable
class Sampler(Segmenter, Protocol):
    """A segmenter whose prediction combines several samples (ImgX's ``method.num_samples``): the
    samples' spread is part of the prediction's uncertainty (:mod:`imgx3d.inference.uncertainty`)."""

    def sample_probabilities(self, image: torch.Tensor, window: Window) -> Iterator[torch.Tensor]:
        """Each sample's class probabilities ``(B, K, ...)``, one at a time."""

    def combine_samples(self, samples: Iterable[torch.Tensor]) -> torch.Tensor:
        """What :meth:`predict` returns for these samples."""


@dataclass(frozen=True)
class GenerateSettings:
    """How ``imgx3d synth`` asks a generator for pairs.

    Attributes:
        seed: pair ``i`` depends only on ``(seed, i)`` (and its mask).
        steps: sampling steps; None: the method's ``sample_steps``.
    """

    seed: int = 0
    steps: int | None = None


@runtime_checkable
class Generator(Protocol):
    """A method whose run synthesises image/mask pairs (``imgx3d synth``): pig, siamese."""

    def generate(self, indices: list[int], size: list[int], masks: torch.Tensor | None = None,
                 settings: GenerateSettings = GenerateSettings()) -> tuple[torch.Tensor, torch.Tensor]:
        """Generated (images ``(B, C, H, W)`` in [-1, 1], labels ``(B, 1, H, W)``) for pairs ``indices``."""


@runtime_checkable
class Codec(Protocol):
    """A method whose run is a latent codec other runs take as ``method.codec.path``: vae."""

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Scaled latents of ``(B, 3, H, W)`` images in [-1, 1]."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from scaled latents."""


@runtime_checkable
class SelfValidating(Protocol):
    """A method that validates itself (a codec, a generator) instead of by whole-volume segmentation."""

    def validation_metrics(self, cases: list[dict[str, Any]], labels: dict[int, str],
                           slices: SliceConfig) -> dict[str, float]:
        """Its ``val/...`` metrics on model-space cases (``val/dice_mean`` picks ``best.pt`` when kept "best")."""


@runtime_checkable
class FeatureExtractor(Protocol):
    """A trained 2D segmenter whose pooled features measure generated slices (``synthesis.quality``)."""

    def features(self, slices: torch.Tensor) -> torch.Tensor:
        """``(N, F)`` features of ``(N, C, H, W)`` slices."""


def regions_of(method: Any) -> Regions | None:
    """The regions a method predicts (``data.regions``), None for label outputs (and for any segmenter that is not a
    :class:`Method`, such as a wrapped network)."""
    return getattr(method, "regions", None)


def build_method(method_cfg: MethodConfig | Mapping[str, Any], num_classes: int, in_channels: int,
                 regions: Regions | None = None) -> Method:
    """Instantiate the method ``method_cfg`` names: a method's config dataclass, or a ``method:``
    mapping (checked and completed with the defaults first). With ``regions`` it has one output
    per region instead of one per class (:meth:`Method.use_regions`)."""
    if not isinstance(method_cfg, MethodConfig):
        method_cfg = method_config(dict(method_cfg))
    method = method_class(method_cfg.name)(method_cfg, len(regions.names) if regions else num_classes, in_channels)
    if regions is not None:
        method.use_regions(regions)
    return method


def method_from_checkpoint(checkpoint: Checkpoint) -> Method:
    """The method a checkpoint's config describes, with its weights (on the CPU, in training mode)."""
    method = build_method(checkpoint.config.method, checkpoint.num_classes, checkpoint.network_in_channels,
                          Regions.of(checkpoint.config.data, checkpoint.labels))
    load_method_state(method, checkpoint.weights, str(checkpoint.path))
    return method


def load_method_state(method: Method, state: dict[str, torch.Tensor], source: str) -> None:
    """Load weights, turning a shape or key mismatch into a one-line error."""
    try:
        method.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise CheckpointError(
            f"{source}: weights do not fit method '{method.name}' as configured ({detail}); "
            "use a checkpoint trained with this method and config"
        ) from None
