"""Samplers against their diffusers schedulers built from scheduler configs as folders ship them
and as users edit them (``XScheduler.from_config(config)``, as a diffusers pipeline builds its
scheduler), compared call by call with the same model outputs and noise."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
)

from fastdiff.sampling import SAMPLERS, NoiseSchedule, make_plan
from tests.sampling.helpers import (
    SD_BETAS,
    assert_trajectories_match,
    our_trajectory,
    run_diffusers,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers + numpy 2


@pytest.mark.parametrize(
    "sampler,scheduler_class",
    [
        ("kdpm2_karras", KDPM2DiscreteScheduler),
        ("kdpm2_ancestral_karras", KDPM2AncestralDiscreteScheduler),
    ],
)
@pytest.mark.parametrize(
    "bounds", [{"sigma_min": 0.1, "sigma_max": 10.0}, {"sigma_min": 0.1}, {"sigma_max": 5.0}]
)
def test_kdpm2_karras_levels_take_the_configs_sigma_bounds(sampler, scheduler_class, bounds):
    """A config's sigma_min / sigma_max (Euler's and UniPC's keys; users set them) bound the
    Karras levels of KDPM2DiscreteScheduler and KDPM2AncestralDiscreteScheduler, which read them
    from their config as Euler's, Heun's, UniPC's and DPM-Solver's do: so must fastdiff's."""
    config = {
        **SD_BETAS,
        "_class_name": scheduler_class.__name__,
        "beta_schedule": "scaled_linear",
        "timestep_spacing": "linspace",
        "use_karras_sigmas": True,
        **bounds,
    }
    reference = scheduler_class.from_config(config)
    reference.set_timesteps(6)
    if "sigma_max" in bounds:
        assert float(reference.sigmas[0]) == pytest.approx(bounds["sigma_max"])
    schedule = NoiseSchedule.from_config(config)
    plan = make_plan(schedule, sampler, 6)
    torch.testing.assert_close(
        plan.timesteps.double(), reference.timesteps.double(), rtol=1e-6, atol=1e-6
    )
    x_T = torch.randn(2, 3, 4)
    # (only the ancestral scheduler draws step noise and takes a generator)
    generator = torch.Generator().manual_seed(5) if plan.stochastic else None
    theirs, _, peaks = run_diffusers(reference, x_T * plan.init_noise_scale, generator=generator)
    ours = our_trajectory(x_T, schedule, sampler, 6, seed=5)
    assert_trajectories_match(ours, theirs, peaks, f"{sampler} {bounds}")


@pytest.mark.parametrize("sampler", ["dpmpp_3m", "dpmpp_3m_sde"])
def test_a_written_null_lower_order_final_is_false(sampler):
    """DPMSolverMultistepScheduler tests lower_order_final for truth: a config that writes it
    as null takes a third-order step where the default (true) takes a second-order one, at the
    last step but one of a run under 15 steps. fastdiff reads the null as false, as it reads
    the other flags diffusers tests for truth."""
    config = {
        **SD_BETAS,
        "_class_name": "DPMSolverMultistepScheduler",
        "beta_schedule": "scaled_linear",
        "solver_order": 3,
        "algorithm_type": "sde-dpmsolver++" if "_sde" in sampler else "dpmsolver++",
        "lower_order_final": None,
    }
    reference = DPMSolverMultistepScheduler.from_config(config)
    reference.set_timesteps(6)
    schedule = NoiseSchedule.from_config(config)
    x_T = torch.randn(2, 3, 4)
    generator = torch.Generator().manual_seed(5) if "_sde" in sampler else None
    theirs, _, peaks = run_diffusers(reference, x_T, generator=generator)
    ours = our_trajectory(x_T, schedule, sampler, 6, seed=5)
    assert_trajectories_match(ours, theirs, peaks, f"{sampler} lower_order_final null")
    assert schedule.lower_order_final is False


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_schedule_timesteps_are_the_plans_for_every_sampler(sampler):
    """``NoiseSchedule.timesteps`` (what img2img and denoising_start / denoising_end cut on)
    lists the timesteps the sampler's plan calls the model at, for every sampler: rounded, and
    with ``keep_fraction`` as they are. An SDXL-style config: leading spacing with
    steps_offset 1 (the Karras levels of Euler, Heun, LMS and KDPM2 span those spaced
    timesteps' levels) and a sigma_min (which LMSDiscreteScheduler's Karras levels ignore)."""
    config = {
        **SD_BETAS,
        "beta_schedule": "scaled_linear",
        "timestep_spacing": "leading",
        "steps_offset": 1,
        "sigma_min": 0.1,
        "skip_prk_steps": True,
        "clip_sample": False,
    }
    schedule = NoiseSchedule(**config)
    plan = make_plan(schedule, sampler, 7)
    fractional = schedule.timesteps(7, sampler, keep_fraction=True)
    assert torch.equal(fractional, plan.timesteps.double())
    assert torch.equal(schedule.timesteps(7, sampler), plan.timesteps.double().round().long())
    if sampler.startswith("lms"):  # and those are diffusers' own
        reference = LMSDiscreteScheduler.from_config(
            {**config, "use_karras_sigmas": sampler == "lms_karras"}
        )
        reference.set_timesteps(7)
        assert torch.equal(fractional.float(), reference.timesteps)
