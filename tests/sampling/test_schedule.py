"""NoiseSchedule against diffusers: tables, timesteps, forward process, config loading."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
)
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

from fastdiff.sampling import BETA_SCHEDULES, NoiseSchedule, make_plan
from tests.sampling.helpers import SD_BETAS

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.mark.parametrize("beta_schedule,zero_snr", itertools.product(BETA_SCHEDULES, [False, True]))
def test_tables_match_diffusers(beta_schedule, zero_snr):
    config = dict(SD_BETAS, beta_schedule=beta_schedule, rescale_betas_zero_snr=zero_snr)
    ours, theirs = NoiseSchedule(**config), DDIMScheduler(**config)
    assert ours.betas.dtype == ours.alphas_cumprod.dtype == torch.float64
    # Bit for bit: the same float32 arithmetic, widened to float64 afterwards.
    assert torch.equal(ours.betas, theirs.betas.double())
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod.double())
    if zero_snr:
        assert float(ours.alphas_cumprod[-1]) == 0.0
        assert float(ours.snr(999)) == 0.0 and float(ours.log_snr(999)) == -math.inf
        # Lin et al. Algorithm 1 keeps the first alphā.
        plain = NoiseSchedule(**dict(config, rescale_betas_zero_snr=False))
        assert float(ours.alphas_cumprod[0]) == pytest.approx(float(plain.alphas_cumprod[0]))


def test_zero_snr_rescale_against_float64_algorithm():
    # Independent of float32 rounding: the same algorithm run in float64 by diffusers' function.
    ours = NoiseSchedule(**SD_BETAS, beta_schedule="scaled_linear", rescale_betas_zero_snr=True)
    base = NoiseSchedule(**SD_BETAS, beta_schedule="scaled_linear").betas
    expected = rescale_zero_terminal_snr(base.clone())
    assert torch.allclose(ours.betas, expected, atol=2e-5, rtol=0)
    assert torch.allclose(ours.alphas_cumprod, torch.cumprod(1 - expected, 0), atol=1e-6, rtol=0)


def test_cosine_schedule_clips_betas():
    schedule = NoiseSchedule(beta_schedule="squaredcos_cap_v2")
    assert float(schedule.betas.max()) == pytest.approx(0.999, abs=1e-6)
    assert float(schedule.betas[0]) < 1e-4


def test_snr_and_log_snr():
    schedule = NoiseSchedule(**SD_BETAS, beta_schedule="scaled_linear")
    t = torch.tensor([0, 10, 500, 999])
    alpha_bar = schedule.alphas_cumprod[t]
    assert torch.allclose(schedule.snr(t), alpha_bar / (1 - alpha_bar))
    assert torch.allclose(schedule.log_snr(t), torch.log(alpha_bar / (1 - alpha_bar)))
    assert bool((schedule.log_snr(torch.arange(1000)).diff() < 0).all())
    with pytest.raises(ValueError, match="integers"):
        schedule.snr(torch.tensor([1.5]))
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        schedule.snr(1000)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_add_noise_matches_diffusers(dtype):
    schedule = NoiseSchedule(**SD_BETAS, beta_schedule="scaled_linear")
    reference = DDPMScheduler(**SD_BETAS, beta_schedule="scaled_linear")
    x0, noise = torch.randn(4, 3, 5, dtype=dtype), torch.randn(4, 3, 5, dtype=dtype)
    t = torch.tensor([0, 250, 700, 999])
    ours = schedule.add_noise(x0, noise, t)
    assert ours.dtype == dtype
    assert torch.allclose(ours, reference.add_noise(x0, noise, t).to(dtype), atol=1e-6)
    assert torch.allclose(
        schedule.velocity(x0, noise, t), reference.get_velocity(x0, noise, t).to(dtype), atol=1e-6
    )
    scalar = schedule.add_noise(x0, noise, 400)
    assert torch.allclose(scalar, schedule.add_noise(x0, noise, torch.full((4,), 400)))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_prediction_conversions_round_trip(prediction_type):
    schedule = NoiseSchedule(prediction_type=prediction_type)
    x0, noise = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    t = torch.tensor([5, 400, 990])
    x_t = schedule.add_noise(x0, noise, t)
    output = schedule.training_target(x0, noise, t)
    assert torch.allclose(schedule.predict_x0(x_t, output, t), x0, atol=1e-9)
    assert torch.allclose(schedule.predict_epsilon(x_t, output, t), noise, atol=1e-9)
    assert torch.allclose(
        schedule.predict_velocity(x_t, output, t), schedule.velocity(x0, noise, t), atol=1e-9
    )


REFERENCE_TIMESTEPS = {
    "ddim": lambda **kw: DDIMScheduler(**kw),
    "ddpm": lambda **kw: DDPMScheduler(**kw),
    "euler": lambda **kw: EulerDiscreteScheduler(**kw),
    "dpmpp_2m": lambda **kw: DPMSolverMultistepScheduler(**kw),
}


@pytest.mark.parametrize(
    "sampler,spacing", itertools.product(REFERENCE_TIMESTEPS, ["leading", "linspace", "trailing"])
)
def test_timesteps_match_diffusers(sampler, spacing):
    for steps, offset in [(1, 0), (4, 1), (7, 0), (20, 1), (50, 1), (999, 0)]:
        config = dict(timestep_spacing=spacing, steps_offset=offset)
        reference = REFERENCE_TIMESTEPS[sampler](**config)
        reference.set_timesteps(steps)
        ours = NoiseSchedule(**config).timesteps(steps, sampler)
        assert ours.dtype == torch.long
        expected = reference.timesteps.double()
        # Euler's linspace points are fractional: keep_fraction gives them as diffusers has
        # them (the model is called at those), the plain call rounds them (see spacing.py).
        kept = NoiseSchedule(**config).timesteps(steps, sampler, keep_fraction=True)
        assert torch.equal(kept, expected), (steps, offset)
        if sampler == "euler":
            assert float((ours - expected).abs().max()) <= 0.5
            expected = expected.round()
        assert torch.equal(ours.double(), expected), (steps, offset)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(beta_schedule="scaled_linear", beta_start=-0.1),  # used to hit sqrt() -> complex
        dict(beta_schedule="linear", beta_end="0.02"),
        dict(beta_schedule="scaled_linear", beta_end=float("nan")),
    ],
)
def test_beta_range_is_checked_by_name(kwargs):
    (key,) = [name for name in kwargs if name.startswith("beta_") and name != "beta_schedule"]
    with pytest.raises(ValueError, match=rf"{key} must be a number in \(0, 1\)"):
        NoiseSchedule(**kwargs)
    # The cosine schedule does not read them.
    NoiseSchedule(beta_schedule="squaredcos_cap_v2", **{key: kwargs[key]})


def test_lookup_validation():
    """Timesteps are integers (not bools) in range, and a t of several entries must match the
    batch: a batch of 1 with 3 timesteps used to be refused, and must stay so (it would
    broadcast to a batch of 3)."""
    schedule = NoiseSchedule()
    x0, noise = torch.randn(1, 4), torch.randn(1, 4)
    with pytest.raises(ValueError, match="t has 3 entries but the batch has 1"):
        schedule.add_noise(x0, noise, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="timesteps must be integers, got dtype torch.bool"):
        schedule.snr(torch.tensor([True, False]))
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 999\]"):
        schedule.snr(torch.tensor([1000]))
    with pytest.raises(ValueError, match="num_train_timesteps must be an integer >= 2, got 1"):
        NoiseSchedule(num_train_timesteps=1)
    for trained in ([0.0, 0.5], [0.5, 1.0]):  # alphā would be 1 or reach 0
        with pytest.raises(ValueError, match=r"betas must lie in \(0, 1\)"):
            NoiseSchedule(num_train_timesteps=2, trained_betas=trained)


def test_timestep_validation():
    schedule = NoiseSchedule(timestep_spacing="leading", steps_offset=1)
    for bad in (0, -3, 1001):
        with pytest.raises(ValueError, match=r"steps must be in \[1, num_train_timesteps=1000\]"):
            schedule.timesteps(bad)
    with pytest.raises(ValueError, match="outside"):  # 999 * 1 + offset 1 = 1000
        schedule.timesteps(1000)
    with pytest.raises(ValueError, match="allowed"):
        schedule.timesteps(10, "dpm2")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"beta_schedule": "cosine"}, "linear"),
        ({"prediction_type": "flow"}, "v_prediction"),
        ({"timestep_spacing": "uniform"}, "trailing"),
        ({"trained_betas": [0.1, 0.2]}, "num_train_timesteps"),
        ({"beta_end": 1.5}, r"\(0, 1\)"),
        # Strings from a hand-edited config: "false" used to read as true, and "1" printed as 1.
        ({"set_alpha_to_one": "false"}, "set_alpha_to_one must be true or false, got 'false'"),
        ({"rescale_betas_zero_snr": "false"}, "rescale_betas_zero_snr must be true or false"),
        ({"rescale_betas_zero_snr": None}, "rescale_betas_zero_snr must be true or false"),
        ({"steps_offset": "1"}, "steps_offset must be a non-negative integer, got '1'"),
    ],
)
def test_bad_schedule_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule(**kwargs)


def test_degenerate_zero_snr_schedules_are_named():
    """Extreme linear schedules under the zero-SNR rescale: alphā underflowing to 0 early made
    NaN betas (then a ZeroDivisionError in the plans), and a noise level that rises at the
    clamped last step made the stochastic samplers fail with "math domain error"."""
    with pytest.raises(ValueError, match="reaches 0 in float32 at t = 979, before the last"):
        NoiseSchedule(beta_start=0.002, beta_end=0.2, rescale_betas_zero_snr=True)
    schedule = NoiseSchedule(
        beta_start=0.001, beta_end=0.05, rescale_betas_zero_snr=True, timestep_spacing="linspace"
    )
    for sampler in ("euler_ancestral", "dpmpp_2m_sde"):
        with pytest.raises(ValueError, match=f"{sampler}: the noise level rises from sigma 4096"):
            make_plan(schedule, sampler, steps=7)
    # The deterministic samplers take the same levels as diffusers does, finite.
    for sampler in ("euler", "dpmpp_2m"):
        assert bool(torch.isfinite(make_plan(schedule, sampler, steps=7).coefficients).all())


def test_trained_betas():
    betas = torch.linspace(1e-4, 0.02, 1000)
    assert torch.allclose(
        NoiseSchedule(trained_betas=betas.tolist()).alphas_cumprod,
        NoiseSchedule().alphas_cumprod,
    )
