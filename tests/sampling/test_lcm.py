"""The ``lcm`` sampler (latent consistency models' multistep sampling) against diffusers'
LCMScheduler, step by step with the same random stream, and its configuration."""

from __future__ import annotations

import pytest
import torch
from diffusers import LCMScheduler

from fastdiff.sampling import NoiseSchedule, make_plan, run_plan, sample
from fastdiff.sampling.config import default_sampler
from tests.sampling.helpers import (
    SD_BETAS,
    assert_trajectories_match,
    our_trajectory,
    run_diffusers,
    toy_model,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers + numpy 2


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("steps", [1, 2, 4, 8, 50])
def test_lcm_matches_diffusers(prediction_type, steps):
    config = dict(SD_BETAS, beta_schedule="scaled_linear", prediction_type=prediction_type)
    reference = LCMScheduler(**config)
    reference.set_timesteps(steps)
    schedule = NoiseSchedule.from_config(dict(reference.config))
    plan = make_plan(schedule, "lcm", steps)
    assert torch.equal(plan.timesteps, reference.timesteps)
    assert plan.init_noise_scale == 1.0 == float(reference.init_noise_sigma)
    assert plan.stochastic == (steps > 1)  # fresh noise after every step but the last
    x_T = torch.randn(2, 3, 4)
    theirs, _, peaks = run_diffusers(reference, x_T, generator=torch.Generator().manual_seed(5))
    ours = our_trajectory(x_T, schedule, "lcm", steps, seed=5)
    assert_trajectories_match(ours, theirs, peaks, f"lcm/{prediction_type}/{steps}")


@pytest.mark.parametrize(
    "keys",
    [
        {"original_inference_steps": 25},  # another distillation schedule: other timesteps
        {"timestep_scaling": 4.0},  # other boundary-condition weights
        {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    ],
)
def test_lcm_config_keys_match_diffusers(keys):
    reference = LCMScheduler(**{**SD_BETAS, "beta_schedule": "scaled_linear", **keys})
    reference.set_timesteps(6)
    schedule = NoiseSchedule.from_config({"_class_name": "LCMScheduler", **keys})
    default = make_plan(NoiseSchedule.from_config({"_class_name": "LCMScheduler"}), "lcm", 6)
    plan = make_plan(schedule, "lcm", 6)
    assert torch.equal(plan.timesteps, reference.timesteps)
    assert not torch.equal(plan.coefficients, default.coefficients)
    x_T = torch.randn(2, 5)
    theirs, _, peaks = run_diffusers(reference, x_T, generator=torch.Generator().manual_seed(1))
    ours = our_trajectory(x_T, schedule, "lcm", 6, seed=1)
    assert_trajectories_match(ours, theirs, peaks, str(keys))


def test_an_lcm_folder_defaults_to_the_lcm_sampler_and_round_trips():
    config = {"_class_name": "LCMScheduler", **LCMScheduler(original_inference_steps=30).config}
    assert default_sampler(config) == "lcm"
    schedule = NoiseSchedule.from_config(config)
    assert schedule.original_inference_steps == 30 and schedule.timestep_scaling == 10.0
    again = NoiseSchedule.from_config(schedule.to_config())
    assert torch.equal(
        make_plan(again, "lcm", 4).coefficients, make_plan(schedule, "lcm", 4).coefficients
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(original_inference_steps=0), "original_inference_steps must be an integer"),
        (dict(original_inference_steps=2.5), "original_inference_steps must be an integer"),
        (dict(original_inference_steps=1001), "original_inference_steps must be an integer"),
        (dict(timestep_scaling=0.0), "timestep_scaling must be a positive number"),
        (dict(timestep_scaling="10"), "timestep_scaling must be a positive number"),
    ],
)
def test_bad_lcm_keys_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NoiseSchedule(**SD_BETAS, beta_schedule="scaled_linear", **kwargs)


def test_lcm_refuses_more_steps_than_its_distillation_schedule_and_eta():
    schedule = NoiseSchedule(**SD_BETAS, beta_schedule="scaled_linear", original_inference_steps=8)
    with pytest.raises(ValueError, match="at most original_inference_steps=8 steps"):
        make_plan(schedule, "lcm", 9)
    with pytest.raises(ValueError, match="eta applies to the 'ddim' and 'tcd'"):
        sample(lambda x, t: x, torch.randn(1, 2), schedule, "lcm", 4, eta=0.5)


@pytest.mark.parametrize("steps, strength", [(4, 0.5), (4, 0.08), (3, 0.99), (1, 0.3)])
def test_lcm_strength_matches_diffusers(steps, strength):
    """LCMScheduler.set_timesteps(strength=s): the steps within the first int(50 s) timesteps
    of the distillation schedule (LatentConsistencyModelImg2ImgPipeline)."""
    reference = LCMScheduler(**SD_BETAS, beta_schedule="scaled_linear")
    reference.set_timesteps(steps, strength=strength)
    schedule = NoiseSchedule.from_config({"_class_name": "LCMScheduler"})
    plan = make_plan(schedule, "lcm", steps, lcm_strength=strength)
    assert torch.equal(plan.timesteps, reference.timesteps)
    x_T = torch.randn(2, 5)
    theirs, _, peaks = run_diffusers(reference, x_T, generator=torch.Generator().manual_seed(2))
    ours = []
    generator = torch.Generator().manual_seed(2)
    run_plan(toy_model, x_T, plan, generator, callback=lambda i, t, x: ours.append(x))
    assert_trajectories_match(ours, theirs, peaks, f"lcm strength {strength}")


def test_lcm_strength_is_refused_where_it_cannot_apply():
    schedule = NoiseSchedule(**SD_BETAS, beta_schedule="scaled_linear")
    with pytest.raises(ValueError, match="keeps 2 of .* fewer than the 4 steps"):
        make_plan(schedule, "lcm", 4, lcm_strength=0.05)
    with pytest.raises(
        ValueError, match="lcm_strength applies to the 'lcm' and 'tcd' samplers only"
    ):
        make_plan(schedule, "ddim", 4, lcm_strength=0.5)


def test_lcm_timesteps_refuse_a_distillation_schedule_longer_than_the_table():
    from fastdiff.sampling.spacing import lcm_timesteps

    with pytest.raises(ValueError, match=r"must lie in \[1, num_train_timesteps=999\], got 1000"):
        lcm_timesteps(999, 2, 1000)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
def test_tcd_matches_diffusers(prediction_type, steps, gamma):
    """TCDScheduler (eta = gamma): LCM's timesteps, the jump to floor((1 - gamma) t') and, with
    gamma > 0, fresh noise back up to t'; the last step ends at alphā_0's level."""
    from diffusers import TCDScheduler

    reference = TCDScheduler(
        **SD_BETAS, beta_schedule="scaled_linear", prediction_type=prediction_type
    )
    reference.set_timesteps(steps)
    schedule = NoiseSchedule.from_config({"_class_name": "TCDScheduler", **reference.config})
    plan = make_plan(schedule, "tcd", steps, gamma)
    assert torch.equal(plan.timesteps, reference.timesteps)
    assert plan.stochastic == (gamma > 0 and steps > 1)
    x_T = torch.randn(2, 3, 4)
    generator = torch.Generator().manual_seed(5)
    theirs, _, peaks = run_diffusers(reference, x_T, generator=generator, eta=gamma)
    ours = []
    run_plan(toy_model, x_T, plan, torch.Generator().manual_seed(5), lambda i, t, x: ours.append(x))
    assert_trajectories_match(ours, theirs, peaks, f"tcd/{prediction_type}/{steps}/{gamma}")


@pytest.mark.parametrize("original, steps", [(333, 20), (1000, 11)])
def test_tcd_rounds_the_jump_timestep_as_diffusers(original, steps):
    """floor((1 - gamma) t') in float32, as TCDScheduler computes it: with an odd k the float64
    product can land on the other side of an integer."""
    from diffusers import TCDScheduler

    config = dict(SD_BETAS, beta_schedule="scaled_linear", original_inference_steps=original)
    reference = TCDScheduler(**config)
    reference.set_timesteps(steps)
    schedule = NoiseSchedule.from_config({"_class_name": "TCDScheduler", **reference.config})
    plan = make_plan(schedule, "tcd", steps, 0.3)
    x_T = torch.randn(2, 5)
    generator = torch.Generator().manual_seed(1)
    theirs, _, peaks = run_diffusers(reference, x_T, generator=generator, eta=0.3)
    ours = []
    run_plan(toy_model, x_T, plan, torch.Generator().manual_seed(1), lambda i, t, x: ours.append(x))
    assert_trajectories_match(ours, theirs, peaks, f"tcd k={1000 // original}")


def test_a_tcd_folder_defaults_to_tcd():
    assert default_sampler({"_class_name": "TCDScheduler"}) == "tcd"
    with pytest.raises(ValueError, match="eta must lie in"):
        make_plan(NoiseSchedule.from_config({"_class_name": "TCDScheduler"}), "tcd", 4, 1.5)
