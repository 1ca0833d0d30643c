"""DDPM, Euler ancestral and DDIM with eta > 0: exact agreement with diffusers when fed the same
random stream, and statistics against cases with a known answer.

Known answers. For data that is a point mass at mu, the optimal noise predictor is exactly
eps(x_t, t) = (x_t - sqrt(alphā_t) mu) / sqrt(1 - alphā_t), and then every DDIM(eta) and DDPM
step samples the true posterior, so each visited state is distributed as the forward marginal
N(sqrt(alphā_t') mu, 1 - alphā_t') (Song et al. 2021, Lemma 1), and for DDPM consecutive states
have the forward process' covariance sqrt(alphā_t / alphā_t') (1 - alphā_t'). For DDIM the lag-one
covariance is sqrt(1 - alphā_t' - sigma^2) sqrt(1 - alphā_t), sigma from Eq. 16 of the paper.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
)

from fastdiff.sampling import NoiseSchedule, make_plan, sample
from tests.sampling.helpers import (
    SD_BETAS,
    assert_trajectories_match,
    our_trajectory,
    run_diffusers,
    scheduler_config,
    toy_model,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers + numpy 2

SAMPLES = 40_000


@pytest.mark.parametrize(
    "spacing,prediction_type,zero_snr",
    [
        ("leading", "epsilon", False),
        ("trailing", "v_prediction", True),
        ("linspace", "sample", False),
    ],
)
def test_ddpm_matches_diffusers_with_same_noise(spacing, prediction_type, zero_snr):
    config = scheduler_config(spacing, prediction_type, zero_snr)
    reference = DDPMScheduler(**config, clip_sample=False, variance_type="fixed_small")
    reference.set_timesteps(10)
    x_T = torch.randn(2, 3, 4)
    theirs, _, peaks = run_diffusers(reference, x_T, generator=torch.Generator().manual_seed(7))
    ours = our_trajectory(x_T, NoiseSchedule(**config), "ddpm", 10, seed=7)
    assert_trajectories_match(ours, theirs, peaks)


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("steps", [10, 20])
def test_euler_ancestral_matches_diffusers_with_same_noise(
    spacing, prediction_type, zero_snr, steps
):
    """EulerAncestralDiscreteScheduler (which has no sample-prediction mode) fed the same
    random stream. Started from the same state: for linspace/trailing diffusers' own start is
    sigma_max * x_T, fastdiff's sqrt(sigma_max^2 + 1) * x_T, as for plain Euler. linspace:
    integral timesteps at 10 steps (999 / 9 = 111), fractional ones at 20."""
    config = scheduler_config(spacing, prediction_type, zero_snr)
    reference = EulerAncestralDiscreteScheduler(**config)
    reference.set_timesteps(steps)
    schedule = NoiseSchedule(**config)
    plan = make_plan(schedule, "euler_ancestral", steps)
    assert torch.equal(plan.timesteps.float(), reference.timesteps) and plan.stochastic
    x_T = torch.randn(2, 3, 4)
    theirs, _, peaks = run_diffusers(
        reference, x_T * plan.init_noise_scale, generator=torch.Generator().manual_seed(5)
    )
    ours = our_trajectory(x_T, schedule, "euler_ancestral", steps, seed=5)
    assert_trajectories_match(ours, theirs, peaks)
    # The noise matters: another seed gives another sample.
    generator = torch.Generator().manual_seed(6)
    other = sample(toy_model, x_T, schedule, "euler_ancestral", steps, generator=generator)
    assert float((other - ours[-1]).abs().max()) > 1e-2


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("karras", [False, True], ids=["spaced", "karras"])
@pytest.mark.parametrize("steps", [1, 2, 10])
def test_kdpm2_ancestral_matches_diffusers_with_same_noise(spacing, prediction_type, karras, steps):
    """KDPM2AncestralDiscreteScheduler fed the same random stream, call by call: noise is drawn
    at each step's second call only (its first is the Euler step to the midpoint, which for
    this split of a step is the next level itself: its timesteps repeat the steps')."""
    config = scheduler_config(spacing, prediction_type)
    del config["rescale_betas_zero_snr"]  # not a KDPM2AncestralDiscreteScheduler argument
    reference = KDPM2AncestralDiscreteScheduler(**config, use_karras_sigmas=karras)
    reference.set_timesteps(steps)
    schedule = NoiseSchedule(**config)
    sampler = "kdpm2_ancestral_karras" if karras else "kdpm2_ancestral"
    plan = make_plan(schedule, sampler, steps)
    assert len(plan) == 2 * steps - 1 and plan.stochastic == (steps > 1)
    # (the midpoints' timesteps: float32 in diffusers, float64 here; 1e-6 of a timestep near 0)
    torch.testing.assert_close(
        plan.timesteps.double(), reference.timesteps.double(), rtol=1e-6, atol=1e-6
    )
    # As for Heun: the second call's row is written in the midpoint state, and at 2 steps to
    # t = 0 its weights (sigma - sigma_down) / s reach 500, which multiply the float32 rounding
    # of the x0 estimates (diffusers steps from its stored state): compared in float64 there.
    x_T = torch.randn(2, 3, 4, dtype=torch.float64 if steps == 2 else torch.float32)
    theirs, _, peaks = run_diffusers(
        reference, x_T * plan.init_noise_scale, generator=torch.Generator().manual_seed(5)
    )
    ours = our_trajectory(x_T, schedule, sampler, steps, seed=5)
    assert_trajectories_match(ours, theirs, peaks, f"{sampler} {spacing} {steps}")
    if steps > 1:  # the noise matters: another seed gives another sample
        generator = torch.Generator().manual_seed(6)
        other = sample(toy_model, x_T, schedule, sampler, steps, generator=generator)
        assert float((other - ours[-1]).abs().max()) > 1e-2


def test_sde_step_noise_is_drawn_in_float32_as_diffusers_draws_it():
    """DPMSolverMultistepScheduler draws its SDE noise in float32 whatever the latents' dtype:
    float64 latents get the float32 stream (a float64 draw is another stream)."""
    config = dict(SD_BETAS, beta_schedule="scaled_linear", timestep_spacing="leading")
    reference = DPMSolverMultistepScheduler(**config, algorithm_type="sde-dpmsolver++")
    reference.set_timesteps(6)
    x_T = torch.randn(2, 4, 4, dtype=torch.float64)
    theirs, _, peaks = run_diffusers(reference, x_T, generator=torch.Generator().manual_seed(4))
    ours = []
    result = sample(
        toy_model,
        x_T,
        NoiseSchedule(**config),
        "dpmpp_2m_sde",
        6,
        generator=torch.Generator().manual_seed(4),
        callback=lambda i, t, x: ours.append(x),
    )
    assert result.dtype == torch.float64
    assert_trajectories_match(ours, theirs, peaks)


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize(
    "spacing,prediction_type,zero_snr,steps",
    [
        ("leading", "epsilon", False, 10),
        ("trailing", "v_prediction", True, 12),
        ("linspace", "sample", False, 3),
        ("linspace", "epsilon", False, 1),
        ("linspace", "epsilon", False, 20),  # third order from the third step to the last but one
    ],
)
def test_dpmpp_sde_matches_diffusers_with_same_noise(
    spacing, prediction_type, zero_snr, steps, karras, order
):
    """SDE-DPM-Solver++(2M) and (3M) against DPMSolverMultistepScheduler(algorithm_type=
    "sde-dpmsolver++", solver_order=2 or 3), which draws its step noise in float32 from the
    generator."""
    config = scheduler_config(spacing, prediction_type, zero_snr)
    reference = DPMSolverMultistepScheduler(
        **config, algorithm_type="sde-dpmsolver++", solver_order=order, use_karras_sigmas=karras
    )
    reference.set_timesteps(steps)
    reference.set_begin_index(0)  # Karras timesteps can repeat (see test_samplers_vs_diffusers)
    sampler = f"dpmpp_{order}m_sde" + ("_karras" if karras else "")
    schedule = NoiseSchedule(**config)
    plan = make_plan(schedule, sampler, steps)
    assert torch.equal(plan.timesteps, reference.timesteps) and plan.stochastic == (steps > 1)
    x_T = torch.randn(2, 3, 4)
    theirs, _, peaks = run_diffusers(reference, x_T, generator=torch.Generator().manual_seed(9))
    ours = our_trajectory(x_T, schedule, sampler, steps, seed=9)
    assert_trajectories_match(ours, theirs, peaks)
    if steps > 1:  # the noise matters
        other = sample(
            toy_model, x_T, schedule, sampler, steps, generator=torch.Generator().manual_seed(1)
        )
        assert float((other - ours[-1]).abs().max()) > 1e-3


@pytest.mark.parametrize("eta,set_alpha_to_one", [(0.5, True), (1.0, False)])
def test_ddim_eta_matches_diffusers_with_same_noise(eta, set_alpha_to_one):
    config = dict(SD_BETAS, beta_schedule="scaled_linear", steps_offset=1)
    reference = DDIMScheduler(**config, clip_sample=False, set_alpha_to_one=set_alpha_to_one)
    reference.set_timesteps(10)
    x_T = torch.randn(2, 3, 4)
    theirs, _, peaks = run_diffusers(
        reference, x_T, generator=torch.Generator().manual_seed(3), eta=eta
    )
    schedule = NoiseSchedule(**config, set_alpha_to_one=set_alpha_to_one)
    ours = our_trajectory(x_T, schedule, "ddim", 10, seed=3, eta=eta)
    assert_trajectories_match(ours, theirs, peaks)


def test_ddpm_equals_ddim_eta_one_when_timesteps_chain():
    # Posterior q(x_t' | x_t, x0) (Ho et al. Eq. 7) and DDIM with eta = 1 are the same Gaussian
    # when DDIM's previous timestep is the next visited one (leading spacing): two formulas, one
    # distribution, so their means and standard deviations must agree.
    schedule = NoiseSchedule(**SD_BETAS, beta_schedule="scaled_linear", steps_offset=1)
    ddpm = make_plan(schedule, "ddpm", 20).coefficients
    ddim = make_plan(schedule, "ddim", 20, eta=1.0).coefficients
    assert torch.allclose(ddpm, ddim, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(ddim, make_plan(schedule, "ddim", 20, eta=0.5).coefficients)


def _point_mass_model(schedule: NoiseSchedule, mu: float):
    alphas_cumprod = schedule.alphas_cumprod

    def model(x, t):
        alpha_bar = alphas_cumprod[t].to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        return (x - alpha_bar.sqrt() * mu) / (1 - alpha_bar).sqrt()

    return model


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.5), ("ddim", 1.0)])
def test_point_mass_marginals_and_lag_covariance(sampler, eta):
    mu, steps = 0.8, 8
    schedule = NoiseSchedule(**SD_BETAS, beta_schedule="scaled_linear", steps_offset=1)
    plan = make_plan(schedule, sampler, steps, eta)
    alphas_cumprod = schedule.alphas_cumprod.tolist()
    visited = plan.timesteps.tolist()
    generator = torch.Generator().manual_seed(11)
    first = alphas_cumprod[visited[0]]
    x_T = math.sqrt(first) * mu + math.sqrt(1 - first) * torch.randn(
        SAMPLES, 1, dtype=torch.float64, generator=generator
    )
    states = [x_T]
    sample(
        _point_mass_model(schedule, mu),
        x_T,
        schedule,
        sampler,
        steps,
        eta=eta,
        generator=generator,
        callback=lambda i, t, x: states.append(x),
    )
    for index in range(steps - 1):  # the last state is mu exactly
        alpha_bar, alpha_bar_next = (
            alphas_cumprod[visited[index]],
            alphas_cumprod[visited[index + 1]],
        )
        current, following = states[index].flatten(), states[index + 1].flatten()
        variance = 1 - alpha_bar_next
        mean_error = float(following.mean()) - math.sqrt(alpha_bar_next) * mu
        assert abs(mean_error) < 4 * math.sqrt(variance / SAMPLES)
        assert abs(float(following.var()) / variance - 1) < 4 * math.sqrt(2 / SAMPLES)
        if sampler == "ddpm":
            expected_cov = math.sqrt(alpha_bar / alpha_bar_next) * (1 - alpha_bar_next)
        else:
            sigma2 = (
                eta**2 * (1 - alpha_bar_next) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_next)
            )
            expected_cov = math.sqrt(1 - alpha_bar_next - sigma2) * math.sqrt(1 - alpha_bar)
        covariance = float(((current - current.mean()) * (following - following.mean())).mean())
        scale = math.sqrt((1 - alpha_bar) * variance)
        assert abs(covariance - expected_cov) < 5 * scale / math.sqrt(SAMPLES)
    assert torch.allclose(states[-1], torch.full_like(states[-1], mu), atol=1e-9)


def test_ddpm_gaussian_data_reaches_data_distribution():
    # Data N(mu, s^2): the optimal predictor is eps = sqrt(1-ā) (x - sqrt(ā) mu) / (ā s^2 + 1 - ā).
    # 1000 ancestral steps from the exact x_T distribution land on N(mu, s^2) up to the
    # fixed-small-variance discretisation bias (< 1% in std for this schedule).
    mu, s = 0.5, 0.6
    schedule = NoiseSchedule(**SD_BETAS, beta_schedule="scaled_linear")
    alphas_cumprod = schedule.alphas_cumprod

    def model(x, t):
        alpha_bar = alphas_cumprod[t].to(x.dtype).reshape(-1, 1)
        return (
            (1 - alpha_bar).sqrt()
            * (x - alpha_bar.sqrt() * mu)
            / (alpha_bar * s * s + 1 - alpha_bar)
        )

    generator = torch.Generator().manual_seed(5)
    alpha_bar_T = float(alphas_cumprod[-1])
    std_T = math.sqrt(alpha_bar_T * s * s + 1 - alpha_bar_T)
    x_T = math.sqrt(alpha_bar_T) * mu + std_T * torch.randn(10_000, 1, generator=generator)
    result = sample(model, x_T, schedule, "ddpm", 1000, generator=generator).flatten().double()
    assert abs(float(result.mean()) - mu) < 4 * s / math.sqrt(result.numel())
    assert abs(float(result.std()) / s - 1) < 0.01 + 4 / math.sqrt(2 * result.numel())


def test_half_precision_states_are_updated_in_float32():
    """An fp16 state is stepped in fp32 and rounded once at the end (fp16 arithmetic would round
    each product and sum, and drift over a sampling run)."""
    from fastdiff.sampling import apply_plan_row

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=generator).half() * 14
    output = torch.randn(4096, generator=generator).half()
    row = [
        0.0704,
        14.2,
        -13.9,
        0.91,
        0.0831,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
    ]  # an Euler-like step at high sigma
    x_next, x0 = apply_plan_row(row, x, output)
    c0, c1, c2, c3, c4 = row[:5]
    x0_32 = c1 * (c0 * x.float()) + c2 * output.float()
    want = (c3 * x.float() + c4 * x0_32).half()
    assert x_next.dtype == torch.float16
    assert torch.equal(x_next, want) and torch.equal(x0, x0_32.half())
