"""Supervised U-Net: the baseline every diffusion method is compared with.

Dice + cross-entropy on patches (MONAI ``DiceCELoss``), gaussian-blended sliding window
on whole volumes. With ``spatial_dims: 2`` the same network is 2D and runs per slice through
the slice adapter, like the 2D diffusion methods it is then compared with (and on 2D images).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from monai.losses import DiceCELoss

from imgx3d.errors import ConfigError
from imgx3d.methods.base import Method, Windowed, register
from imgx3d.nets.segmentation import build_segmentation_net


@dataclass
class UNetConfig:
    """Hyperparameters of the ``unet`` method.

    Attributes:
        spatial_dims: 3 (patches of volumes) or 2 (slices, through the slice adapter).
        arch: ``unet`` (MONAI UNet with residual units) or ``dynunet``.
        channels: features per level; strides: downsampling between levels.
        num_res_units: residual units per block (``unet`` only).
        norm: normalisation layer (``instance``, ``batch``, ...).
        dropout: dropout probability.
        lambda_dice, lambda_ce: loss weights.
        batch_dice: compute Dice over the whole batch (nnU-Net's default) instead of per sample.
    """

    spatial_dims: int = 3
    arch: str = "unet"
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    strides: list[int] = field(default_factory=lambda: [2, 2, 2])
    num_res_units: int = 2
    norm: str = "instance"
    dropout: float = 0.0
    kernel_size: int = 3
    lambda_dice: float = 1.0
    lambda_ce: float = 1.0
    batch_dice: bool = True


@register
class UNetMethod(Method):
    """Patch-trained U-Net with Dice + CE; one sliding-window pass at inference."""

    name = "unet"
    spatial_dims = 3
    Config = UNetConfig

    def __init__(self, cfg: UNetConfig, num_classes: int, in_channels: int):
        super().__init__(cfg, num_classes, in_channels)
        if cfg.spatial_dims not in (2, 3):
            raise ConfigError(f"config key 'method.spatial_dims' must be 2 or 3, got {cfg.spatial_dims}")
        self.spatial_dims = cfg.spatial_dims
        self.net = build_segmentation_net(cfg.arch, self.spatial_dims, in_channels, num_classes, cfg.channels,
                                          cfg.strides, cfg.num_res_units, cfg.norm, cfg.dropout, cfg.kernel_size)
        self.loss = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=cfg.batch_dice,
                               lambda_dice=cfg.lambda_dice, lambda_ce=cfg.lambda_ce)

    def training_step(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        logits = self.net(batch["image"])
        return {"loss/model": self.loss(logits, batch["label"])}

    def window_probabilities(self):
        return lambda x: torch.softmax(self.net(x).float(), dim=1)

    def predict(self, image: torch.Tensor, window: Windowed) -> torch.Tensor:
        return window(self.window_probabilities(), image)
