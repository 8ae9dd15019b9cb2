"""Siamese-Diffusion (Qiu et al., CVPR 2025): mask-conditioned latent image synthesis, per slice.

A latent diffusion model over the codec's image latents, controlled ControlNet-style (diffusers
``ControlNetModel``) by a dense hint input encoder (:mod:`imgx3d.nets.dense_hint`). As in the
authors' code (``cldm/cldm.py``: ``ControlLDM.apply_model`` and ``p_losses``) there is **one**
control path — one DHI and one control net — that encodes both the mask and the image. Two
branches share the noise ε and t:

- Mask-Diffusion: residuals ``c_m = control(z_t, DHI(mask))`` → denoiser → ``eps_m``;
- Image-Diffusion: residuals ``c_mix = w_m·sg(c_m) + w_i·c_i`` with ``c_i = control(z_t, DHI(image))``
  and ``w_i = k / ramp_steps`` rising 0 → 1, ``w_m = 1``, mixed residual by residual, through a copy
  of the denoiser that ``L_i`` cannot train (the authors deep-copy it every step; here its
  weights are detached, the same gradients at no copy's cost) → ``eps_mix``. ``L_i`` trains the
  control path through the image hint only.

``L = L_m + L_i + w_c·L_c (+ L_m')`` with the noise consistency ``L_c = ||eps_m − sg(eps_mix)||²``
and the online augmentation ``L_m'`` (their Eq. 7): past ``online_after`` of ``ramp_steps``, the
image branch's one-step ``z0'`` is re-noised **with the same ε** and the mask branch learns that
ε under the mask control, weighted per sample by ``t ≤ t_tau`` over the whole batch. Control
classifier-free guidance (a learned null control dropped in with ``cond_dropout``, then
``guidance`` > 1) is an opt-in: the paper's CFG is on a text prompt, which there is none of here,
so by default there is neither (``guidance`` 1, no control dropout). Sampling: the mask branch
only, DDIM (eta 0, 50 steps), from real or randomly transformed masks (``imgx3d synth --masks``).

The denoiser is a small diffusers ``UNet2DConditionModel`` trained from scratch, or an SD-1.x
UNet from a local diffusers folder (``sd_path`` with ``unet/`` and ``vae/``; its encoder and
middle block frozen, as the authors' ``ControlledUnetModel`` runs them without gradients). The
codec trains first when no weights are given (as in sdseg). Its cross-attention sees one
learned context token in place of a text embedding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from imgx3d.config import MethodConfig, ScheduleConfig, SliceConfig, TrainConfig, schedule_field
from imgx3d.data.slices import foreground_slices
from imgx3d.diffusion.sampler import ddim_sample
from imgx3d.diffusion.schedule import DiffusionSchedule, schedule_of
from imgx3d.errors import CheckpointError, ConfigError
from imgx3d.methods.base import (
    GenerateSettings,
    Method,
    Stage,
    TrainingPlan,
    codec_first,
)
from imgx3d.methods.masks import masks_to_channels
from imgx3d.nets.boundary import float32_outputs
from imgx3d.nets.dense_hint import DenseHintEncoder
from imgx3d.nets.latent_codec import CodecConfig, LatentCodec, from_rgb, to_rgb
from imgx3d.registry import register

VAL_SLICES = 32  # foreground validation slices scored per validation


@dataclass
class SiameseConfig(MethodConfig):
    """Hyperparameters of the ``siamese`` method.

    Attributes:
        codec, codec_steps, codec_lr_scale: the latent codec (trained first without ``codec.path``).
        sd_path: local SD-1.x diffusers folder (``unet/``, ``vae/``); empty: the small denoiser.
        channels, layers_per_block, norm_groups, attention_head_dim, context_dim: the small denoiser.
        hint_widths: the DHI widths (paper: 16 → 256).
        schedule: SD's chain (scaled linear, 1000, 0.00085 → 0.012).
        ramp_steps: N_iter of ``w_i = k / N_iter``; 0 (default): the diffusion phase's length,
            ``train.max_steps`` less the codec phase when the codec is trained first (the paper
            ramps over the whole fine-tuning of SD).
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
    schedule: ScheduleConfig = schedule_field("scaled_linear", 1000, 0.00085, 0.012)
    ramp_steps: int = 0
    consistency_weight: float = 1.0
    online_augmentation: bool = True
    online_after: float = 1 / 3
    t_tau: int = 200
    cond_dropout: float = 0.0
    guidance: float = 1.0
    sample_steps: int = 50
    seed: int = 0

    def complete(self, train: TrainConfig) -> None:
        """``ramp_steps: 0`` → the steps of the diffusion phase."""
        if self.ramp_steps <= 0:
            codec_phase = 0 if self.sd_path or self.codec.path else self.codec_steps
            self.ramp_steps = max(1, train.max_steps - codec_phase)


@dataclass
class Branches:
    """One training step's two branches: shared ``t``, ``noise`` and ``z_t``, the mask's hint
    features, the mask branch's ``eps_m`` and the image branch's ``eps_mix``."""

    t: torch.Tensor
    noise: torch.Tensor
    z_t: torch.Tensor
    mask_hint: torch.Tensor
    eps_m: torch.Tensor
    eps_mix: torch.Tensor


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
            # SD's own latent scale (0.18215 in its config), not 1/std of a batch: the pretrained
            # denoiser was trained on latents at that scale
            self.codec = LatentCodec.build(CodecConfig(path=str(root / "vae"), scale_by_std=False))
            self.unet = float32_outputs(UNet2DConditionModel.from_pretrained(str(root / "unet"), local_files_only=True))
            for part in (self.unet.conv_in, self.unet.time_embedding, self.unet.down_blocks, self.unet.mid_block):
                part.requires_grad_(False)  # the authors run the pretrained encoder and middle block without grad
        else:
            self.codec = LatentCodec.build(cfg.codec)
            self.unet = float32_outputs(_small_unet(cfg, self.codec.vae.config.latent_channels))
        self.train_codec_first = not (cfg.sd_path or cfg.codec.path)
        # a generator: best.pt is the latest validated weights; a dropped condition or the late
        # online term leaves some weights out of a step
        self.plan = TrainingPlan(codec_first(self.train_codec_first, cfg.codec_steps, cfg.codec_lr_scale, Stage("model")),
                                 keep="latest", idle_parameters=True)
        self.codec.requires_grad_(self.train_codec_first)
        width, factor = self.unet.config.block_out_channels[0], self.codec.factor
        # one control path for mask and image (the authors' single ControlNet with the DHI as its hint
        # block); its input takes the wider of the mask's K - 1 channels and the image's 3, zero-padded
        self.hint_channels = max(num_classes - 1, 3)
        self.control = ControlNetModel.from_unet(self.unet)
        self.control.controlnet_cond_embedding = nn.Identity()  # the DHI makes the control features
        self.hint = DenseHintEncoder(self.hint_channels, width, factor, tuple(cfg.hint_widths))
        self.null_control = nn.Parameter(torch.zeros(1, width, 1, 1))
        self.context = nn.Parameter(torch.randn(1, 1, self.unet.config.cross_attention_dim) * 0.02)
        self.schedule: DiffusionSchedule = schedule_of(cfg.schedule)

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, assign: bool = False):
        if any(key.startswith("control_mask.") for key in state_dict):
            raise RuntimeError("weights of imgx3d's earlier two-control-net Siamese design, which the paper's "
                               "single control path replaced: retrain the run")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        codec = set(map(id, self.codec.parameters()))
        return {"model": [p for p in self.parameters() if id(p) not in codec and p.requires_grad],
                **self.codec_group(self.codec)}

    # -- pieces ----------------------------------------------------------------------------
    def hint_features(self, x: torch.Tensor) -> torch.Tensor:
        """The DHI's control features of a mask (±1 channels) or an RGB image, zero-padded to the
        shared hint input's channels."""
        return self.hint(F.pad(x, (0, 0, 0, 0, 0, self.hint_channels - x.shape[1])))

    def mask_hint(self, labels: torch.Tensor) -> torch.Tensor:
        """The DHI features of label masks ``(B, 1, H, W)``."""
        return self.hint_features(masks_to_channels(labels, self.num_classes))

    def residuals(self, z_t: torch.Tensor, t: torch.Tensor, hint: torch.Tensor) -> list[torch.Tensor]:
        """The control net's residuals for the denoiser: one per down-block output, then the middle."""
        down, mid = self.control(z_t, t, self._context(z_t), controlnet_cond=hint, return_dict=False)
        return [*down, mid]

    def denoise(self, z_t: torch.Tensor, t: torch.Tensor, residuals: list[torch.Tensor],
                shielded: bool = False) -> torch.Tensor:
        """``eps`` of the denoiser given control residuals; ``shielded``: with its weights detached,
        the authors' per-step copy of the denoiser, so a loss through it trains only the control."""
        args, kwargs = (z_t, t, self._context(z_t)), {"down_block_additional_residuals": residuals[:-1],
                                                      "mid_block_additional_residual": residuals[-1]}
        if shielded:
            weights = {name: p.detach() for name, p in self.unet.named_parameters()}
            return functional_call(self.unet, weights, args, kwargs).sample
        return self.unet(*args, **kwargs).sample

    def eps(self, z_t: torch.Tensor, t: torch.Tensor, hint: torch.Tensor) -> torch.Tensor:
        """The mask branch: control residuals of ``hint`` features, then the denoiser."""
        return self.denoise(z_t, t, self.residuals(z_t, t, hint))

    def _context(self, z_t: torch.Tensor) -> torch.Tensor:
        return self.context.expand(z_t.shape[0], -1, -1)

    def ramp(self, step: int) -> float:
        """``w_i`` at a training step (counted from the end of the codec phase)."""
        return min(1.0, max(step, 0) / max(self.cfg.ramp_steps, 1))

    def size_multiple(self) -> int:
        """The codec's downsampling times the latent denoiser's (a pretrained one's own levels)."""
        return self.codec.factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def training_step(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        codec_loss = self.codec_stage(self.codec, step, lambda: to_rgb(batch["image"]), self.cfg.codec.kl_weight)
        if codec_loss is not None:
            return codec_loss
        k = self.plan.stage_at(step)[1]  # steps of the diffusion stage
        terms = self.losses(batch, k)
        loss = terms["mask"] + terms["image"] + self.cfg.consistency_weight * terms["consistency"]
        loss = loss + terms.get("online", 0.0)
        return {"loss/model": loss, "w_i": torch.tensor(self.ramp(k)), **{n: v.detach() for n, v in terms.items()}}

    def branches(self, batch: dict[str, torch.Tensor], k: int, t: torch.Tensor | None = None,
                 noise: torch.Tensor | None = None) -> Branches:
        """Both branches at step ``k`` of the diffusion phase (``t`` and ``noise`` drawn when None)."""
        rgb = to_rgb(batch["image"])
        self.codec.requires_grad_(False)
        self.codec.check_fits(rgb)
        with torch.no_grad():
            self.codec.fit_scale(rgb)
            z0 = self.codec.encode(rgb, sample=bool(self.cfg.sd_path))  # SD fine-tuning encodes a posterior sample
        n = z0.shape[0]
        t = torch.randint(0, self.schedule.num_steps, (n,), device=z0.device) if t is None else t
        noise = torch.randn_like(z0) if noise is None else noise
        z_t = self.schedule.q_sample(z0, t, noise).float()
        h_m = self.mask_hint(batch["label"])
        dropped = (torch.rand(n, device=z0.device) < self.cfg.cond_dropout)[:, None, None, None]
        h_m = torch.where(dropped, self.null_control.expand_as(h_m), h_m)
        c_m = self.residuals(z_t, t, h_m)
        # sg(c_m): the authors compute it with a no-grad copy of the control net holding this step's
        # weights, which gives exactly the mask branch's residuals; they are detached, not recomputed
        c_i = self.residuals(z_t, t, self.hint_features(rgb))
        c_mix = [m.detach() + self.ramp(k) * i for m, i in zip(c_m, c_i)]
        return Branches(t, noise, z_t, h_m, self.denoise(z_t, t, c_m), self.denoise(z_t, t, c_mix, shielded=True))

    def losses(self, batch: dict[str, torch.Tensor], k: int, t: torch.Tensor | None = None,
               noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The loss terms at step ``k`` of the diffusion phase: ``mask`` (L_m), ``image`` (L_i),
        ``consistency`` (L_c) and, when active, ``online`` (L_m')."""
        b = self.branches(batch, k, t, noise)
        terms = {"mask": F.mse_loss(b.eps_m, b.noise), "image": F.mse_loss(b.eps_mix, b.noise),
                 "consistency": F.mse_loss(b.eps_m, b.eps_mix.detach())}  # sg: the image branch anchors
        late = b.t <= self.cfg.t_tau
        if self.cfg.online_augmentation and k > self.cfg.online_after * self.cfg.ramp_steps and late.any():
            terms["online"] = self.online_augmentation(b, late)
        return terms

    def online_augmentation(self, b: Branches, late: torch.Tensor) -> torch.Tensor:
        """``L_m'``: the image branch's one-step ``z0'`` re-noised with the step's own ε, whose noise
        the mask branch learns; per-sample weight 1 where ``t ≤ t_tau``, averaged over the batch."""
        t, noise = b.t[late], b.noise[late]
        z0_prime = self.schedule.x0_from_eps(b.z_t[late], t, b.eps_mix[late])
        z_t_prime = self.schedule.q_sample(z0_prime, t, noise).float().detach()
        per_sample = (self.eps(z_t_prime, t, b.mask_hint[late]) - noise).pow(2).mean((1, 2, 3))
        return per_sample.sum() / len(b.t)

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
        h_m = self.mask_hint(masks)
        h_null = self.null_control.expand_as(h_m)

        def predict_x0(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            eps = self.eps(z_t, t, h_m)
            if self.cfg.guidance != 1.0:  # opt-in control CFG against the null control
                eps_u = self.eps(z_t, t, h_null)
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
        c_m = self.residuals(z_t, t, self.mask_hint(label.to(device)))
        c_i = self.residuals(z_t, t, self.hint_features(rgb))
        eps_m = self.denoise(z_t, t, c_m)
        eps_mix = self.denoise(z_t, t, [m + i for m, i in zip(c_m, c_i)])  # w_i = 1: the ramp's end
        return {"val/mask_branch_mse": float(F.mse_loss(eps_m, noise)),
                "val/image_branch_mse": float(F.mse_loss(eps_mix, noise))}
