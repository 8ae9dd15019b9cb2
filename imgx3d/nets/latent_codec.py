"""The latent codec of the 2D latent-diffusion methods: a Stable-Diffusion-format KL autoencoder.

Backed by diffusers ``AutoencoderKL``. Weights come from a local path only (nothing is
downloaded): a diffusers folder (``config.json`` + weights), a single ``.safetensors`` /
``.ckpt`` file in diffusers or original-LDM key format (with a diffusers ``config.json``, or
the SD-1.x architecture by default), or an imgx3d checkpoint (a ``vae`` run's, or any run
whose method holds a codec). Without weights a small f = 8 autoencoder is built to be
trained on the dataset's slices (``imgx3d train --method vae``, or the first phase of SDSeg).

Inputs and outputs are 3-channel images in [-1, 1] (grey images and masks are replicated);
``encode`` returns float32 latents multiplied by ``scale`` (``scale_by_std``: 1 / std of the first
batch's latents, as in SDSeg, rather than SD's 0.18215).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn

from imgx3d.checkpoint import load_checkpoint
from imgx3d.errors import CheckpointError, ConfigError
from imgx3d.nets.boundary import to_float32

# The SD-1.x VAE architecture (diffusers config of CompVis/stable-diffusion-v1-4 'vae'), for
# single-file weights given without a config.json.
SD1_VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "sample_size": 512, "scaling_factor": 0.18215,
}


@dataclass
class CodecConfig:
    """Where the codec comes from, and the small default architecture.

    Attributes:
        path: local weights (diffusers folder, ``.safetensors``/``.ckpt`` file, or an imgx3d
            ``best.pt`` / run folder); empty = the small default, trained on the dataset.
        config: diffusers ``config.json`` for a single weights file (default: SD-1.x).
        widths: block widths of the small default (f = 2^(len − 1); 4 levels: f = 8).
        layers_per_block: ResNet layers per block of the small default.
        latent_channels: latent channels of the small default (SD: 4).
        norm_groups: GroupNorm groups of the small default.
        kl_weight: weight of the KL term when training the codec.
        scale_by_std: latent scale = 1 / std of the first batch's latents (else the
            weights' ``scaling_factor``).
    """

    path: str = ""
    config: str = ""
    widths: list[int] = field(default_factory=lambda: [32, 64, 128, 128])
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_groups: int = 32
    kl_weight: float = 1e-6
    scale_by_std: bool = True


def _small_autoencoder(cfg: CodecConfig) -> AutoencoderKL:
    if any(w % cfg.norm_groups for w in cfg.widths):
        raise ConfigError(f"codec.norm_groups ({cfg.norm_groups}) must divide every entry of codec.widths")
    n = len(cfg.widths)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=cfg.latent_channels,
                         block_out_channels=tuple(cfg.widths), layers_per_block=cfg.layers_per_block,
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         norm_num_groups=cfg.norm_groups)


def _from_weights_file(path: Path, config_path: str) -> AutoencoderKL:
    """A single weights file, diffusers or original-LDM (``encoder.down.0...``) key format."""
    if config_path:
        config = json.loads(Path(config_path).read_text(encoding="utf-8"))
    else:
        config = dict(SD1_VAE_CONFIG)
    vae = AutoencoderKL.from_config(config)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    state = {k.removeprefix("first_stage_model."): v for k, v in state.items()
             if not k.startswith("model.") and not k.startswith("cond_stage_model.")}
    if any(k.startswith("encoder.down.") for k in state):
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        state = convert_ldm_vae_checkpoint(state, vae.config)
    try:
        missing, unexpected = vae.load_state_dict(state, strict=False)
    except RuntimeError:  # shape mismatches
        missing, unexpected = ["(shapes differ)"], []
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit the VAE config ({len(missing)} missing, {len(unexpected)} "
                              "unexpected keys); pass the matching diffusers config.json as codec.config")
    return vae


class LatentCodec(nn.Module):
    """Encode 3-channel images in [-1, 1] to scaled latents and back.

    Args:
        vae: the autoencoder.
        scale: latent scale; 0 = not yet known (set by :meth:`fit_scale` on the first batch).
    """

    def __init__(self, vae: AutoencoderKL, scale: float = 0.0):
        super().__init__()
        self.vae = vae
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self._scale_fitted = False  # a Python flag: no device-to-host read of ``scale`` per training step

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._scale_fitted = False  # loaded weights bring their own scale: look at it again
        super()._load_from_state_dict(*args, **kwargs)

    @classmethod
    def build(cls, cfg: CodecConfig) -> "LatentCodec":
        """The codec ``cfg`` names: loaded from ``cfg.path``, or the small untrained default."""
        if not cfg.path:
            return cls(_small_autoencoder(cfg))
        path = Path(cfg.path)
        if path.is_dir() and (path / "best.pt").is_file():
            path = path / "best.pt"
        if not path.exists():
            raise CheckpointError(f"{path}: codec weights not found; set method.codec.path to a local diffusers "
                                  "folder, a .safetensors file or an imgx3d run folder")
        try:
            if path.is_dir():
                vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True)
            elif path.suffix == ".pt":
                return cls._from_imgx3d_checkpoint(path)
            else:
                vae = _from_weights_file(path, cfg.config)
        except (CheckpointError, ConfigError):
            raise
        except Exception as err:
            raise CheckpointError(f"{path}: not loadable as an SD-format VAE ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0][:160]}); pass a diffusers AutoencoderKL folder") from None
        return cls(vae, 0.0 if cfg.scale_by_std else vae.config.scaling_factor)

    @classmethod
    def _from_imgx3d_checkpoint(cls, path: Path) -> "LatentCodec":
        run = load_checkpoint(path)
        trained = getattr(run.config.method, "codec", None)  # the codec section of the run's method config
        if not isinstance(trained, CodecConfig):
            raise CheckpointError(f"{path}: this run's method ({run.method_name}) has no codec; pass a vae or sdseg run")
        codec = cls(_small_autoencoder(dataclasses.replace(trained, path="")))
        state = {k.removeprefix("codec."): v for k, v in run.weights.items() if k.startswith("codec.")}
        codec.load_state_dict(state)
        return codec

    def check_fits(self, x: torch.Tensor) -> None:
        """Refuse slices whose size the codec's downsampling does not divide (a one-line config error)."""
        f = self.factor
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ConfigError(f"slices of {tuple(x.shape[-2:])} do not fit a codec with downsampling {f}; set "
                              f"data.slices.size to multiples of {f}")

    @property
    def latent_scale(self) -> torch.Tensor:
        """``scale``, or 1 while it is not yet fitted (a codec still in training)."""
        return torch.where(self.scale > 0, self.scale, torch.ones_like(self.scale))

    def encode(self, x: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """Scaled latents of ``x`` (posterior mode, or a sample)."""
        dist = self.vae.encode(x).latent_dist
        return to_float32(dist.sample() if sample else dist.mode()) * self.latent_scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (unclamped) from scaled latents."""
        return to_float32(self.vae.decode(z / self.latent_scale).sample)

    @torch.no_grad()
    def fit_scale(self, x: torch.Tensor) -> None:
        """``scale_by_std``: set ``scale`` to 1 / std of this batch's latents, once."""
        if self._scale_fitted:
            return
        self._scale_fitted = True
        if float(self.scale) == 0.0:
            std = self.vae.encode(x).latent_dist.mode().std().detach()
            if torch.distributed.is_initialized():  # torchrun: the ranks' mean, one scale for all
                torch.distributed.all_reduce(std)
                std /= torch.distributed.get_world_size()
            self.scale.fill_(1.0 / float(std))

    def training_loss(self, x: torch.Tensor, kl_weight: float) -> torch.Tensor:
        """L1 reconstruction + ``kl_weight`` · KL of the posterior (no perceptual/GAN terms:
        their pretrained weights cannot be downloaded here, and masks do not need them)."""
        dist = self.vae.encode(x).latent_dist
        recon = self.vae.decode(dist.sample()).sample
        return F.l1_loss(recon, x) + kl_weight * dist.kl().mean() / x[0].numel()


def to_rgb(x: torch.Tensor) -> torch.Tensor:
    """``(B, 1, H, W)`` → ``(B, 3, H, W)``; more channels: the first three (fewer: repeated)."""
    return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x[:, :3] if x.shape[1] >= 3 else x[:, [0, 1, 1]]


def from_rgb(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Inverse of :func:`to_rgb` for decoded images: the channel mean for one channel, else the first ``channels``."""
    return x.mean(1, keepdim=True) if channels == 1 else x[:, :channels]


def mask_to_rgb(mask: torch.Tensor) -> torch.Tensor:
    """Binary ``(B, H, W)`` or ``(B, 1, H, W)`` masks → 3-channel images in {-1, 1}."""
    mask = mask if mask.ndim == 4 else mask[:, None]
    return (2 * mask.float() - 1).repeat(1, 3, 1, 1)


def rgb_to_probability(x: torch.Tensor) -> torch.Tensor:
    """Decoded masks ``(B, 3, H, W)`` in [-1, 1] → foreground probability ``(B, H, W)`` (channel mean)."""
    return ((x.mean(1) + 1) / 2).clamp(0, 1)
