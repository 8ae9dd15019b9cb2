"""Siamese-Diffusion (Qiu et al., CVPR 2025): mask-conditioned latent image synthesis, per slice.

A latent diffusion model over the codec's image latents, controlled ControlNet-style (diffusers
``ControlNetModel``) by dense hint input encoders (:mod:`imgx3d.nets.dense_hint`). Two branches
share the noise and t:

- Mask-Diffusion: control ``c_m = DHI_m(mask)`` → ``eps_m``;
- Image-Diffusion: ``c_mix = w_m·sg(c_m) + w_i·DHI_i(image)`` through a copy θ' of the control
  network → ``eps_mix``, ``w_i = k / ramp_steps`` rising 0 → 1;

``L = L_m + L_i + w_c·L_c (+ L_m')`` with the noise consistency ``L_c = ||eps_m − sg(eps_mix)||²``
and the online augmentation ``L_m'``: past ``online_after`` of ``ramp_steps`` and for
``t ≤ t_tau``, the image branch's one-step ``z0'`` is re-noised and the mask branch learns that
noise under ``c_m``. Control classifier-free guidance (a learned null control dropped in with
``cond_dropout``, then ``guidance`` > 1) is an opt-in: the paper's CFG is on a text prompt, which
there is none of here, so by default there is neither (``guidance`` 1, no control dropout). Sampling: the mask branch only, DDIM (eta 0, 50 steps), from real or
randomly transformed masks (``imgx3d synth --masks``).

The denoiser is a small diffusers ``UNet2DConditionModel`` trained from scratch, or an SD-1.x
UNet from a local diffusers folder (``sd_path`` with ``unet/`` and ``vae/``; its encoder frozen
as in the paper). The codec trains first when no weights are given (as in sdseg). Its cross-
attention sees one learned context token in place of a text embedding.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imgx3d.config import MethodConfig, SliceConfig
from imgx3d.data.slices import foreground_slices
from imgx3d.diffusion.sampler import ddim_sample
from imgx3d.diffusion.schedule import DiffusionSchedule, make_schedule
from imgx3d.errors import CheckpointError, ConfigError
from imgx3d.methods.base import (
    GenerateSettings,
    Method,
    Stage,
    TrainingPlan,
    codec_first,
    register,
)
from imgx3d.methods.pig import masks_to_channels
from imgx3d.nets.dense_hint import DenseHintEncoder
from imgx3d.nets.latent_codec import CodecConfig, LatentCodec, from_rgb, to_rgb

VAL_SLICES = 32  # foreground validation slices scored per validation


@dataclass
class SiameseConfig(MethodConfig):
    """Hyperparameters of the ``siamese`` method.

    Attributes:
        codec, codec_steps, codec_lr_scale: the latent codec (trained first without ``codec.path``).
        sd_path: local SD-1.x diffusers folder (``unet/``, ``vae/``); empty: the small denoiser.
        channels, layers_per_block, norm_groups, attention_head_dim, context_dim: the small denoiser.
        hint_widths: the DHI widths (paper: 16 → 256).
        beta_schedule, base_steps, beta_start, beta_end: SD's chain (scaled linear, 1000).
        ramp_steps: N_iter of ``w_i = k / N_iter`` (set it to train.max_steps).
        consistency_weight: w_c (0 turns noise consistency off, the ablation).
        online_augmentation, online_after, t_tau: ``L_m'`` after ``online_after``·ramp_steps steps, t ≤ t_tau.
        cond_dropout: probability of the null control in training (0: the paper has no control
            dropout; it drops the text prompt, which imgx3d has none of).
        guidance, sample_steps: classifier-free guidance scale over the null control, and DDIM steps
            when sampling. 1 (the default): no control CFG, one denoiser call per step; the authors'
            9.0 is CFG on the text prompt with the control kept in both branches, so control CFG
            is an opt-in (with ``cond_dropout`` > 0) whose scale has to be measured on its own.
        seed: sampling noise seed (per generated image).
    """

    name: str = "siamese"
    codec: CodecConfig = field(default_factory=CodecConfig)
    codec_steps: int = 2000
    codec_lr_scale: float = 1.0
    sd_path: str = ""
    channels: list[int] = field(default_factory=lambda: [64, 128, 256])
    layers_per_block: int = 1
    norm_groups: int = 32
    attention_head_dim: int = 8
    context_dim: int = 64
    hint_widths: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256])
    beta_schedule: Literal["linear", "scaled_linear", "cosine"] = "scaled_linear"
    base_steps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    ramp_steps: int = 3000
    consistency_weight: float = 1.0
    online_augmentation: bool = True
    online_after: float = 1 / 3
    t_tau: int = 200
    cond_dropout: float = 0.0
    guidance: float = 1.0
    sample_steps: int = 50
    seed: int = 0


def _small_unet(cfg: SiameseConfig, latent_channels: int):
    from diffusers import UNet2DConditionModel

    n = len(cfg.channels)
    return UNet2DConditionModel(in_channels=latent_channels, out_channels=latent_channels,
                                block_out_channels=tuple(cfg.channels), down_block_types=("DownBlock2D",) * n,
                                up_block_types=("UpBlock2D",) * n, mid_block_type="UNetMidBlock2D",
                                layers_per_block=cfg.layers_per_block, norm_num_groups=cfg.norm_groups,
                                attention_head_dim=cfg.attention_head_dim, cross_attention_dim=cfg.context_dim)


@register
class SiameseDiffusion(Method):
    """Mask-conditioned latent image synthesis with a Siamese image branch."""

    name = "siamese"
    spatial_dims = 2
    Config = SiameseConfig

    def __init__(self, cfg: SiameseConfig, num_classes: int, in_channels: int):
        super().__init__(cfg, num_classes, in_channels)
        from diffusers import ControlNetModel, UNet2DConditionModel

        if cfg.sd_path:
            root = Path(cfg.sd_path)
            if not (root / "unet").is_dir() or not (root / "vae").is_dir():
                raise CheckpointError(f"{root}: not a Stable Diffusion folder (unet/ and vae/ in diffusers format); "
                                      "fix method.sd_path")
            self.codec = LatentCodec.build(CodecConfig(path=str(root / "vae")))
            self.unet = UNet2DConditionModel.from_pretrained(str(root / "unet"), local_files_only=True)
            for part in (self.unet.conv_in, self.unet.time_embedding, self.unet.down_blocks):
                part.requires_grad_(False)  # the paper freezes the pretrained denoiser's encoder
        else:
            self.codec = LatentCodec.build(cfg.codec)
            self.unet = _small_unet(cfg, self.codec.vae.config.latent_channels)
        self.train_codec_first = not (cfg.sd_path or cfg.codec.path)
        # a generator: best.pt is the latest validated weights; a dropped condition or the late
        # online term leaves some weights out of a step
        self.plan = TrainingPlan(codec_first(self.train_codec_first, cfg.codec_steps, cfg.codec_lr_scale, Stage("model")),
                                 keep="latest", idle_parameters=True)
        self.codec.requires_grad_(self.train_codec_first)
        width, factor = self.unet.config.block_out_channels[0], self.codec.factor
        self.control_mask = ControlNetModel.from_unet(self.unet)
        self.control_mask.controlnet_cond_embedding = nn.Identity()  # the DHIs make the control features
        self.control_image = copy.deepcopy(self.control_mask)  # θ'
        self.hint_mask = DenseHintEncoder(num_classes - 1, width, factor, tuple(cfg.hint_widths))
        self.hint_image = DenseHintEncoder(3, width, factor, tuple(cfg.hint_widths))
        self.null_control = nn.Parameter(torch.zeros(1, width, 1, 1))
        self.context = nn.Parameter(torch.randn(1, 1, self.unet.config.cross_attention_dim) * 0.02)
        self.schedule: DiffusionSchedule = make_schedule(cfg.beta_schedule, cfg.base_steps, cfg.beta_start,
                                                         cfg.beta_end)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        codec = set(map(id, self.codec.parameters()))
        return {"model": [p for p in self.parameters() if id(p) not in codec and p.requires_grad],
                **self.codec_group(self.codec)}

    # -- pieces ----------------------------------------------------------------------------
    def _eps(self, control: nn.Module, z_t: torch.Tensor, t: torch.Tensor, hint: torch.Tensor) -> torch.Tensor:
        context = self.context.expand(z_t.shape[0], -1, -1)
        down, mid = control(z_t, t, context, controlnet_cond=hint, return_dict=False)
        return self.unet(z_t, t, context, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample.float()

    def mask_control(self, masks: torch.Tensor) -> torch.Tensor:
        """``c_m`` of ±1 mask channels ``(B, K − 1, H, W)``."""
        return self.hint_mask(masks)

    def ramp(self, step: int) -> float:
        """``w_i`` at a training step (counted from the end of the codec phase)."""
        return min(1.0, max(step, 0) / max(self.cfg.ramp_steps, 1))

    def training_step(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        codec_loss = self.codec_stage(self.codec, step, lambda: to_rgb(batch["image"]), self.cfg.codec.kl_weight)
        if codec_loss is not None:
            return codec_loss
        k = self.plan.stage_at(step)[1]  # steps of the diffusion stage
        terms = self.losses(batch, k)
        loss = terms["mask"] + terms["image"] + self.cfg.consistency_weight * terms["consistency"]
        loss = loss + terms.get("online", 0.0)
        return {"loss/model": loss, "w_i": torch.tensor(self.ramp(k)), **{n: v.detach() for n, v in terms.items()}}

    def losses(self, batch: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
        """The loss terms at step ``k`` of the diffusion phase: ``mask`` (L_m), ``image`` (L_i),
        ``consistency`` (L_c) and, when active, ``online`` (L_m')."""
        rgb = to_rgb(batch["image"])
        self.codec.requires_grad_(False)
        self.codec.check_fits(rgb)
        with torch.no_grad():
            self.codec.fit_scale(rgb)
            z0 = self.codec.encode(rgb)
        n = z0.shape[0]
        t = torch.randint(0, self.schedule.num_steps, (n,), device=z0.device)
        noise = torch.randn_like(z0)
        z_t = self.schedule.q_sample(z0, t, noise).float()
        c_m = self.mask_control(masks_to_channels(batch["label"], self.num_classes))
        dropped = (torch.rand(n, device=z0.device) < self.cfg.cond_dropout)[:, None, None, None]
        c_m = torch.where(dropped, self.null_control.expand_as(c_m), c_m)
        c_mix = c_m.detach() + self.ramp(k) * self.hint_image(rgb)  # w_m = 1, sg(c_m)
        eps_m = self._eps(self.control_mask, z_t, t, c_m)
        eps_mix = self._eps(self.control_image, z_t, t, c_mix)
        terms = {"mask": F.mse_loss(eps_m, noise), "image": F.mse_loss(eps_mix, noise),
                 "consistency": F.mse_loss(eps_m, eps_mix.detach())}  # sg: the image branch anchors
        late = t <= self.cfg.t_tau
        if self.cfg.online_augmentation and k >= self.cfg.online_after * self.cfg.ramp_steps and late.any():
            z0_prime = self.schedule.x0_from_eps(z_t[late], t[late], eps_mix[late]).detach()  # one step
            noise_prime = torch.randn_like(z0_prime)
            z_t_prime = self.schedule.q_sample(z0_prime, t[late], noise_prime).float()
            terms["online"] = F.mse_loss(self._eps(self.control_mask, z_t_prime, t[late], c_m[late]), noise_prime)
        return terms

    # -- generation ------------------------------------------------------------------------
    def initial_noise(self, index: int, size: list[int], device: torch.device, seed: int) -> torch.Tensor:
        """``z_T`` of generated image ``index``: a function of (seed, index) only."""
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, index]).generate_state(1)[0]))
        grid = [s // self.codec.factor for s in size]
        return torch.randn(1, self.codec.vae.config.latent_channels, *grid, generator=g).to(device)

    @torch.no_grad()
    def generate(self, indices: list[int], size: list[int], masks: torch.Tensor | None = None,
                 settings: GenerateSettings = GenerateSettings()) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``(B, C, H, W)`` in [-1, 1] for label masks ``(B, 1, H, W)``: the mask branch, DDIM
        (eta 0); with ``guidance`` != 1, classifier-free guidance against the null control."""
        if masks is None:
            raise ConfigError("method 'siamese' draws images for given masks: pass --masks DIR to imgx3d synth")
        device = next(self.parameters()).device
        masks = masks.to(device)
        z = torch.cat([self.initial_noise(i, size, device, settings.seed) for i in indices])
        c_m = self.mask_control(masks_to_channels(masks, self.num_classes))
        c_null = self.null_control.expand_as(c_m)

        def predict_x0(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            eps = self._eps(self.control_mask, z_t, t, c_m)
            if self.cfg.guidance != 1.0:  # opt-in control CFG against the null control
                eps_u = self._eps(self.control_mask, z_t, t, c_null)
                eps = eps_u + self.cfg.guidance * (eps - eps_u)
            return self.schedule.x0_from_eps(z_t, t, eps)

        z = ddim_sample(self.schedule, z, predict_x0, settings.steps or self.cfg.sample_steps)
        return from_rgb(self.codec.decode(z).clamp(-1, 1), self.in_channels), masks.long()

    @torch.no_grad()
    def validation_metrics(self, cases: list[dict[str, Any]], labels: dict[int, str],
                           slices: SliceConfig | None = None) -> dict[str, float]:
        """Noise-prediction MSE of the mask branch (what sampling uses) and of the image branch on
        foreground validation slices at evenly spaced t, fixed noise. No Dice: nothing here segments."""
        image, label = foreground_slices(cases, slices or SliceConfig(), VAL_SLICES)
        if len(label) == 0 or float(self.codec.scale) == 0:
            return {}  # no foreground, or the codec still trains
        device = next(self.parameters()).device
        rgb = to_rgb(image.to(device))
        z0 = self.codec.encode(rgb)
        g = torch.Generator().manual_seed(self.cfg.seed)
        noise = torch.randn(z0.shape, generator=g).to(device)
        t = torch.linspace(0, self.schedule.num_steps - 1, len(z0)).long().to(device)
        z_t = self.schedule.q_sample(z0, t, noise).float()
        c_m = self.mask_control(masks_to_channels(label.to(device), self.num_classes))
        eps_m = self._eps(self.control_mask, z_t, t, c_m)
        eps_mix = self._eps(self.control_image, z_t, t, c_m + self.hint_image(rgb))
        return {"val/mask_branch_mse": float(F.mse_loss(eps_m, noise)),
                "val/image_branch_mse": float(F.mse_loss(eps_mix, noise))}
