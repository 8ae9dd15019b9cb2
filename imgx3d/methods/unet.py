"""Supervised U-Net: the baseline every diffusion method is compared with.

Dice + cross-entropy on patches (MONAI ``DiceCELoss``), gaussian-blended sliding window
on whole volumes. With ``spatial_dims: 2`` the same network is 2D and runs per slice through
the slice adapter, like the 2D diffusion methods it is then compared with (and on 2D images).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss, MaskedDiceLoss
from torch import nn

from imgx3d.config import MethodConfig
from imgx3d.data.labels import IGNORE_INDEX, Regions
from imgx3d.errors import ConfigError
from imgx3d.methods.base import Method, Window
from imgx3d.nets.boundary import float32_outputs
from imgx3d.nets.segmentation import build_segmentation_net
from imgx3d.registry import register


@dataclass
class UNetConfig(MethodConfig):
    """Hyperparameters of the ``unet`` method.

    Attributes:
        spatial_dims: 3 (patches of volumes) or 2 (slices, through the slice adapter).
        arch: ``unet`` (MONAI UNet with residual units) or ``dynunet``.
        channels: features per level.
        strides: downsampling between levels: a factor, or one per axis (``[[2, 2, 1], ...]``: an
            anisotropic plan pools the thick-slice axis later).
        kernel_size: the convolutions' kernel: one size, or (``dynunet``) one per level, each a size
            or one per axis (``[[3, 3, 1], [3, 3, 3], ...]``: no mixing across thick slices).
        num_res_units: residual units per block (``unet`` only).
        norm: normalisation layer (``instance``, ``batch``, ...).
        dropout: dropout probability.
        lambda_dice, lambda_ce: loss weights.
        batch_dice: compute Dice over the whole batch (nnU-Net's default) instead of per sample.
        full_res_features: ``arch: unet``: a full-resolution level of this many features on top of
            ``channels`` (0: none; see :func:`~imgx3d.nets.segmentation.build_segmentation_net`).
        deep_supervision: ``arch: dynunet``: Dice + CE also on this many lower decoder levels' outputs
            (upsampled), weighted 1, 1/2, 1/4, ... from the top and normalised to sum 1 (nnU-Net's
            weights; nnU-Net zeroes its coarsest head, which at 4 levels leaves the top and one head,
            ``deep_supervision: 1``). Inference uses the top output only. 0: none.
    """

    name: str = "unet"
    spatial_dims: Literal[2, 3] = 3
    arch: Literal["unet", "dynunet"] = "unet"
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    strides: list[int | list[int]] = field(default_factory=lambda: [2, 2, 2])
    num_res_units: int = 2
    norm: str = "instance"
    dropout: float = 0.0
    kernel_size: int | list[int | list[int]] = 3
    lambda_dice: float = 1.0
    lambda_ce: float = 1.0
    batch_dice: bool = True
    full_res_features: int = 0
    deep_supervision: int = 0


class DiceCEIgnoring(nn.Module):
    """MONAI's Dice + cross-entropy (``DiceCELoss``: foreground Dice of the softmax, CE averaged over voxels)
    with the voxels a batch labels :data:`~imgx3d.data.labels.IGNORE_INDEX` (``data.ignore_label``) left out
    of both terms, as nnU-Net v2 does. Hand-combined because ``DiceCELoss`` takes no mask; MONAI's
    ``MaskedDiceLoss`` masks after the softmax and torch's cross-entropy skips ``ignore_index``. Without
    ignored voxels the mask is all ones and the value is ``DiceCELoss``'s.
    """

    def __init__(self, batch: bool, lambda_dice: float, lambda_ce: float):
        super().__init__()
        self.dice = MaskedDiceLoss(include_background=False, to_onehot_y=True, softmax=True, batch=batch)
        self.lambda_dice, self.lambda_ce = lambda_dice, lambda_ce

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """``logits`` (B, K, ...), ``label`` (B, 1, ...) class indices or IGNORE_INDEX."""
        annotated = label != IGNORE_INDEX
        dice = self.dice(logits, label.masked_fill(~annotated, 0), mask=annotated)
        # a batch with no annotated voxel gives 0/0: no loss from it rather than NaN (no host sync to check)
        ce = torch.nan_to_num(F.cross_entropy(logits, label[:, 0].long(), ignore_index=IGNORE_INDEX), nan=0.0)
        return self.lambda_dice * dice + self.lambda_ce * ce


class RegionDiceBCE(nn.Module):
    """nnU-Net's region loss: soft Dice of each region's sigmoid (MONAI ``DiceLoss``) + binary cross-entropy
    (torch's ``BCEWithLogits``) against the region memberships. Hand-combined because MONAI's
    ``DiceCELoss`` takes the multi-class cross-entropy whenever there is more than one channel.
    """

    def __init__(self, regions: Regions, batch: bool, lambda_dice: float, lambda_ce: float):
        super().__init__()
        self.regions = regions
        self.dice = DiceLoss(sigmoid=True, batch=batch)
        self.lambda_dice, self.lambda_ce = lambda_dice, lambda_ce

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """``logits`` (B, R, ...), ``label`` (B, 1, ...) class values."""
        target = self.regions.targets(label)
        return (self.lambda_dice * self.dice(logits, target)
                + self.lambda_ce * F.binary_cross_entropy_with_logits(logits, target))


@register
class UNetMethod(Method):
    """Patch-trained U-Net with Dice + CE; one sliding-window pass at inference."""

    name = "unet"
    spatial_dims = 3
    Config = UNetConfig

    def __init__(self, cfg: UNetConfig, num_classes: int, in_channels: int):
        super().__init__(cfg, num_classes, in_channels)
        self.spatial_dims = cfg.spatial_dims
        self.net = build_segmentation_net(cfg.arch, self.spatial_dims, in_channels, num_classes, cfg.channels,
                                          cfg.strides, cfg.num_res_units, cfg.norm, cfg.dropout, cfg.kernel_size,
                                          cfg.full_res_features, cfg.deep_supervision)
        self.net = float32_outputs(self.net)
        halving = [0.5 ** i for i in range(1 + cfg.deep_supervision)]
        self.head_weights = [w / sum(halving) for w in halving]
        self.loss = DiceCEIgnoring(cfg.batch_dice, cfg.lambda_dice, cfg.lambda_ce)
        self.partial_labels = self.spatial_dims == 3  # 3D patches map the ignore label to IGNORE_INDEX; slices do not

    def use_regions(self, regions: Regions) -> None:
        """One sigmoid output per region, trained with :class:`RegionDiceBCE` (3D only)."""
        if self.spatial_dims != 3:
            super().use_regions(regions)
        self.regions = regions
        self.loss = RegionDiceBCE(regions, self.cfg.batch_dice, self.cfg.lambda_dice, self.cfg.lambda_ce)

    def size_multiple(self) -> int:
        """The product of the strides (the largest over the axes when they differ)."""
        per_axis = [s if isinstance(s, list) else [s] * self.spatial_dims for s in self.cfg.strides]
        return max(math.prod(s[a] for s in per_axis) for a in range(self.spatial_dims)) if per_axis else 1

    def training_step(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        logits = self.net(batch["image"])
        if not self.cfg.deep_supervision:
            return {"loss/model": self.loss(logits, batch["label"])}
        heads = torch.unbind(logits, dim=1)  # DynUNet in training mode: (B, 1 + heads, C, ...)
        return {"loss/model": sum(w * self.loss(head, batch["label"]) for w, head in zip(self.head_weights, heads))}

    def window_probabilities(self, window: torch.Tensor) -> torch.Tensor:
        """Softmax of one network pass, or with regions each region's sigmoid (the
        :class:`~imgx3d.methods.base.WindowSegmenter` role)."""
        logits = self.net(window)
        return torch.softmax(logits, dim=1) if self.regions is None else torch.sigmoid(logits)

    def predict(self, image: torch.Tensor, window: Window) -> torch.Tensor:
        return window(self.window_probabilities, image)

    @torch.no_grad()
    def features(self, slices: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled bottleneck features of slices (a 2D MONAI ``UNet``, ``arch: unet``):
        the :class:`~imgx3d.methods.base.FeatureExtractor` role that generation quality is measured with."""
        if self.spatial_dims != 2 or not hasattr(self.net, "model"):
            raise ConfigError("feature run: use a 2D U-Net run (method unet, arch: unet, method.spatial_dims: 2)")
        captured: list[torch.Tensor] = []
        hook = _bottleneck(self.net).register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            self.net(slices.float())
        finally:
            hook.remove()
        return captured[-1].mean(dim=(2, 3)).float()


def _bottleneck(net: nn.Module) -> nn.Module:
    """The innermost block of a MONAI ``UNet`` (its ``model`` nests Sequential(down, SkipConnection, up))."""
    block = net.model
    while isinstance(block, nn.Sequential) and len(block) == 3 and hasattr(block[1], "submodule"):
        block = block[1].submodule
    return block
