"""Segmentation networks: MONAI ``UNet`` (residual units) or ``DynUNet`` (nnU-Net style)."""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import DynUNet, UNet
from torch import nn

from imgx3d.errors import ConfigError


def build_segmentation_net(arch: str, spatial_dims: int, in_channels: int, out_channels: int,
                           channels: Sequence[int], strides: Sequence[int | Sequence[int]], num_res_units: int = 2,
                           norm: str = "instance", dropout: float = 0.0,
                           kernel_size: int | Sequence[int | Sequence[int]] = 3,
                           full_res_features: int = 0, deep_supervision: int = 0) -> nn.Module:
    """A U-Net mapping (B, in, ...) to (B, out, ...) logits.

    Args:
        arch: ``unet`` (MONAI UNet) or ``dynunet`` (MONAI DynUNet, conv blocks as nnU-Net).
        channels: feature width per level; ``len(strides) == len(channels) - 1``.
        strides: downsampling factor between levels (or one per axis); the patch size must be
            divisible by their product along each axis.
        kernel_size: one kernel size; with ``dynunet`` also one per level (each a size or per axis).
        full_res_features: ``unet`` only: a level of this many features on top, at full resolution
            (channels ``[full_res_features, *channels]``, strides ``[1, *strides]``); 0: none. MONAI's
            UNet convolves its input with the first stride at once, so without it no feature map but
            the last up-convolution's sees the full grid (nnU-Net's first stage is at full resolution;
            DynUNet's already is).
        deep_supervision: ``dynunet`` only: this many extra output heads on the decoder levels below the
            top (1: half resolution, 2: also quarter, ...; at most ``len(channels) - 2``). In training
            mode the network then returns ``(B, 1 + heads, out, ...)``, each head upsampled to the
            input's size (MONAI's way; nnU-Net downsamples the labels instead); in eval mode only the
            top output. 0: none.
    """
    per_level = isinstance(kernel_size, Sequence) and len(kernel_size) == len(channels) and arch == "dynunet"
    if len(strides) != len(channels) - 1:
        raise ConfigError(f"config key 'method.strides' needs {len(channels) - 1} entries (one per level below the top)")
    if full_res_features and arch != "unet":
        raise ConfigError("config key 'method.full_res_features' applies to method.arch: unet (DynUNet's first level is "
                          "already at full resolution); set it to 0")
    if deep_supervision and arch != "dynunet":
        raise ConfigError("config key 'method.deep_supervision' needs method.arch: dynunet; set it to 0")
    if not 0 <= deep_supervision <= len(channels) - 2:
        raise ConfigError(f"config key 'method.deep_supervision' must be 0 to {len(channels) - 2} "
                          f"(heads on the decoder levels below the top), got {deep_supervision}")
    if full_res_features:
        channels, strides = [full_res_features, *channels], [1, *strides]
    if arch == "unet":
        if isinstance(kernel_size, Sequence):
            raise ConfigError("config key 'method.kernel_size': per-level kernels need method.arch: dynunet")
        return UNet(spatial_dims, in_channels, out_channels, channels=list(channels), strides=list(strides),
                    kernel_size=kernel_size, num_res_units=num_res_units, norm=norm, dropout=dropout)
    if arch == "dynunet":
        kernels = list(kernel_size) if per_level else [kernel_size] * len(channels)
        return DynUNet(spatial_dims, in_channels, out_channels, kernel_size=kernels,
                       strides=[1, *strides], upsample_kernel_size=list(strides), filters=list(channels),
                       norm_name=norm, dropout=dropout or None, deep_supervision=deep_supervision > 0,
                       deep_supr_num=max(deep_supervision, 1))
    raise ConfigError(f"config key 'method.arch' must be unet or dynunet, got '{arch}'")
