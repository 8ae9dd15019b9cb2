"""PIG (MICCAI 2025): paired image + mask generation by diffusion-guided diffusion, per slice.

A pair (x = mask, y = image slice), both in [-1, 1], is noised independently at the same t.
Two denoisers (MONAI ``DiffusionModelUNet``, 2D), guides concatenated on channels:

- ``model_x([x_t, y_t], t) → eps_x``: the mask, guided by the *noisy* image;
- ``model_y([y_t, x0_hat], t) → eps_y``: the image, guided by the *clean* mask estimate.

Training is staged: ``stage1_steps`` steps of model_x (MSE on eps), then model_y with
``x0_hat`` from the frozen model_x (one-step estimate) and its MSE weighted per pixel by
``sigmoid(x0_hat)`` (the lesion counts more); t is drawn antithetically (t and T − 1 − t).
Sampling (:meth:`PIGMethod.sample`): DDIM, eta = 0, per step first x then y, with y guided by
the binarised ``x0_hat`` (5×5 mean pool, threshold 3/4·max + 1/4·min per sample and channel).

Multi-class masks (hippocampus: anterior / posterior) are K − 1 one-hot foreground channels in
[-1, 1], each binarised as the paper's single channel; the generated label is the channel with
the largest final value where it is positive (one channel: the paper's binary mask).

``space: pixel`` is the paper's. ``space: latent`` (for large slices: 512² DBT slices cost
64× less per step at f = 8) diffuses the image in the latent space of the SD-format codec
(``method.codec``; without ``codec.path`` the small codec trains first, ``codec_steps`` steps
on the image slices, then freezes) and the mask *downsampled* to the latent grid (area mean
of the ±1 channels). We downsample rather than encode the mask because PIG binarises the
mask estimate at every sampling step to guide the image: on the downsampled mask that is a
threshold, through the codec it would be a decode + binarise + encode per step. The final
mask is the mask estimate upsampled (bilinear) to the slice size and thresholded at 0; the
guide's 5×5 mean pool shrinks with the grid (5 / f, odd, at least 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet
from torch import nn

from imgx3d.config import MethodConfig, ScheduleConfig, SliceConfig, schedule_field
from imgx3d.data.slices import foreground_slices
from imgx3d.diffusion.sampler import ddim_sample, ddim_step, ddim_timesteps
from imgx3d.diffusion.schedule import DiffusionSchedule, schedule_of
from imgx3d.errors import ConfigError
from imgx3d.methods.base import (
    GenerateSettings,
    Method,
    Stage,
    TrainingPlan,
    codec_first,
)
from imgx3d.methods.masks import masks_to_channels
from imgx3d.nets.boundary import float32_outputs
from imgx3d.nets.latent_codec import CodecConfig, LatentCodec, from_rgb, to_rgb
from imgx3d.registry import register

VAL_SLICES = 32  # foreground validation slices scored per validation (fixed, deterministic)


@dataclass
class PIGConfig(MethodConfig):
    """Hyperparameters of the ``pig`` method.

    Attributes:
        channels, attention_levels, num_res_blocks, norm_groups, num_head_channels: both
            denoisers (paper: base 32, mult [1,1,2,2,4,4], 2 res blocks, attention at 16², GroupNorm 32).
        schedule: the chain (T = 1024, linear 1e-4 → 0.02).
        stage1_steps: training steps of model_x; model_y trains after them.
        sample_steps: DDIM steps when sampling (paper 256).
        val_steps: DDIM steps of the guided mask chain scored at validation.
        seed: seed of sampling noise (per generated pair).
        space: ``pixel`` (paper) or ``latent`` (image in the codec's latents, mask downsampled).
        codec, codec_steps, codec_lr_scale: the codec of ``latent`` space (as for sdseg).
    """

    name: str = "pig"
    channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    attention_levels: list[bool] = field(default_factory=lambda: [False, False, True])
    num_res_blocks: int = 2
    norm_groups: int = 16
    num_head_channels: int = 32
    schedule: ScheduleConfig = schedule_field("linear", 1024, 1e-4, 0.02)
    stage1_steps: int = 2000
    sample_steps: int = 256
    val_steps: int = 20
    seed: int = 0
    space: Literal["pixel", "latent"] = "pixel"
    codec: CodecConfig = field(default_factory=CodecConfig)
    codec_steps: int = 2000
    codec_lr_scale: float = 1.0


def binarise_guide(x0_hat: torch.Tensor, pool: int = 5) -> torch.Tensor:
    """PIG's mask guide: ``pool``×``pool`` mean pool (odd), then ±1 at ``3/4·max + 1/4·min`` per sample and channel."""
    pooled = F.avg_pool2d(x0_hat, pool, stride=1, padding=pool // 2, count_include_pad=False)
    flat = pooled.flatten(2)
    threshold = 0.75 * flat.amax(-1) + 0.25 * flat.amin(-1)
    return torch.where(pooled > threshold[..., None, None], 1.0, -1.0).to(x0_hat.dtype)


def antithetic_timesteps(batch_size: int, num_steps: int, device: torch.device) -> torch.Tensor:
    """t for half the batch and ``T − 1 − t`` for the other half (lower-variance loss estimates)."""
    half = torch.randint(0, num_steps, ((batch_size + 1) // 2,), device=device)
    return torch.cat([half, num_steps - 1 - half])[:batch_size]


def channels_to_labels(x: torch.Tensor) -> torch.Tensor:
    """Generated mask channels ``(B, K − 1, H, W)`` → class indices ``(B, 1, H, W)`` (0 where all ≤ 0)."""
    best = x.max(1, keepdim=True)
    return torch.where(best.values > 0, best.indices + 1, 0)


class PixelSpace(nn.Module):
    """The paper's space: slices and masks as they are."""

    factor, clip = 1, True

    def __init__(self, in_channels: int):
        super().__init__()
        self.image_channels = in_channels

    def encode(self, image: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(slices in [-1, 1], ±1 mask channels) → the diffused (image, mask)."""
        return image, masks

    def decode(self, y: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Diffused (image, mask) → (slices in [-1, 1], labels)."""
        return y.clamp(-1, 1), self.labels(x)

    def labels(self, x: torch.Tensor) -> torch.Tensor:
        """Diffused mask channels → class indices ``(B, 1, H, W)`` on the slice grid."""
        return channels_to_labels(x)


class LatentSpace(nn.Module):
    """The codec's latents for the image, the mask area-downsampled to the latent grid."""

    clip = False

    def __init__(self, cfg: PIGConfig, in_channels: int):
        super().__init__()
        self.codec = LatentCodec.build(cfg.codec)
        self.codec.requires_grad_(not cfg.codec.path)  # trained first when no weights are given
        self.factor, self.in_channels = self.codec.factor, in_channels
        self.image_channels = self.codec.vae.config.latent_channels

    def encode(self, image: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.codec.check_fits(image)
        with torch.no_grad():
            rgb = to_rgb(image)
            self.codec.fit_scale(rgb)
            return self.codec.encode(rgb), F.avg_pool2d(masks, self.factor)

    def decode(self, y: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return from_rgb(self.codec.decode(y).clamp(-1, 1), self.in_channels), self.labels(x)

    def labels(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple(s * self.factor for s in x.shape[-2:])
        return channels_to_labels(F.interpolate(x, size=size, mode="bilinear", align_corners=False))


@register
class PIGMethod(Method):
    """Two guided denoisers, trained in two stages; generates (image, mask) slice pairs."""

    name = "pig"
    spatial_dims = 2
    Config = PIGConfig

    def __init__(self, cfg: PIGConfig, num_classes: int, in_channels: int):
        super().__init__(cfg, num_classes, in_channels)
        if len(cfg.attention_levels) != len(cfg.channels):
            raise ConfigError("config key 'method.attention_levels' needs one entry per level of method.channels")
        if any(c % cfg.norm_groups for c in cfg.channels):
            raise ConfigError(f"config key 'method.norm_groups' ({cfg.norm_groups}) must divide every method.channels")
        self.mask_channels = num_classes - 1
        self.space = PixelSpace(in_channels) if cfg.space == "pixel" else LatentSpace(cfg, in_channels)
        self.train_codec_first = cfg.space == "latent" and not cfg.codec.path
        # stage 1 trains model_x (the mask), stage 2 model_y (the image) guided by the frozen model_x;
        # a generator: best.pt is the latest validated weights
        self.plan = TrainingPlan(codec_first(self.train_codec_first, cfg.codec_steps, cfg.codec_lr_scale,
                                             Stage("model_x", cfg.stage1_steps), Stage("model_y")), keep="latest")
        self.guide_pool = max(1, (5 // self.space.factor) // 2 * 2 + 1)
        image_channels = self.space.image_channels

        def denoiser(own: int, guide: int) -> DiffusionModelUNet:
            return DiffusionModelUNet(spatial_dims=2, in_channels=own + guide, out_channels=own,
                                      channels=list(cfg.channels), attention_levels=list(cfg.attention_levels),
                                      num_res_blocks=cfg.num_res_blocks, norm_num_groups=cfg.norm_groups,
                                      num_head_channels=cfg.num_head_channels)

        self.model_x = float32_outputs(denoiser(self.mask_channels, image_channels))
        self.model_y = float32_outputs(denoiser(image_channels, self.mask_channels))
        self.schedule: DiffusionSchedule = schedule_of(cfg.schedule)

    def parameter_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        codec = self.codec_group(self.space.codec) if self.cfg.space == "latent" else {}
        return {"model_x": list(self.model_x.parameters()), "model_y": list(self.model_y.parameters()), **codec}

    # -- the two denoisers -----------------------------------------------------------------
    def _x0_of_mask(self, x_t: torch.Tensor, y_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.schedule.x0_from_eps(x_t, t, self.model_x(torch.cat([x_t, y_t], 1), t)).clamp(-1, 1)

    def _x0_of_image(self, y_t: torch.Tensor, guide: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        y0_hat = self.schedule.x0_from_eps(y_t, t, self.model_y(torch.cat([y_t, guide], 1), t))
        return y0_hat.clamp(-1, 1) if self.space.clip else y0_hat

    def size_multiple(self) -> int:
        """The denoisers' downsampling, times the codec's in latent space."""
        return self.space.factor * 2 ** (len(self.cfg.channels) - 1)

    def training_step(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        if self.cfg.space == "latent":
            codec_loss = self.codec_stage(self.space.codec, step, lambda: to_rgb(batch["image"]),
                                          self.cfg.codec.kl_weight)
            if codec_loss is not None:
                return codec_loss
        y0, x0 = self.space.encode(batch["image"], masks_to_channels(batch["label"], self.num_classes))
        t = antithetic_timesteps(y0.shape[0], self.schedule.num_steps, y0.device)
        noise_x, noise_y = torch.randn_like(x0), torch.randn_like(y0)
        x_t, y_t = self.schedule.q_sample(x0, t, noise_x).float(), self.schedule.q_sample(y0, t, noise_y).float()
        if self.plan.stage_at(step)[0].group == "model_x":
            eps_x = self.model_x(torch.cat([x_t, y_t], 1), t)
            return {"loss/model_x": F.mse_loss(eps_x, noise_x)}
        with torch.no_grad():  # stage 2: the clean mask estimate of the frozen model_x guides the image
            x0_hat = self._x0_of_mask(x_t, y_t, t)
        eps_y = self.model_y(torch.cat([y_t, x0_hat], 1), t)
        weight = torch.sigmoid(x0_hat).amax(1, keepdim=True)  # the lesion (any foreground channel) weighs more
        return {"loss/model_y": (weight * (eps_y - noise_y) ** 2).mean()}

    # -- generation ------------------------------------------------------------------------
    @torch.no_grad()
    def sample_from_noise(self, x: torch.Tensor, y: torch.Tensor, steps: int | None = None,
                          progress: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """DDIM (eta = 0) from ``(x_T, y_T)``: per step x first, then y guided by the binarised x0_hat.

        Returns images ``(B, C, H, W)`` in [-1, 1] and labels ``(B, 1, H, W)``.
        """
        for t, t_prev in ddim_timesteps(self.schedule, steps or self.cfg.sample_steps):
            tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
            x0_hat = self._x0_of_mask(x, y, tt)
            y0_hat = self._x0_of_image(y, binarise_guide(x0_hat, self.guide_pool), tt)
            x, y = ddim_step(self.schedule, x, t, x0_hat, t_prev=t_prev), ddim_step(self.schedule, y, t, y0_hat,
                                                                                      t_prev=t_prev)
            if progress is not None:
                progress()
        return self.space.decode(y, x)

    def initial_noise(self, index: int, size: list[int], device: torch.device,
                      seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_T, y_T)`` of generated pair ``index``: a function of (seed, index) only, so any
        batching (and a resumed synthesis) generates the same pair."""
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, index]).generate_state(1)[0]))
        grid = [s // self.space.factor for s in size]
        x = torch.randn(1, self.mask_channels, *grid, generator=g)
        y = torch.randn(1, self.space.image_channels, *grid, generator=g)
        return x.to(device), y.to(device)

    def generate(self, indices: list[int], size: list[int], masks: torch.Tensor | None = None,
                 settings: GenerateSettings = GenerateSettings()) -> tuple[torch.Tensor, torch.Tensor]:
        """Pairs ``indices`` of ``settings.seed`` (images in [-1, 1], labels) of in-plane ``size``."""
        if masks is not None:
            raise ConfigError("method 'pig' generates masks itself; it takes no --masks")
        device = next(self.parameters()).device
        noise = [self.initial_noise(i, size, device, settings.seed) for i in indices]
        return self.sample_from_noise(torch.cat([x for x, _ in noise]), torch.cat([y for _, y in noise]),
                                      settings.steps)

    def sample(self, n: int | None = None, masks: torch.Tensor | None = None,
               size: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` generated (images, labels) of in-plane ``size`` (pairs 0 … n − 1 of ``method.seed``)."""
        return self.generate(list(range(n or 1)), list(size or [64, 64]), masks, GenerateSettings(self.cfg.seed))

    @torch.no_grad()
    def validation_metrics(self, cases: list[dict[str, Any]], labels: dict[int, str],
                           slices: SliceConfig | None = None) -> dict[str, float]:
        """model_x: Dice of the guided mask chain (y_t = the real slice noised) on foreground
        validation slices; model_y: its weighted eps MSE on them. Deterministic (fixed noise)."""
        image, label = foreground_slices(cases, slices or SliceConfig(), VAL_SLICES)
        codec_in_training = self.cfg.space == "latent" and float(self.space.codec.scale) == 0
        if len(label) == 0 or codec_in_training:
            return {"val/dice_mean": 0.0}  # nothing to score yet (no foreground, or the codec still trains)
        device = next(self.parameters()).device
        image, label = image.to(device), label.to(device)
        y0, x0 = self.space.encode(image, masks_to_channels(label, self.num_classes))
        g = torch.Generator().manual_seed(self.cfg.seed)
        x = torch.randn(x0.shape, generator=g).to(device)
        noise_y = torch.randn(y0.shape, generator=g).to(device)

        def mask_x0(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # guided by the real slice, noised
            return self._x0_of_mask(x_t, self.schedule.q_sample(y0, t, noise_y).float(), t)

        x = ddim_sample(self.schedule, x, mask_x0, self.cfg.val_steps)
        pred = self.space.labels(x)
        metrics = {}
        for c in range(1, self.num_classes):
            p, r = pred == c, label == c
            metrics[f"val/guided_mask_dice/{labels.get(c, c)}"] = float(2 * (p & r).sum() / max(int(p.sum() + r.sum()), 1))
        tt = torch.linspace(0, self.schedule.num_steps - 1, y0.shape[0]).long().to(device)
        y_t = self.schedule.q_sample(y0, tt, noise_y).float()
        x0_hat = self._x0_of_mask(self.schedule.q_sample(x0, tt, torch.randn(x0.shape, generator=g).to(device)).float(),
                                  y_t, tt)
        eps_y = self.model_y(torch.cat([y_t, x0_hat], 1), tt)
        metrics["val/image_eps_mse"] = float((torch.sigmoid(x0_hat).amax(1, keepdim=True) * (eps_y - noise_y) ** 2).mean())
        # a generator keeps its latest weights (keeps_latest); the mean mask Dice is what gets logged as the score
        metrics["val/dice_mean"] = float(np.mean([v for k, v in metrics.items() if "guided_mask_dice" in k]))
        return metrics
