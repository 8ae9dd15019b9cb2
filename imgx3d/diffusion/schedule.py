"""Noise schedules: base beta schedules, ``alpha_bar``, posterior coefficients, and the
K-step variance resampling of ImgX-DiffSeg (METHODS.md §1).

Hand-written rather than MONAI's ``DDPMScheduler``: its ``step`` assumes the previous step
is t−1 of the training chain and its DDIM timesteps never reach T−1 (MONAI issue #8600).
Here a resampled K-step chain is a schedule in its own right, so 5-step DDPM is exact.
Everything is float64 (K = 5 steps span alpha_bar from 0.9999 to 4e-5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from imgx3d.config import ScheduleConfig
from imgx3d.errors import ConfigError


def beta_schedule(kind: str, num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Betas of a base schedule.

    Args:
        kind: ``linear``, ``scaled_linear`` (linear in sqrt(beta), Stable Diffusion) or
            ``cosine`` (Nichol & Dhariwal, s = 0.008, betas clipped at 0.999).
        num_steps: number of steps T.
    """
    if num_steps < 1:
        raise ConfigError(f"diffusion schedule needs at least 1 step, got {num_steps}")
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2
    if kind == "cosine":
        s = 0.008
        steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    raise ConfigError(f"unknown beta schedule '{kind}'; use linear, scaled_linear or cosine")


def resample_betas(betas: torch.Tensor, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep every s-th ``alpha_bar`` of a T-step schedule, s = (T − 1)/(K − 1), and recompute betas.

    The first and last ``alpha_bar`` are kept; ``alpha'_0 = alpha_bar[0]`` and
    ``alpha'_k = alpha_bar[k s] / alpha_bar[(k − 1) s]``.

    Returns:
        (betas of the K-step chain, the kept base-chain indices ``k * s``).

    Raises:
        ConfigError: when (T − 1) is not divisible by (K − 1).
    """
    total = len(betas)
    if num_steps == total:
        return betas.clone(), torch.arange(total)
    if num_steps < 2 or num_steps > total or (total - 1) % (num_steps - 1):
        raise ConfigError(
            f"cannot resample a {total}-step schedule to {num_steps} steps: (T - 1) = {total - 1} must be divisible "
            f"by (K - 1) = {num_steps - 1}; choose K with (K - 1) dividing {total - 1} (e.g. K = 5 for T = 1001)"
        )
    stride = (total - 1) // (num_steps - 1)
    kept = torch.arange(0, total, stride)
    alpha_bar = torch.cumprod(1 - betas, 0)[kept]
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas, kept


def value_at_steps(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] shaped to broadcast over ``like`` (B, C, ...), on its device, in fp32 at least.

    Diffusion arithmetic never runs below fp32: in bf16 (autocast), sqrt(1 − ᾱ_t) of the
    small t values rounds to 0 and x_t loses its noise. An fp32 (or fp64) coefficient makes
    every ``q_sample`` / ``x0_from_eps`` / posterior product fp32 by type promotion.
    """
    dtype = torch.promote_types(like.dtype, torch.float32)
    out = values.to(like.device)[t.to(like.device)].to(dtype)
    return out.reshape(-1, *([1] * (like.ndim - 1)))


@dataclass
class DiffusionSchedule:
    """A discrete diffusion chain of ``num_steps`` steps (indices 0 … num_steps − 1).

    Attributes:
        betas: per-step betas.
        timesteps: the value fed to the network's time embedding for each step: the
            base-chain index, so a network trained on the full chain and one trained on a
            resampled chain see the same embedding at the same noise level.
    """

    betas: torch.Tensor
    timesteps: torch.Tensor

    def __post_init__(self):
        self.betas = self.betas.double()
        self.alphas = 1 - self.betas
        self.alpha_bar = torch.cumprod(self.alphas, 0)
        self.alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar[:-1]])
        # q(x_{t-1} | x_t, x0) = N(coef_x0 * x0 + coef_xt * x_t, posterior_variance)
        self.posterior_variance = self.betas * (1 - self.alpha_bar_prev) / (1 - self.alpha_bar)
        self.posterior_coef_x0 = self.betas * self.alpha_bar_prev.sqrt() / (1 - self.alpha_bar)
        self.posterior_coef_xt = (1 - self.alpha_bar_prev) * self.alphas.sqrt() / (1 - self.alpha_bar)
        # per-device copies, made once: a host-to-device copy per call would synchronise every step on a GPU
        self._device_copies: dict[tuple[str, torch.device], torch.Tensor] = {}

    def on_device(self, name: str, device: torch.device) -> torch.Tensor:
        """The per-step tensor ``name`` (``alpha_bar``, ``timesteps``, ...) on ``device``, copied there once."""
        key = (name, device)
        if key not in self._device_copies:
            self._device_copies[key] = getattr(self, name).to(device)
        return self._device_copies[key]

    def _at(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return value_at_steps(self.on_device(name, like.device), t, like)

    @property
    def num_steps(self) -> int:
        """Number of steps in the chain."""
        return len(self.betas)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Forward noising ``sqrt(ab_t) x0 + sqrt(1 − ab_t) eps`` (t per batch element)."""
        ab = self._at("alpha_bar", t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """``(x_t − sqrt(1 − ab_t) eps) / sqrt(ab_t)``."""
        ab = self._at("alpha_bar", t, x_t)
        return (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()

    def eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """``(x_t − sqrt(ab_t) x0) / sqrt(1 − ab_t)``."""
        ab = self._at("alpha_bar", t, x_t)
        return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()

    def posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of ``q(x_{t−1} | x_t, x0)``."""
        mean = self._at("posterior_coef_x0", t, x_t) * x0 + self._at("posterior_coef_xt", t, x_t) * x_t
        return mean, self._at("posterior_variance", t, x_t)

    def embed_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Network time-embedding values for chain indices ``t``."""
        return self.on_device("timesteps", t.device)[t]


def schedule_of(cfg: ScheduleConfig, num_steps: int | None = None) -> DiffusionSchedule:
    """The chain a method's ``method.schedule`` describes, resampled to ``num_steps`` (K) when given."""
    return make_schedule(cfg.beta_schedule, cfg.base_steps, cfg.beta_start, cfg.beta_end, num_steps)


def make_schedule(kind: str = "linear", base_steps: int = 1001, beta_start: float = 1e-4, beta_end: float = 0.02,
                  num_steps: int | None = None) -> DiffusionSchedule:
    """A base schedule of ``base_steps`` steps, resampled to ``num_steps`` (K) when given."""
    betas = beta_schedule(kind, base_steps, beta_start, beta_end)
    betas, kept = resample_betas(betas, num_steps or base_steps)
    return DiffusionSchedule(betas, kept)
