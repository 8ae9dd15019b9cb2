"""``vae``: train the latent codec (an SD-format KL autoencoder) on a dataset's image and mask slices.

Not a segmenter: ``imgx3d train --method vae`` (or ``method.name: vae``) trains the small
default codec on the slices of the training volumes, validates by the mask reconstruction
Dice (3D, per class, per volume) that SDSeg relies on, and saves it like any run; SDSeg and
the generators then take the run folder as ``method.codec.path``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_dice

from imgx3d.config import MethodConfig, SliceConfig
from imgx3d.data.geometry import slices_to_volume, to_slice_range, volume_to_slices
from imgx3d.methods.base import Method
from imgx3d.methods.masks import present_class_masks
from imgx3d.nets.latent_codec import (
    CodecConfig,
    LatentCodec,
    mask_to_rgb,
    rgb_to_probability,
    to_rgb,
)
from imgx3d.registry import register


@dataclass
class VAEConfig(MethodConfig):
    """Hyperparameters of the ``vae`` method.

    Attributes:
        codec: the codec (``codec.path`` empty: the small default, trained from scratch;
            given: fine-tune those weights).
    """

    name: str = "vae"
    codec: CodecConfig = field(default_factory=CodecConfig)


@torch.no_grad()
def codec_validation(codec: LatentCodec, cases: list[dict[str, Any]], labels: dict[int, str],
                     slices: SliceConfig) -> dict[str, float]:
    """Mask reconstruction Dice through the codec, per class, on whole volumes (3D), plus image PSNR.

    Every slice of a volume's class mask goes through encode → decode → channel mean → 0.5,
    is restacked on the model-space grid and scored in 3D against the mask.
    """
    per_class: dict[int, list[float]] = {c: [] for c in labels if c != 0}
    psnr = []
    device = codec.scale.device
    for case in cases:
        label = case["label"]
        label_slices = volume_to_slices(label, slices.axis, slices.size, label=True)[:, 0]
        for c in per_class:
            recon = torch.cat([rgb_to_probability(codec.decode(codec.encode(mask_to_rgb(part == c).to(device))))
                               for part in label_slices.split(slices.predict_batch)])
            pred = slices_to_volume(recon[:, None].cpu(), slices.axis, label.shape[1:])[0] > 0.5
            reference = (label[0] == c)[None, None].float()
            per_class[c].append(float(compute_dice(pred[None, None].float(), reference, ignore_empty=False)[0, 0]))
        image = volume_to_slices(to_slice_range(case["image"], slices.percentiles), slices.axis, slices.size)
        for part in image.split(slices.predict_batch):
            rgb = to_rgb(part).to(device)
            mse = float(((codec.decode(codec.encode(rgb)).clamp(-1, 1) - rgb) ** 2).mean())
            psnr.append(10 * np.log10(4.0 / max(mse, 1e-12)))  # peak-to-peak 2 in [-1, 1]
    metrics = {f"val/dice/{labels[c]}": float(np.mean(v)) for c, v in per_class.items()}
    metrics["val/dice_mean"] = float(np.mean(list(metrics.values())))
    metrics["val/image_psnr"] = float(np.mean(psnr))
    return metrics


@register
class VAEMethod(Method):
    """The latent codec, trained with L1 reconstruction + KL on image and mask slices."""

    name = "vae"
    spatial_dims = 2
    Config = VAEConfig

    def __init__(self, cfg: VAEConfig, num_classes: int, in_channels: int):
        super().__init__(cfg, num_classes, in_channels)
        self.codec = LatentCodec.build(cfg.codec)

    def size_multiple(self) -> int:
        """The codec's downsampling."""
        return self.codec.factor

    def training_step(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        _, masks = present_class_masks(batch["label"], self.num_classes)
        x = torch.cat([to_rgb(batch["image"]), mask_to_rgb(masks)])
        return {"loss/model": self.codec.training_loss(x, self.cfg.codec.kl_weight)}

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Scaled latents (the :class:`~imgx3d.methods.base.Codec` role)."""
        return self.codec.encode(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(latents)

    def validation_metrics(self, cases: list[dict[str, Any]], labels: dict[int, str],
                           slices: SliceConfig | None = None) -> dict[str, float]:
        return codec_validation(self.codec, cases, labels, slices or SliceConfig())
