"""Siamese-Diffusion's dense hint input (DHI): the encoder that turns a mask (or an image) into
ControlNet's control features at the latent resolution.

conv3×3 to the first width, then per width a residual block; between widths a patch merging
(2×2 space-to-depth + 1×1 conv, as Swin) while the latent factor still needs downsampling,
else a 1×1 conv; SiLU, no normalisation; a zero-initialised 1×1 output conv to the denoiser's
first width, so the control starts as a no-op. Written here because it is the paper's own
module (ControlNet's stock hint encoder is sparse strided convs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class _Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class _PatchMerge(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.project = nn.Conv2d(4 * in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(F.pixel_unshuffle(x, 2))


class DenseHintEncoder(nn.Module):
    """``(B, in_channels, H, W)`` → ``(B, out_channels, H / factor, W / factor)`` control features.

    Args:
        in_channels: mask channels, or 3 for an image.
        out_channels: the denoiser's first block width.
        factor: the latent downsampling (a power of 2, at most 2^(len(widths) − 1)).
        widths: the paper's 16 → 32 → 64 → 128 → 256.
    """

    def __init__(self, in_channels: int, out_channels: int, factor: int = 8,
                 widths: tuple[int, ...] = (16, 32, 64, 128, 256)):
        super().__init__()
        merges = int(round(math.log2(factor)))
        if 2 ** merges != factor or merges > len(widths) - 1:
            raise ValueError(f"DHI: factor {factor} must be a power of 2 up to 2^{len(widths) - 1}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1), _Residual(widths[0])]
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers += [_PatchMerge(a, b) if i < merges else nn.Conv2d(a, b, 1), _Residual(b)]
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(widths[-1], out_channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.silu(self.body(x)))
