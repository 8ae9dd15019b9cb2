"""How close generated slices are to real ones: Fréchet distance and KID on network features.

- Standard FID / KID: features of the Inception network, from a local TorchScript file
  (e.g. the ``inception-2015-12-05.pt`` that StyleGAN3 and clean-fid load; nothing is
  downloaded). Slices are repeated to RGB, scaled to [0, 255] and resized to 299², and the
  file's module must map such a batch to ``(B, 2048)`` pool features.
- Without it: features of a 2D segmenter the toolkit trained on the real data (its U-Net's
  bottleneck, globally average-pooled). The figures are then named ``frechet_distance.segmenter``
  and ``kernel_distance.segmenter``: they are not FID and not comparable to published FIDs.

The Fréchet distance is MONAI's ``FIDMetric``; KID (the unbiased MMD² with the cubic polynomial
kernel, averaged over subsets) is written here because MONAI's ``MMDMetric`` uses a linear
kernel on images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from monai.metrics import FIDMetric
from torch import nn

from imgx3d.errors import CheckpointError, ConfigError
from imgx3d.methods.base import FeatureExtractor

Features = Callable[[torch.Tensor], torch.Tensor]  # slices (B, C, H, W) in [-1, 1] → (B, D)


def frechet_distance(generated: torch.Tensor, real: torch.Tensor) -> float:
    """Fréchet distance between two feature sets ``(N, D)`` (MONAI's FID formula)."""
    return float(FIDMetric()(generated.double(), real.double()))


def kernel_distance(generated: torch.Tensor, real: torch.Tensor, subsets: int = 50, subset_size: int = 1000,
                    seed: int = 0) -> tuple[float, float]:
    """KID: unbiased MMD² with ``k(x, y) = (x·y / d + 1)³``, mean and std over random subsets."""
    g = torch.Generator().manual_seed(seed)
    n = min(subset_size, len(generated), len(real))
    if n < 2:
        raise ConfigError("KID needs at least 2 generated and 2 real samples")
    d = generated.shape[1]
    values = []
    for _ in range(subsets):
        x = generated[torch.randperm(len(generated), generator=g)[:n]].double()
        y = real[torch.randperm(len(real), generator=g)[:n]].double()
        kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
        off = 1 - torch.eye(n, dtype=torch.float64)
        values.append(float((kxx * off).sum() / (n * (n - 1)) + (kyy * off).sum() / (n * (n - 1)) - 2 * kxy.mean()))
    values_t = torch.tensor(values)
    return float(values_t.mean()), float(values_t.std()) if len(values) > 1 else 0.0


def inception_features(path: str | Path, device: torch.device | str = "cpu") -> Features:
    """Pool features of a local TorchScript Inception network."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: Inception weights not found; pass a local TorchScript file "
                              "(e.g. inception-2015-12-05.pt), nothing is downloaded")
    try:
        net = torch.jit.load(str(path), map_location=device).eval()
    except (RuntimeError, ValueError) as err:
        raise CheckpointError(f"{path}: not a TorchScript module ({type(err).__name__}); pass a scripted Inception "
                              "that maps (B, 3, 299, 299) images in [0, 255] to (B, 2048) features") from None

    @torch.no_grad()
    def features(slices: torch.Tensor) -> torch.Tensor:
        rgb = slices[:, :3] if slices.shape[1] >= 3 else slices[:, :1].repeat(1, 3, 1, 1)
        rgb = F.interpolate((rgb.float().clamp(-1, 1) + 1) * 127.5, size=(299, 299), mode="bilinear",
                            align_corners=False)
        return net(rgb.to(device)).flatten(1).float().cpu()

    return features


def segmenter_features(method: nn.Module) -> Features:
    """Globally average-pooled bottleneck features of a trained 2D U-Net method (its
    :class:`~imgx3d.methods.base.FeatureExtractor` role)."""
    if not isinstance(method, FeatureExtractor) or method.spatial_dims != 2:
        raise ConfigError("feature run: use a 2D U-Net run (method unet, method.spatial_dims: 2)")
    method.eval()
    return method.features


def extract(features: Features, slices: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Features of ``(N, C, H, W)`` slices, ``batch`` at a time."""
    return torch.cat([features(slices[i:i + batch]) for i in range(0, len(slices), batch)])
