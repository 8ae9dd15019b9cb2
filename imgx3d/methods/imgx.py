"""ImgX-DiffSeg: diffusion over the one-hot mask for 3D multiclass segmentation.

Fu et al. 2023, "Importance of Aligning Training Strategy with Evaluation for Diffusion
Models in 3D Multiclass Segmentation" (METHODS.md §1). The mask ``x0 = 2·onehot − 1`` is
diffused; the image is concatenated on channels: ``net([image, x_t], t) -> class logits``.

- x0 prediction with a segmentation loss (Dice + CE, or Dice + focal) on the logits;
  ``prediction: eps`` is the noise-prediction ablation (MSE on noise).
- Train and infer on the same K-step chain, resampled from a T_beta = 1001 linear schedule
  (``train_steps == infer_steps == 5``); ``train_steps: 1001`` gives the misaligned ablation
  (trained on the full chain, sampled with K steps).
- Recycling: the network input is the noised *prediction* from a first, gradient-free pass
  (``next``: from t + 1, v0.1; ``max``: from K − 1, later default; ``none``: plain DDPM).

At inference every reverse step runs the engine's sliding window over the whole volume, so
all windows share one noisy mask per step; the initial noise is drawn once per volume from
``seed``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Iterable, Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceFocalLoss, DiceLoss
from monai.networks.utils import one_hot
from torch import nn

from imgx3d.config import MethodConfig, ScheduleConfig, schedule_field
from imgx3d.diffusion.sampler import sample
from imgx3d.diffusion.schedule import DiffusionSchedule, schedule_of
from imgx3d.errors import ConfigError
from imgx3d.methods.base import Method, Window
from imgx3d.nets.boundary import float32_outputs
from imgx3d.nets.diffusion_unet import build_time_unet
from imgx3d.registry import register


class PresentClassDice(nn.Module):
    """MONAI's Dice loss averaged over the (sample, class) pairs whose class is in the sample's
    reference (ImgX-DiffSeg's Dice: absent classes are left out, not scored ~1 or ~0 by smoothing).

    Wraps the ``dice`` of a ``DiceCELoss`` / ``DiceFocalLoss`` (which hand it class indices or a
    one-hot target) with its reduction switched to per (sample, class).
    """

    def __init__(self, dice: DiceLoss):
        super().__init__()
        self.dice = dice
        dice.reduction = "none"

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per_class = self.dice(input, target).flatten(1)  # (B, classes scored)
        onehot = target if target.shape[1] == input.shape[1] else one_hot(target, input.shape[1])
        present = onehot.flatten(2).amax(2)[:, 0 if self.dice.include_background else 1:].to(per_class.dtype)
        return (per_class * present).sum() / present.sum().clamp_min(1)


@dataclass
class ImgXConfig(MethodConfig):
    """Hyperparameters of the ``imgx`` method.

    Attributes:
        backbone: ``unet`` (the baseline U-Net's topology + FiLM time conditioning) or
            ``diffusion_unet`` (MONAI DiffusionModelUNet; ``attention_levels``, ``norm_num_groups``,
            ``num_head_channels`` apply to it only); see :mod:`imgx3d.nets.diffusion_unet`.
        channels, strides, num_res_units, norm: the network (paper: channels [32, 64, 128, 256],
            instance norm).
        up_subunits: sub-units of the up path's residual units: 1 (default) is exactly MONAI's UNet
            decoder; null means num_res_units (the runs before issue 21). On the hippocampus bench split,
            30 CPU-minutes, 2 seeds: 1 scored 0.8606 vs null's 0.8625 (−0.002 on each seed) with ~18 %
            more steps, and cheaper inference (a hippocampus volume 0.33 vs 0.45 s in fp32, 0.12 vs 0.13 s in bf16).
        schedule: the base chain (linear, 1001, 1e-4 → 0.02).
        train_steps: chain length used in training: K (aligned) or ``schedule.base_steps`` (misaligned).
        infer_steps: K of the sampling chain.
        recycling: ``max``, ``next`` or ``none``.
        prediction: ``x0`` (paper) or ``eps`` (ablation).
        loss: ``dice_ce`` (v0.1) or ``dice_focal`` (later code); weights 1 each.
        dice_over: the (sample, class) pairs the Dice term averages: ``all`` (MONAI's: a class absent
            from a sample's reference scores ~1 when nothing is predicted, and counts) or ``present``
            (the authors': a class absent from the reference is left out of that sample's Dice).
        sampler: ``ddpm`` or ``ddim``; ddim_eta: DDIM's eta.
        num_samples: ensemble size at inference (one-hot votes averaged).
        seed: seed of the inference noise.
    """

    name: str = "imgx"
    backbone: Literal["unet", "diffusion_unet"] = "unet"
    channels: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    strides: list[int] = field(default_factory=lambda: [2, 2, 2])
    num_res_units: int = 2
    up_subunits: int | None = 1
    norm: str = "instance"
    attention_levels: list[bool] = field(default_factory=list)
    norm_num_groups: int = 16
    num_head_channels: int = 16
    schedule: ScheduleConfig = schedule_field("linear", 1001, 1e-4, 0.02)
    train_steps: int = 5
    infer_steps: int = 5
    recycling: Literal["max", "next", "none"] = "max"
    prediction: Literal["x0", "eps"] = "x0"
    loss: Literal["dice_ce", "dice_focal"] = "dice_ce"
    dice_over: Literal["all", "present"] = "all"
    sampler: Literal["ddpm", "ddim"] = "ddpm"
    ddim_eta: float = 0.0
    num_samples: int = 1
    seed: int = 0


@register
class ImgXDiffSeg(Method):
    """Diffusion segmentation with K-step variance resampling, x0 prediction and recycling."""

    name = "imgx"
    spatial_dims = 3
    Config = ImgXConfig

    def __init__(self, cfg: ImgXConfig, num_classes: int, in_channels: int):
        super().__init__(cfg, num_classes, in_channels)
        if cfg.num_samples < 1:
            raise ConfigError("config key 'method.num_samples' must be >= 1")
        self.net = build_time_unet(cfg.backbone, 3, in_channels + num_classes, num_classes, cfg.channels, cfg.strides,
                                   cfg.num_res_units, cfg.norm, cfg.attention_levels, cfg.norm_num_groups,
                                   cfg.num_head_channels, cfg.up_subunits)
        self.net = float32_outputs(self.net)
        self.train_schedule: DiffusionSchedule = schedule_of(cfg.schedule, cfg.train_steps)
        self.infer_schedule: DiffusionSchedule = schedule_of(cfg.schedule, cfg.infer_steps)
        loss_cls = DiceCELoss if cfg.loss == "dice_ce" else DiceFocalLoss
        self.seg_loss = loss_cls(include_background=False, to_onehot_y=True, softmax=True)
        if cfg.dice_over == "present":
            self.seg_loss.dice = PresentClassDice(self.seg_loss.dice)

    # -- the network as a function of the chain --------------------------------------------
    def _net_out(self, image: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                 schedule: DiffusionSchedule) -> torch.Tensor:
        """The network on ``[image, x_t]`` at chain index t: x0 class logits (x0 mode) or noise (eps mode)."""
        return self._net_on_joined(torch.cat([image, x_t.to(image.dtype)], 1), t, schedule)

    def _net_on_joined(self, joined: torch.Tensor, t: torch.Tensor, schedule: DiffusionSchedule) -> torch.Tensor:
        """:meth:`_net_out` on ``[image, x_t]`` already joined on channels (prediction's windows are)."""
        return self.net(joined, schedule.embed_timesteps(t).to(joined.device))

    def _x0_estimate(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                     schedule: DiffusionSchedule) -> torch.Tensor:
        """Network output → x0_hat in [-1, 1] mask space."""
        if self.cfg.prediction == "x0":
            return 2 * torch.softmax(out, 1) - 1
        return schedule.x0_from_eps(x_t.float(), t, out).clamp(-1, 1)

    def _recycle_times(self, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(t of the trained pass, t_r of the gradient-free pass or None)."""
        k = self.train_schedule.num_steps
        if self.cfg.recycling == "none":
            return torch.randint(0, k, (batch_size,), device=device), None
        if self.cfg.recycling == "next":
            t = torch.randint(0, k, (batch_size,), device=device)
            return t, (t + 1).clamp(max=k - 1)
        t = torch.randint(0, k - 1, (batch_size,), device=device)
        return t, torch.full_like(t, k - 1)

    def training_step(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        image, label = batch["image"], batch["label"]
        schedule = self.train_schedule
        x0 = 2 * F.one_hot(label[:, 0].long(), self.num_classes).movedim(-1, 1).float() - 1
        t, t_recycle = self._recycle_times(image.shape[0], image.device)
        source = x0
        if t_recycle is not None:  # first pass: from the noised ground truth, no gradient
            with torch.no_grad():
                x_r = schedule.q_sample(x0, t_recycle, torch.randn_like(x0))
                source = self._x0_estimate(self._net_out(image, x_r, t_recycle, schedule), x_r, t_recycle, schedule)
        noise = torch.randn_like(x0)
        x_t = schedule.q_sample(source, t, noise)
        out = self._net_out(image, x_t, t, schedule)
        if self.cfg.prediction == "x0":
            loss = self.seg_loss(out, label)
        else:  # eps ablation: the target is the noise that made x_t from its source
            loss = F.mse_loss(out, noise)
        return {"loss/model": loss}

    def predict(self, image: torch.Tensor, window: Window) -> torch.Tensor:
        """K reverse steps over the whole volume; returns class probabilities (or vote fractions)."""
        return self.combine_samples(self.sample_probabilities(image, window))

    def sample_probabilities(self, image: torch.Tensor, window: Window) -> Iterator[torch.Tensor]:
        """Each of the ``num_samples`` reverse chains' class probabilities (the :class:`Sampler` role)."""
        schedule, n_image = self.infer_schedule, image.shape[1]
        shape = (image.shape[0], self.num_classes, *image.shape[2:])

        def predict_x0(x_t: torch.Tensor, t: int) -> torch.Tensor:
            def per_window(patch: torch.Tensor) -> torch.Tensor:
                tt = torch.full((1,), t, dtype=torch.long, device=patch.device)  # one step for every window
                return self._x0_estimate(self._net_on_joined(patch, tt, schedule), patch[:, n_image:], tt, schedule)

            # gaussian blending is a normalised weighted mean, so blending x0_hat = 2p - 1 equals
            # blending the probabilities p: one consistent x0 estimate for the whole volume per step
            return window(per_window, torch.cat([image, x_t], 1))

        for i in range(self.cfg.num_samples):
            generator = torch.Generator(device=image.device).manual_seed(self.cfg.seed + i)
            x_T = torch.randn(shape, generator=generator, device=image.device)
            probs = ((sample(schedule, predict_x0, x_T, self.cfg.sampler, self.cfg.ddim_eta, generator) + 1) / 2)
            probs = probs.clamp_min(0)
            yield probs / probs.sum(1, keepdim=True).clamp_min(1e-8)  # exact already in x0 mode

    def combine_samples(self, samples: Iterable[torch.Tensor]) -> torch.Tensor:
        """One sample's probabilities; several: the fractions of their argmax votes (the paper's ensemble)."""
        votes, count, only = None, 0, None
        for probs in samples:
            only = probs if count == 0 else None
            vote = F.one_hot(probs.max(1).indices, self.num_classes).movedim(-1, 1).float()
            votes = vote if votes is None else votes.add_(vote)
            count += 1
        return only if count == 1 else votes / count
