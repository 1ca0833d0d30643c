"""Findings of the review of the diffusion math in ``fastdiff/sampling`` (schedules, spacing,
scheduler-config options), each a test that failed before its fix."""

from __future__ import annotations

import math

import pytest
import torch

from fastdiff.sampling import NoiseSchedule


@pytest.mark.parametrize(
    "config,key",
    [
        ({"steps_offset": None, "timestep_spacing": "linspace"}, "steps_offset"),
        ({"steps_offset": math.inf}, "steps_offset"),
        ({"num_train_timesteps": None}, "num_train_timesteps"),
        ({"num_train_timesteps": math.inf}, "num_train_timesteps"),
        ({"num_train_timesteps": math.nan}, "num_train_timesteps"),
    ],
)
def test_a_null_or_infinite_step_count_in_the_config_is_refused_by_name(config, key):
    """A ``null`` steps_offset or num_train_timesteps in scheduler_config.json (or inf / NaN)
    reached ``int()`` before any check and raised TypeError / OverflowError / an int() parse
    error that named no config key; it must be a ValueError that names the key and the allowed
    values."""
    with pytest.raises(ValueError, match=f"{key} must be an? (non-negative )?integer"):
        NoiseSchedule.from_config({"_class_name": "DDIMScheduler", "clip_sample": False, **config})


def test_configs_diffusers_reads_without_effect_are_taken():
    """Two configs diffusers samples as if the key were absent were refused: ``thresholding:
    null`` (diffusers reads it as false) and a ``beta_schedule`` it has no formula for beside
    ``trained_betas`` (diffusers then reads only the betas)."""
    betas = torch.linspace(1e-4, 0.02, 1000)
    plain = NoiseSchedule.from_config({"trained_betas": betas.tolist()})
    odd = NoiseSchedule.from_config({"trained_betas": betas.tolist(), "beta_schedule": "sigmoid"})
    torch.testing.assert_close(odd.alphas_cumprod, plain.alphas_cumprod, rtol=0, atol=0)
    with_null = NoiseSchedule.from_config({"thresholding": None})
    torch.testing.assert_close(
        with_null.alphas_cumprod, NoiseSchedule.from_config({}).alphas_cumprod, rtol=0, atol=0
    )
    with pytest.raises(ValueError, match="unknown beta_schedule 'sigmoid'"):
        NoiseSchedule.from_config({"beta_schedule": "sigmoid"})
