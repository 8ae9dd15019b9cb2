"""Segmentation networks: MONAI ``UNet`` (residual units) or ``DynUNet`` (nnU-Net style)."""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import DynUNet, UNet
from torch import nn

from imgx3d.errors import ConfigError


def build_segmentation_net(arch: str, spatial_dims: int, in_channels: int, out_channels: int,
                           channels: Sequence[int], strides: Sequence[int], num_res_units: int = 2,
                           norm: str = "instance", dropout: float = 0.0, kernel_size: int = 3) -> nn.Module:
    """A U-Net mapping (B, in, ...) to (B, out, ...) logits.

    Args:
        arch: ``unet`` (MONAI UNet) or ``dynunet`` (MONAI DynUNet, conv blocks as nnU-Net).
        channels: feature width per level; ``len(strides) == len(channels) - 1``.
        strides: downsampling factor between levels; the patch size must be divisible by
            their product.
    """
    if len(strides) != len(channels) - 1:
        raise ConfigError(f"config key 'method.strides' needs {len(channels) - 1} entries (one per level below the top)")
    if arch == "unet":
        return UNet(spatial_dims, in_channels, out_channels, channels=list(channels), strides=list(strides),
                    kernel_size=kernel_size, num_res_units=num_res_units, norm=norm, dropout=dropout)
    if arch == "dynunet":
        return DynUNet(spatial_dims, in_channels, out_channels, kernel_size=[kernel_size] * len(channels),
                       strides=[1, *strides], upsample_kernel_size=list(strides), filters=list(channels),
                       norm_name=norm, dropout=dropout or None)
    raise ConfigError(f"config key 'method.arch' must be unet or dynunet, got '{arch}'")
