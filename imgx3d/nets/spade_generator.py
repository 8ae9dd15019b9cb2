"""DARL's generator: residual blocks of *switchable* SPADE normalisation (Kim et al., ICLR 2023).

A switchable SPADE layer is an affine instance norm when no mask is given (DARL's segmentation
path) and MONAI's ``SPADE`` (parameter-free instance norm modulated by the mask) when one is
(the synthesis path), so one generator both segments and synthesises. The switch is the
paper's contribution, hence written here; the modulation itself is MONAI's block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.blocks.spade_norm import SPADE
from torch import nn


class SwitchableSPADE(nn.Module):
    """Affine instance norm without a mask; SPADE modulation by the mask with one."""

    def __init__(self, channels: int, mask_channels: int = 1, hidden: int = 64):
        super().__init__()
        self.plain = nn.InstanceNorm2d(channels, affine=True)
        self.spade = SPADE(label_nc=mask_channels, norm_nc=channels, spatial_dims=2, hidden_channels=hidden,
                           norm="INSTANCE")

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.plain(x) if mask is None else self.spade(x, mask)


class SwitchableResBlock(nn.Module):
    """norm → LeakyReLU(0.2) → conv, twice, plus the shortcut; each norm switchable (SPADE's
    ``SPADEResnetBlock``: a learned 1×1 shortcut, itself normalised, when the width changes)."""

    def __init__(self, channels: int, hidden: int, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        middle = min(channels, out_channels)
        self.norm1, self.norm2 = SwitchableSPADE(channels, hidden=hidden), SwitchableSPADE(middle, hidden=hidden)
        self.conv1 = nn.Conv2d(channels, middle, 3, padding=1)
        self.conv2 = nn.Conv2d(middle, out_channels, 3, padding=1)
        self.learned_shortcut = channels != out_channels
        if self.learned_shortcut:
            self.norm_s = SwitchableSPADE(channels, hidden=hidden)
            self.conv_s = nn.Conv2d(channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        shortcut = self.conv_s(self.norm_s(x, mask)) if self.learned_shortcut else x
        h = self.conv1(F.leaky_relu(self.norm1(x, mask), 0.2))
        return shortcut + self.conv2(F.leaky_relu(self.norm2(h, mask), 0.2))


class SwitchableSPADEGenerator(nn.Module):
    """Encoder (stride-2 convs) → switchable residual blocks → decoder of nearest upsampling and
    switchable residual blocks at every resolution (the authors' ``up_0`` at H/2 and ``up_1`` at H,
    so the mask modulates the full-resolution features: thin vessels survive) → tanh in [-1, 1].

    Args:
        in_channels: input channels (DARL: the noisy image and the diffusion module's noise estimate).
        out_channels: output channels (a vessel map, or an image).
        channels: width after the stem; doubled at each of ``downsamples`` levels.
        blocks: switchable residual blocks at the bottleneck.
        hidden: hidden channels of the SPADE mask embedding.
    """

    def __init__(self, in_channels: int, out_channels: int, channels: int = 32, downsamples: int = 2,
                 blocks: int = 4, hidden: int = 64):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 7, padding=3), nn.InstanceNorm2d(channels, affine=True),
                                   nn.ReLU()]
        width = channels
        for _ in range(downsamples):
            layers += [nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.InstanceNorm2d(2 * width, affine=True),
                       nn.ReLU()]
            width *= 2
        self.encoder = nn.Sequential(*layers)
        self.blocks = nn.ModuleList(SwitchableResBlock(width, hidden) for _ in range(blocks))
        self.up_blocks = nn.ModuleList(SwitchableResBlock(width // 2**i, hidden, width // 2 ** (i + 1))
                                       for i in range(downsamples))
        self.head = nn.Conv2d(channels, out_channels, 7, padding=3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.encoder(x)
        for block in self.blocks:
            h = block(h, mask)
        for block in self.up_blocks:  # SPADE resizes the mask to each resolution (nearest)
            h = block(F.interpolate(h, scale_factor=2.0, mode="nearest"), mask)
        return torch.tanh(self.head(F.leaky_relu(h, 0.2)))
