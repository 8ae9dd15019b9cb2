"""Modality presets: intensity normalisation with MONAI transforms.

CT: clip to a HU window and scale to [0, 1] (BTCV default window [-175, 250]).
MRI: per-case, per-channel z-score (optionally on non-zero voxels only), or clip to
percentiles and scale to [0, 1].
DBT: clip to percentiles of the breast (voxels above the air threshold) and scale to [0, 1].
"""

from __future__ import annotations

import torch
from monai.transforms import (
    NormalizeIntensity,
    ScaleIntensityRange,
    ScaleIntensityRangePercentiles,
)

from imgx3d.config import DataConfig


def normalize_intensity(image: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """Apply the preset of ``cfg`` to a (C, X, Y, Z) image."""
    if cfg.preset == "ct":
        low, high = cfg.ct_window
        transform = ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)
    elif cfg.preset == "mri" and cfg.mri_norm == "zscore":
        transform = NormalizeIntensity(nonzero=cfg.mri_nonzero, channel_wise=True)
    elif cfg.preset == "mri":
        low, high = cfg.mri_percentiles
        transform = ScaleIntensityRangePercentiles(lower=low, upper=high, b_min=0.0, b_max=1.0,
                                                   clip=True, channel_wise=True)
    elif cfg.preset == "dbt":
        return _breast_percentiles(image.float(), cfg)
    else:
        return image.float()
    out = transform(image.float())
    return out.as_tensor() if hasattr(out, "as_tensor") else out


def _breast_percentiles(image: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """Per channel: percentiles of the breast (above the air threshold), clipped and scaled to [0, 1].

    Hand-written because MONAI's percentile scaling takes its percentiles over every voxel,
    and a cropped tomosynthesis box is still partly air.
    """
    out = torch.empty_like(image)
    for c, channel in enumerate(image):
        low, high = float(channel.min()), float(channel.max())
        breast = channel[channel > low + (cfg.air_crop or 0.0) * (high - low)]
        breast = breast if breast.numel() else channel.flatten()
        q = torch.quantile(breast[:: max(1, breast.numel() // 1_000_000)], torch.tensor(cfg.mri_percentiles) / 100)
        out[c] = ((channel - q[0]) / max(float(q[1] - q[0]), 1e-6)).clamp(0, 1)
    return out
