"""Reverse steps (DDPM, DDIM) on a :class:`DiffusionSchedule`, given the model's x0 estimate.

Samplers take ``x0_hat``; a noise-predicting model converts first with
``schedule.x0_from_eps``. On a resampled K-step chain the DDPM step is the exact posterior
of that chain, not a skipped step of a longer one.
"""

from __future__ import annotations

from typing import Callable

import torch

from imgx3d.diffusion.schedule import DiffusionSchedule, value_at_steps


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def ddpm_step(schedule: DiffusionSchedule, x_t: torch.Tensor, t: int, x0_hat: torch.Tensor,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample ``x_{t−1} ~ q(x_{t−1} | x_t, x0_hat)``; at t = 0 the mean (= x0_hat) is returned."""
    tt = torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device)
    mean, variance = schedule.posterior(x0_hat, x_t, tt)
    if t == 0:
        return mean
    return mean + variance.sqrt() * _noise_like(x_t, generator)


def ddim_step(schedule: DiffusionSchedule, x_t: torch.Tensor, t: int, x0_hat: torch.Tensor, eta: float = 0.0,
              generator: torch.Generator | None = None, t_prev: int | None = None) -> torch.Tensor:
    """DDIM step from chain index t to ``t_prev`` (default t − 1; eta = 0: deterministic).

    ``t_prev`` < t − 1 is DDIM's strided sampling on a long chain (SDSeg's multi-step mode),
    where skipping steps is what DDIM is designed for (unlike DDPM's posterior, see
    :func:`ddpm_step`). ``t_prev = -1`` returns ``x0_hat``.
    """
    t_prev = t - 1 if t_prev is None else t_prev
    if t_prev < 0:
        return x0_hat
    tt = torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device)
    eps = schedule.eps_from_x0(x_t, tt, x0_hat)
    alpha_bar = schedule.on_device("alpha_bar", x_t.device)
    ab = value_at_steps(alpha_bar, tt, x_t)
    ab_prev = value_at_steps(alpha_bar, torch.full_like(tt, t_prev), x_t)
    sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
    x_prev = ab_prev.sqrt() * x0_hat + (1 - ab_prev - sigma**2).clamp(min=0).sqrt() * eps
    if eta > 0:
        x_prev = x_prev + sigma * _noise_like(x_t, generator)
    return x_prev


def ddim_timesteps(schedule: DiffusionSchedule, n: int) -> list[tuple[int, int]]:
    """DDIM's strided step list: ``n`` chain indices evenly spaced from ``num_steps − 1`` down to 0
    (rounded), each paired with the next one (``-1`` after the last: that step returns ``x0_hat``).

    Example: a 1000-step schedule, ``n = 4`` → ``[(999, 666), (666, 333), (333, 0), (0, -1)]``.
    """
    steps = torch.linspace(schedule.num_steps - 1, 0, n).round().long().tolist()
    return list(zip(steps, [*steps[1:], -1]))


def ddim_sample(schedule: DiffusionSchedule, x_T: torch.Tensor, predict_x0: Callable[[torch.Tensor, torch.Tensor],
                torch.Tensor], n: int) -> torch.Tensor:
    """Deterministic DDIM (eta 0) over the ``n`` strided steps of :func:`ddim_timesteps`.

    Args:
        predict_x0: ``(x_t, t) -> x0_hat`` with ``t`` a ``(B,)`` long tensor on ``x_T``'s device.

    Returns:
        ``x_0`` (the last step's ``x0_hat``).
    """
    x = x_T
    for t, t_prev in ddim_timesteps(schedule, n):
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        x = ddim_step(schedule, x, t, predict_x0(x, tt), t_prev=t_prev)
    return x


def sample(schedule: DiffusionSchedule, predict_x0: Callable[[torch.Tensor, int], torch.Tensor], x_T: torch.Tensor,
           sampler: str = "ddpm", eta: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Run the chain from ``x_T`` (index num_steps − 1) down to x0.

    Args:
        predict_x0: ``(x_t, t) -> x0_hat`` for chain index t.
        sampler: ``ddpm`` or ``ddim``.

    Returns:
        The last ``x0_hat`` (the model's clean estimate at t = 0).
    """
    x_t = x_T
    x0_hat = x_T
    for t in reversed(range(schedule.num_steps)):
        x0_hat = predict_x0(x_t, t)
        if t == 0:  # the chain's end: x0_hat is the result (a last step's x_{-1} would go unused)
            break
        if sampler == "ddpm":
            x_t = ddpm_step(schedule, x_t, t, x0_hat, generator)
        else:
            x_t = ddim_step(schedule, x_t, t, x0_hat, eta, generator)
    return x0_hat
