"""Diffusion math: noise schedules, the forward process, samplers compiled to plans, guidance and
the training loss. Never imports models (the layer above) or diffusers."""

from fastdiff.sampling.guidance import classifier_free_guidance, combine_guidance
from fastdiff.sampling.known_region import KnownRegion, keep_known, known_region_rows
from fastdiff.sampling.loss import diffusion_loss, min_snr_weights
from fastdiff.sampling.plan import (
    INPUT_SCALE,
    NEXT_FROM_OLDER_X0,
    NEXT_FROM_PREV_X0,
    NEXT_FROM_X,
    NEXT_FROM_X0,
    NOISE_STD,
    NUM_COEFFICIENTS,
    SAMPLERS,
    X0_FROM_INPUT,
    X0_FROM_OUTPUT,
    SamplingPlan,
    apply_plan_row,
    make_plan,
    model_input,
    plan_step,
)
from fastdiff.sampling.samplers import run_plan, sample
from fastdiff.sampling.schedule import BETA_SCHEDULES, PREDICTION_TYPES, NoiseSchedule
from fastdiff.sampling.spacing import SPACINGS

__all__ = [
    "BETA_SCHEDULES",
    "INPUT_SCALE",
    "KnownRegion",
    "NEXT_FROM_OLDER_X0",
    "NEXT_FROM_PREV_X0",
    "NEXT_FROM_X",
    "NEXT_FROM_X0",
    "NOISE_STD",
    "NUM_COEFFICIENTS",
    "PREDICTION_TYPES",
    "SAMPLERS",
    "SPACINGS",
    "X0_FROM_INPUT",
    "X0_FROM_OUTPUT",
    "NoiseSchedule",
    "SamplingPlan",
    "apply_plan_row",
    "classifier_free_guidance",
    "combine_guidance",
    "diffusion_loss",
    "keep_known",
    "known_region_rows",
    "make_plan",
    "min_snr_weights",
    "model_input",
    "plan_step",
    "run_plan",
    "sample",
]
