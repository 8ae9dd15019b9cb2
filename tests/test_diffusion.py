"""Schedules and samplers: the K = 5 values of METHODS.md, exact posteriors, exact K-step chains."""

import pytest
import torch

from imgx3d.diffusion.sampler import (
    ddim_sample,
    ddim_step,
    ddim_timesteps,
    ddpm_step,
    sample,
)
from imgx3d.diffusion.schedule import beta_schedule, make_schedule
from imgx3d.errors import ConfigError


def test_k5_resampling_matches_the_paper():
    s = make_schedule("linear", base_steps=1001, beta_start=1e-4, beta_end=0.02, num_steps=5)
    expected_ab = [0.9999, 0.5218, 0.0780, 0.00332, 4.0e-5]
    expected_beta = [1e-4, 0.478, 0.851, 0.957, 0.988]
    for got, want in zip(s.alpha_bar.tolist(), expected_ab):
        assert got == pytest.approx(want, rel=5e-3)
    for got, want in zip(s.betas.tolist(), expected_beta):
        assert got == pytest.approx(want, rel=5e-3)
    assert s.timesteps.tolist() == [0, 250, 500, 750, 1000]
    full = make_schedule("linear", 1001, 1e-4, 0.02)
    assert torch.allclose(s.alpha_bar, full.alpha_bar[::250])  # first and last alpha_bar kept


def test_invalid_k_is_a_clear_error():
    with pytest.raises(ConfigError, match="divisible"):
        make_schedule("linear", 1001, num_steps=7)  # 1000 / 6 is not an integer
    with pytest.raises(ConfigError, match="unknown beta schedule"):
        beta_schedule("quadratic", 10)


def test_ddpm_step_is_the_hand_computed_posterior():
    s = make_schedule("linear", 1001, 1e-4, 0.02, num_steps=5)
    x0, x_t = torch.tensor([[0.7]], dtype=torch.float64), torch.tensor([[-0.4]], dtype=torch.float64)
    t = 2
    ab_t, ab_prev, beta = 0.0779923231880791, 0.5217501364750304, 1 - 0.0779923231880791 / 0.5217501364750304
    mean = (ab_prev**0.5 * beta / (1 - ab_t)) * 0.7 + ((1 - beta) ** 0.5 * (1 - ab_prev) / (1 - ab_t)) * -0.4
    variance = beta * (1 - ab_prev) / (1 - ab_t)
    noise = torch.randn((1, 1), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = ddpm_step(s, x_t, t, x0, torch.Generator().manual_seed(3))
    assert got.item() == pytest.approx(mean + variance**0.5 * noise.item(), rel=1e-10)
    assert ddpm_step(s, x_t, 0, x0).item() == pytest.approx(0.7)  # t = 0: the mean, which is x0


def test_ddim_eta0_step():
    s = make_schedule("linear", 1001, num_steps=5)
    x0, x_t = torch.tensor([[0.3]], dtype=torch.float64), torch.tensor([[1.1]], dtype=torch.float64)
    ab, ab_prev = s.alpha_bar[3].item(), s.alpha_bar[2].item()
    eps = (1.1 - ab**0.5 * 0.3) / (1 - ab) ** 0.5
    assert ddim_step(s, x_t, 3, x0).item() == pytest.approx(ab_prev**0.5 * 0.3 + (1 - ab_prev) ** 0.5 * eps)


@pytest.mark.parametrize("t", [1, 2, 3, 4])
def test_k_step_ddpm_is_exact_not_a_skipped_step(t):
    """With the true x0, one resampled DDPM step maps q(x_t | x0) onto q(x_{t-1} | x0) exactly."""
    s = make_schedule("linear", 1001, num_steps=5)
    gen = torch.Generator().manual_seed(t)
    x0 = torch.full((400_000, 1), 0.8, dtype=torch.float64)
    x_t = s.q_sample(x0, torch.full((len(x0),), t), torch.randn(x0.shape, generator=gen, dtype=torch.float64))
    x_prev = ddpm_step(s, x_t, t, x0, gen)
    ab_prev = s.alpha_bar[t - 1].item()
    assert x_prev.mean().item() == pytest.approx(ab_prev**0.5 * 0.8, abs=5e-3)
    assert x_prev.var().item() == pytest.approx(1 - ab_prev, abs=5e-3)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sample_runs_the_hand_computed_chain_from_t4_down_to_t0(sampler):
    """The model's answer depends on x_t, so a wrong step order, formula or count changes what it sees."""
    s = make_schedule("linear", 1001, num_steps=5)
    ab = s.alpha_bar.double()
    x_T = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def model(x_t: torch.Tensor, t: int) -> torch.Tensor:
        return 0.5 * x_t + 0.1 * (t + 1)

    seen: list[tuple[int, torch.Tensor]] = []
    out = sample(s, lambda x_t, t: seen.append((t, x_t.clone())) or model(x_t, t), x_T, sampler,
                 generator=torch.Generator().manual_seed(0))

    noise = torch.Generator().manual_seed(0)
    x_t, expected = x_T, []
    for t in (4, 3, 2, 1, 0):
        expected.append((t, x_t))
        x0 = model(x_t, t)
        if t == 0:
            break
        a_t, a_prev = ab[t], ab[t - 1]
        if sampler == "ddim":  # eta = 0: x_{t-1} = sqrt(a') x0 + sqrt(1 - a') eps
            eps = (x_t - a_t.sqrt() * x0) / (1 - a_t).sqrt()
            x_t = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        else:  # the posterior q(x_{t-1} | x_t, x0) of the 5-step chain, with the generator's noise
            beta = 1 - a_t / a_prev
            mean = a_prev.sqrt() * beta / (1 - a_t) * x0 + (1 - beta).sqrt() * (1 - a_prev) / (1 - a_t) * x_t
            x_t = mean + (beta * (1 - a_prev) / (1 - a_t)).sqrt() * torch.randn(x_t.shape, generator=noise,
                                                                                 dtype=torch.float64)
    assert [t for t, _ in seen] == [4, 3, 2, 1, 0]
    for (t, got), (_, want) in zip(seen, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9, msg=f"x_t seen at t={t}")
    torch.testing.assert_close(out, model(expected[-1][1], 0))
    assert not torch.allclose(seen[1][1], seen[0][1]), "the chain moved"


def test_diffusion_arithmetic_runs_in_fp32_for_bf16_inputs():
    """Under autocast the latent methods' x0 and noise arrive in bf16; z_t must not be quantised."""
    s = make_schedule("linear", 1000)
    t = torch.arange(0, 1000, 5)  # 200 steps, the small t values included
    x0 = (torch.linspace(-1, 1, 200)[:, None] * torch.ones(1, 8)).bfloat16()
    noise = torch.randn(200, 8, generator=torch.Generator().manual_seed(0)).bfloat16()
    z_t = s.q_sample(x0, t, noise)
    assert z_t.dtype == torch.float32
    ab = s.alpha_bar[t].float()[:, None]
    torch.testing.assert_close(z_t, ab.sqrt() * x0.float() + (1 - ab).sqrt() * noise.float())
    assert bool(torch.all((z_t - x0.float()).abs().amax(1) > 0)), "every t adds noise"
    eps = s.eps_from_x0(z_t.bfloat16(), t, x0)
    assert eps.dtype == torch.float32 and s.x0_from_eps(z_t.bfloat16(), t, eps.bfloat16()).dtype == torch.float32
    mean, variance = s.posterior(x0, z_t.bfloat16(), t)
    assert mean.dtype == variance.dtype == torch.float32
    assert s.q_sample(x0.double(), t, noise.double()).dtype == torch.float64, "fp64 stays fp64"


def test_ddim_timesteps_are_the_strided_list_paired_with_the_next_step():
    schedule = make_schedule("linear", 1000)
    assert ddim_timesteps(schedule, 4) == [(999, 666), (666, 333), (333, 0), (0, -1)]
    assert ddim_timesteps(schedule, 1) == [(999, -1)], "one step: straight to x0_hat"
    assert [t for t, _ in ddim_timesteps(make_schedule("linear", 10), 10)] == list(range(9, -1, -1))


def test_ddim_sample_equals_the_step_by_step_loop():
    schedule = make_schedule("scaled_linear", 50)
    gen = torch.Generator().manual_seed(3)
    x_T = torch.randn(2, 3, 4, 4, generator=gen)

    def predict_x0(x, t):  # a non-trivial stand-in model: depends on x and t
        return torch.tanh(x * 0.7) - 0.01 * t.float()[:, None, None, None]

    x = x_T
    for t in [49, 37, 24, 12, 0]:  # linspace(49, 0, 5) = 49, 36.75, 24.5, 12.25, 0, rounded half to even
        x0_hat = predict_x0(x, torch.full((2,), t))
        if t == 0:
            x = x0_hat
            break
        nxt = {49: 37, 37: 24, 24: 12, 12: 0}[t]
        ab, ab_prev = schedule.alpha_bar[t], schedule.alpha_bar[nxt]
        eps = (x - ab.sqrt() * x0_hat) / (1 - ab).sqrt()
        x = ab_prev.sqrt() * x0_hat + (1 - ab_prev).sqrt() * eps
    torch.testing.assert_close(ddim_sample(schedule, x_T, predict_x0, 5), x, rtol=1e-5, atol=1e-5)
