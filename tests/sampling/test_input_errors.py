"""Bad input to the sampling layer gets a ValueError that names the problem: the offending key,
value or shape, or the allowed values. One case per check, each with the input a user could
give."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from fastdiff.sampling import (
    KnownRegion,
    NoiseSchedule,
    SamplingPlan,
    apply_plan_row,
    classifier_free_guidance,
    diffusion_loss,
    make_plan,
    min_snr_weights,
    plan_step,
    run_plan,
    sample,
)
from fastdiff.sampling.plan import restarted_coefficients
from fastdiff.sampling.spacing import euler_spacing_ends, spaced_timesteps

SCHEDULE = NoiseSchedule(skip_prk_steps=True)


def zero_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x)


def zero_conditioned_model(x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
    return torch.zeros_like(x)


# ----------------------------------------------------------------------------- schedule


def test_scheduler_config_that_is_not_a_dict():
    # e.g. a scheduler_config.json that holds a list
    with pytest.raises(ValueError, match="scheduler config must be a dict, got list"):
        NoiseSchedule.from_config([{"beta_schedule": "linear"}])


@pytest.mark.parametrize(
    ("noise_shape", "t", "match"),
    [
        ((2, 4), 10, r"x0 shape \(2, 3\) != noise shape \(2, 4\)"),
        (
            (2, 3),
            torch.tensor([[10], [20]]),
            r"t must be a scalar or a 1-D tensor, got shape \(2, 1\)",
        ),
    ],
    ids=["noise-shape-differs-from-x0", "t-is-2d"],
)
def test_add_noise_refuses(noise_shape, t, match):
    with pytest.raises(ValueError, match=match):
        SCHEDULE.add_noise(torch.zeros(2, 3), torch.zeros(noise_shape), t)


# ----------------------------------------------------------------------------- sample / run_plan


def test_sample_needs_a_noise_schedule_not_a_config_dict():
    with pytest.raises(ValueError, match="schedule must be a NoiseSchedule, got dict"):
        sample(zero_model, torch.zeros(1, 2), SCHEDULE.to_config(), steps=2)


@pytest.mark.parametrize(
    ("x_T", "match"),
    [
        (torch.tensor(0.5), r"x_T must have a batch dimension, got shape \(\)"),
        (torch.zeros(0, 2), r"x_T must have a batch dimension, got shape \(0, 2\)"),
    ],
    ids=["x_T-0-dim", "x_T-empty-batch"],
)
def test_sample_needs_a_batch(x_T, match):
    with pytest.raises(ValueError, match=match):
        sample(zero_model, x_T, SCHEDULE, steps=2)


def test_known_region_needs_the_plans_noise_levels():
    built = make_plan(SCHEDULE, "ddim", 2)
    # A plan put together by hand, without the levels (its documented None)
    by_hand = SamplingPlan(built.sampler, built.timesteps, built.coefficients, 1.0)
    region = KnownRegion(torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match=re.escape("needs the plan's noise levels (plan.alphas")):
        run_plan(zero_model, torch.zeros(1, 1, 2, 2), by_hand, known=region)


# ----------------------------------------------------------------------------- timestep spacing


@pytest.mark.parametrize(
    ("schedule", "sampler", "steps", "kwargs", "match"),
    [
        (SCHEDULE, "ddim", 2.5, {}, "steps must be an integer, got 2.5"),
        (SCHEDULE, "euler", "10", {}, "steps must be an integer, got '10'"),
        (
            # 50 / 29 does not divide evenly: numpy's arange overshoots to 30 points
            NoiseSchedule(num_train_timesteps=50, timestep_spacing="trailing"),
            "ddim",
            29,
            {},
            "trailing spacing produced 30 timesteps for steps=29",
        ),
        (
            NoiseSchedule(num_train_timesteps=10, timestep_spacing="linspace"),
            "dpmpp_2m",
            10,
            {},
            "linspace spacing with steps=10 visits a timestep twice for sampler 'dpmpp_2m'",
        ),
        (SCHEDULE, "lcm", 0, {}, "steps must be a positive integer, got 0"),
        (SCHEDULE, "lcm", 4, {"lcm_strength": 0.0}, r"strength must lie in \(0, 1\], got 0.0"),
        (SCHEDULE, "lcm", 4, {"lcm_strength": 1.5}, r"strength must lie in \(0, 1\], got 1.5"),
    ],
    ids=[
        "fractional-steps",
        "steps-as-string",
        "trailing-steps-overshoot",
        "linspace-steps-repeat-a-timestep",
        "lcm-zero-steps",
        "lcm-strength-zero",
        "lcm-strength-above-one",
    ],
)
def test_make_plan_refuses_step_counts(schedule, sampler, steps, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_plan(schedule, sampler, steps, **kwargs)


@pytest.mark.parametrize(
    "spacing_function",
    [
        lambda: spaced_timesteps(1000, 10, "uniform"),
        lambda: euler_spacing_ends(1000, 10, "uniform"),
    ],
    ids=["spaced_timesteps-unknown-spacing", "euler_spacing_ends-unknown-spacing"],
)
def test_spacing_functions_name_the_allowed_spacings(spacing_function):
    # (NoiseSchedule checks its timestep_spacing itself; these are the functions' own checks)
    match = re.escape("unknown timestep_spacing 'uniform'; allowed: ['leading', 'linspace',")
    with pytest.raises(ValueError, match=match):
        spacing_function()


# ----------------------------------------------------------------------------- plans


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "pndm", "euler"])
def test_schedule_whose_noise_level_overflows_is_named(sampler):
    # A beta_end ten times too large: alphā underflows to 0 in float32 at t = 609 of 1000.
    # (ddim, ddpm and pndm divided 0 by 0 there, a bare ZeroDivisionError.)
    schedule = NoiseSchedule(beta_end=0.5, skip_prk_steps=True)
    match = (
        f"{sampler} plan has non-finite coefficients for this schedule: its alphā is 0 "
        r"\(an infinite noise level\) from timestep 609 of 0..999 on.*beta_end"
    )
    with pytest.raises(ValueError, match=match):
        make_plan(schedule, sampler, 10)


def test_restarting_a_plan_past_its_end():
    plan = make_plan(SCHEDULE, "ddim", 4)
    with pytest.raises(ValueError, match="start_step 4 out of range for a 4-step plan"):
        restarted_coefficients(plan, 4)


def test_restarting_a_multistep_plan_part_way_needs_its_schedule():
    plan = make_plan(SCHEDULE, "unipc", 4)
    with pytest.raises(ValueError, match="restarting a unipc plan part-way needs its schedule"):
        restarted_coefficients(plan, 2)


DDIM_PLAN = make_plan(SCHEDULE, "ddim", 2)
DDPM_PLAN = make_plan(SCHEDULE, "ddpm", 2)


@pytest.mark.parametrize(
    ("step", "match"),
    [
        (
            lambda x: plan_step(DDIM_PLAN, 0, x, torch.zeros(2, 4)),
            r"model output shape \(2, 4\) != sample shape \(2, 3\)",
        ),
        (
            # the 7 columns a single-history sampler writes, without the padding to 10
            lambda x: apply_plan_row([1.0] * 7, x, torch.zeros_like(x)),
            "a plan row has 10 coefficients, got 7",
        ),
        (
            lambda x: plan_step(DDIM_PLAN, 0, x, torch.zeros_like(x), x0_older=[x] * 4),
            "x0_older holds 4 estimates; a row reads at most 3",
        ),
        (
            lambda x: plan_step(DDPM_PLAN, 0, x, torch.zeros_like(x), noise=torch.zeros(2, 4)),
            r"noise shape \(2, 4\) != sample shape \(2, 3\)",
        ),
    ],
    ids=["model-output-shape", "row-of-7-coefficients", "four-older-estimates", "noise-shape"],
)
def test_plan_step_refuses(step, match):
    with pytest.raises(ValueError, match=match):
        step(torch.zeros(2, 3))


# ----------------------------------------------------------------------------- guidance


@pytest.mark.parametrize(
    ("cond", "uncond", "match"),
    [
        (
            {"text": torch.zeros(2, 3), "time_ids": torch.zeros(3, 6)},
            {"text": torch.zeros(2, 3), "time_ids": torch.zeros(3, 6)},
            re.escape("disagree on the batch size: {'text': 2, 'time_ids': 3}"),
        ),
        (torch.tensor(1.0), torch.tensor(0.0), "a condition tensor needs a batch dimension"),
        (
            {"text": torch.zeros(2, 3)},
            torch.zeros(2, 3),
            "cond and uncond must both be dicts when one is; got dict and Tensor",
        ),
        (
            torch.zeros(2, 3),
            None,
            "must both be tensors, both dicts of tensors, or both None; got Tensor and NoneType",
        ),
        (torch.zeros(2, 3), torch.zeros(2, 4), r"cond shape \(2, 3\) != uncond shape \(2, 4\)"),
    ],
    ids=[
        "dict-entries-batch-differ",
        "0-dim-condition",
        "dict-and-tensor",
        "tensor-and-none",
        "cond-uncond-shapes-differ",
    ],
)
def test_guidance_refuses_conditions(cond, uncond, match):
    with pytest.raises(ValueError, match=match):
        classifier_free_guidance(zero_conditioned_model, cond, uncond, guidance_scale=5.0)


def test_guidance_rescale_outside_unit_interval():
    cond = torch.zeros(1, 3)
    with pytest.raises(ValueError, match=r"guidance_rescale must lie in \[0, 1\], got 1.5"):
        classifier_free_guidance(zero_conditioned_model, cond, cond, 5.0, guidance_rescale=1.5)


def test_guided_model_that_returns_one_half():
    # shared_input: the model gets x once and must return [uncond; cond]; this one returns x
    cond = torch.zeros(2, 3)
    guided = classifier_free_guidance(zero_conditioned_model, cond, cond, 5.0, shared_input=True)
    with pytest.raises(ValueError, match="guided model output has batch 2, expected 4"):
        guided(torch.zeros(2, 4), torch.tensor([10, 10]))


# ----------------------------------------------------------------------------- training loss


def test_min_snr_gamma_must_be_positive():
    with pytest.raises(ValueError, match="min_snr_gamma must be > 0, got 0.0"):
        diffusion_loss(zero_conditioned_model, torch.zeros(2, 3), None, SCHEDULE, min_snr_gamma=0)


def test_min_snr_weights_names_the_prediction_types():
    match = re.escape("unknown prediction_type 'eps'; allowed: ['epsilon', 'v_prediction', 's")
    with pytest.raises(ValueError, match=match):
        min_snr_weights(torch.tensor([0.5, 2.0]), 5.0, "eps")


@pytest.mark.parametrize(
    ("cond", "null_cond", "match"),
    [
        (
            {"label": torch.tensor([1, 2])},
            torch.tensor(0),
            re.escape("null_cond dict with the same keys ['label'], got Tensor"),
        ),
        (
            {"label": torch.tensor([1, 2])},
            {"text": 0},
            re.escape("null_cond dict with the same keys ['label'], got ['text']"),
        ),
        (
            [1, 2],
            0,
            "cond must be a tensor, a dict of tensors or None, got <class 'list'>",
        ),
        (
            torch.tensor([1, 2, 3]),
            0,
            r"condition shape \(3,\) must have the batch size 2 first",
        ),
        (
            torch.tensor([1, 2]),
            0.5,
            "integer class-label conditions need an integer null_cond label, got 0.5",
        ),
        (
            torch.zeros(2, 4),
            torch.zeros(3),
            r"null_cond shape \(3,\) does not broadcast to condition rows \(4,\)",
        ),
        (
            # broadcasts, but to a (5, 2, 4) condition: the model would get another shape
            torch.zeros(2, 4),
            torch.zeros(5, 1, 4),
            r"null_cond shape \(5, 1, 4\) does not broadcast to condition rows \(4,\)",
        ),
    ],
    ids=[
        "dict-cond-tensor-null",
        "dict-cond-other-keys",
        "cond-is-a-list",
        "cond-batch-differs-from-x0",
        "float-null-for-class-labels",
        "null-embedding-wrong-width",
        "null-embedding-extra-dims",
    ],
)
def test_condition_dropout_refuses(cond, null_cond, match):
    with pytest.raises(ValueError, match=match):
        diffusion_loss(
            zero_conditioned_model, torch.zeros(2, 3), cond, SCHEDULE, 0.5, null_cond=null_cond
        )


@pytest.mark.parametrize(
    ("x0", "kwargs", "match"),
    [
        (
            torch.zeros(2, 3),
            {"cond_drop_prob": 1.5},
            r"cond_drop_prob must lie in \[0, 1\], got 1.5",
        ),
        (
            torch.zeros(2, 3, dtype=torch.long),
            {},
            r"floating-point tensor .* got shape \(2, 3\) dtype torch.int64$",
        ),
        (torch.tensor(0.5), {}, r"non-empty batch dim, got shape \(\)"),
        (torch.zeros(0, 3), {}, r"non-empty batch dim, got shape \(0, 3\)"),
        (np.zeros((2, 3), dtype=np.float32), {}, r"floating-point tensor, got ndarray"),
        (
            torch.zeros(2, 3),
            {"timesteps": torch.tensor([1, 2, 3])},
            r"integer tensor of shape \(2,\), got shape \(3,\)",
        ),
        (
            torch.zeros(2, 3),
            {"timesteps": torch.tensor([10.0, 20.0])},
            r"integer tensor of shape \(2,\), got shape \(2,\) dtype torch.float32",
        ),
    ],
    ids=[
        "cond-drop-prob-above-one",
        "integer-x0",
        "x0-0-dim",
        "x0-empty-batch",
        "x0-numpy-array",
        "timesteps-wrong-length",
        "timesteps-float",
    ],
)
def test_diffusion_loss_refuses(x0, kwargs, match):
    with pytest.raises(ValueError, match=match):
        diffusion_loss(zero_conditioned_model, x0, None, SCHEDULE, **kwargs)
