"""The one seam between the engine and a method, and the registry of methods by name.

A method is an ``nn.Module`` that owns its networks and losses. The trainer, the CLI,
inference and tracking call only this interface, so adding a method touches no other
file but its own module and its configs.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, ClassVar, Protocol

import torch
from torch import nn

from imgx3d.config import from_dict
from imgx3d.errors import CheckpointError, ConfigError

# window(fn, x): run fn over sliding windows of x (B, C, X, Y, Z) and blend the outputs.
Windowed = Callable[[Callable[[torch.Tensor], torch.Tensor], torch.Tensor], torch.Tensor]

METHODS: dict[str, type["Method"]] = {}
# Modules that register methods; imported lazily so `imgx3d --help` stays fast.
METHOD_MODULES = ("imgx3d.methods.unet", "imgx3d.methods.imgx", "imgx3d.methods.vae", "imgx3d.methods.sdseg",
                  "imgx3d.methods.pig", "imgx3d.methods.darl", "imgx3d.methods.siamese")


class Method(nn.Module):
    """Base class of every segmentation method.

    Subclasses set ``name``, ``spatial_dims`` and a ``Config`` dataclass of their
    hyperparameters (the ``method:`` section of a config file, less ``name``).
    """

    name: ClassVar[str]
    spatial_dims: int  # 3: volumetric; 2: runs per slice (a method may set it per instance, e.g. unet)
    segments: ClassVar[bool] = True  # False: not a segmenter (a codec); no test-split prediction
    uses_labels: ClassVar[bool] = True  # False (self-supervised): training never reads label files
    keeps_latest: ClassVar[bool] = False  # True (generators): best.pt is the latest validated weights
    ddp_unused_parameters: ClassVar[bool] = False  # True: some trainable weights sit out a step (staged training)
    Config: ClassVar[type]

    def __init__(self, cfg: Any, num_classes: int, in_channels: int):
        super().__init__()
        self.cfg, self.num_classes, self.in_channels = cfg, num_classes, in_channels

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters per optimiser; ``training_step`` returns ``loss/<group>`` for each."""
        return {"model": [p for p in self.parameters() if p.requires_grad]}

    def lr_scale(self, group: str) -> float:
        """Multiplier of ``train.lr`` for a parameter group (1 unless a method says otherwise)."""
        return 1.0

    def training_step(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        """Losses (``loss/<group>``) and other scalars for one batch of patches."""
        raise NotImplementedError

    def predict(self, image: torch.Tensor, window: Windowed) -> torch.Tensor:
        """Class probabilities (B, K, ...) for whole images (B, C, ...), same spatial size."""
        raise NotImplementedError

    def window_probabilities(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """For a method whose prediction is one sliding-window pass of a network: the per-window
        class probabilities, which lets the engine stream large volumes (None otherwise)."""
        return None

    def validation_metrics(self, cases: list[dict[str, Any]], labels: dict[int, str],
                           slices: Any = None) -> dict[str, float] | None:
        """Validation of a method that does not segment (a codec): its own ``val/...`` metrics,
        with ``val/dice_mean`` the score that picks the best checkpoint. None (segmenters):
        the engine validates whole-volume predictions. ``slices``: the data's ``SliceConfig``."""
        return None


class Generator(Protocol):
    """Methods that also synthesise image/mask pairs (``imgx3d synth``)."""

    def generate(self, indices: list[int], size: list[int], masks: torch.Tensor | None = None,
                 steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Generated (images ``(B, C, H, W)`` in [-1, 1], labels ``(B, 1, H, W)``); pair ``i`` depends
        only on the method's seed and ``i`` (and, for mask-conditioned generators, its mask)."""


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its ``name``."""
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    """The registered class for ``name``."""
    for module in METHOD_MODULES:
        importlib.import_module(module)
    if name not in METHODS:
        raise ConfigError(f"config key 'method.name': unknown method '{name}'; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def build_method(method_cfg: dict[str, Any], num_classes: int, in_channels: int) -> Method:
    """Instantiate the method named in ``method_cfg`` with its validated config."""
    cls = method_class(method_cfg["name"])
    params = {k: v for k, v in method_cfg.items() if k != "name"}
    return cls(from_dict(cls.Config, params, prefix="method"), num_classes, in_channels)


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
