"""NoiseSchedule.from_config: real checkpoint configs load, math-changing options are refused."""

from __future__ import annotations

import json
import math
import warnings

import diffusers
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)

from fastdiff.sampling import NoiseSchedule, make_plan
from fastdiff.sampling.config import default_sampler

SD15_PNDM = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SD21_DDIM = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
SDXL_EULER = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
SD_DPM = {
    "_class_name": "DPMSolverMultistepScheduler",
    "_diffusers_version": "0.21.0",
    "algorithm_type": "dpmsolver++",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "dynamic_thresholding_ratio": 0.995,
    "lambda_min_clipped": -math.inf,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_type": "midpoint",
    "steps_offset": 1,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_karras_sigmas": False,
    "variance_type": None,
}


@pytest.mark.parametrize("config", [SD15_PNDM, SD21_DDIM, SDXL_EULER, SD_DPM])
def test_checkpoint_configs_load(config):
    # Through JSON, as read from scheduler_config.json (-inf becomes -Infinity and back).
    schedule = NoiseSchedule.from_config(json.loads(json.dumps(config)))
    assert schedule.beta_schedule == "scaled_linear"
    assert schedule.steps_offset == 1
    assert schedule.prediction_type == config.get("prediction_type", "epsilon")
    assert schedule.set_alpha_to_one is config.get("set_alpha_to_one")  # None: left out


@pytest.mark.parametrize(
    "cls", [DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler, PNDMScheduler]
)
def test_configs_saved_by_diffusers_load(cls, tmp_path):
    kwargs = {"clip_sample": False} if cls is DDIMScheduler else {}
    cls(beta_schedule="scaled_linear", prediction_type="v_prediction", **kwargs).save_config(
        tmp_path
    )
    config = json.loads((tmp_path / "scheduler_config.json").read_text())
    schedule = NoiseSchedule.from_config(config)
    assert schedule.prediction_type == "v_prediction"
    assert schedule.timestep_spacing == config["timestep_spacing"]
    reference = cls.from_config(config)
    assert torch.allclose(schedule.alphas_cumprod, reference.alphas_cumprod.double(), atol=1e-6)


def test_missing_keys_take_the_class_defaults():
    euler = NoiseSchedule.from_config({"_class_name": "EulerDiscreteScheduler"})
    assert euler.beta_schedule == "linear" and euler.steps_offset == 0
    assert (euler.beta_start, euler.beta_end) == (0.0001, 0.02)
    heun = NoiseSchedule.from_config({"_class_name": "HeunDiscreteScheduler"})
    assert (heun.beta_start, heun.beta_end) == (0.00085, 0.012)  # Heun's own defaults
    assert heun.beta_start == diffusers.HeunDiscreteScheduler().config.beta_start


def test_written_nulls_read_as_diffusers_reads_them():
    """diffusers' DDIM tests set_alpha_to_one and clip_sample for truth: a written null is false
    (not "left out"); to_config leaves out what the file left out, a valid diffusers config."""
    config = {
        **SD21_DDIM,
        "set_alpha_to_one": None,
        "clip_sample": None,
        "rescale_betas_zero_snr": None,
    }
    schedule = NoiseSchedule.from_config(config)
    assert schedule.set_alpha_to_one is False and schedule.clip_sample is False
    assert schedule.rescale_betas_zero_snr is False
    reference = diffusers.DDIMScheduler.from_config(config)
    assert float(reference.final_alpha_cumprod) == pytest.approx(float(schedule.alphas_cumprod[0]))
    unset = NoiseSchedule.from_config(
        {k: v for k, v in SD21_DDIM.items() if k != "timestep_spacing"}
    )
    written = unset.to_config()
    assert "timestep_spacing" not in written
    diffusers.DDIMScheduler.from_config(written).set_timesteps(5)  # a config diffusers takes
    assert NoiseSchedule.from_config(written).timestep_spacing is None


@pytest.mark.parametrize("class_name", ["DDIMScheduler", "DPMSolverMultistepScheduler"])
def test_clip_sample_left_out_refuses_only_the_clipping_samplers(class_name):
    """Without clip_sample in the file, DDIMScheduler and DDPMScheduler clip x0 (their default;
    diffusers fills the key from the scheduler that samples): fastdiff does not implement
    clipping, so ddim and ddpm refuse with the fix; euler and dpmpp_2m never clip."""
    config = {**SD_DPM, "_class_name": class_name}
    del config["timestep_spacing"]
    schedule = NoiseSchedule.from_config(config)
    assert schedule.clip_sample is None
    for sampler, cls in (("ddim", diffusers.DDIMScheduler), ("ddpm", diffusers.DDPMScheduler)):
        with pytest.raises(ValueError, match='leaves clip_sample out.*"clip_sample": false'):
            make_plan(schedule, sampler, 5)
        assert cls.from_config(config).config.clip_sample is True
    for sampler in ("euler", "dpmpp_2m"):
        make_plan(schedule, sampler, 5)
    explicit = NoiseSchedule.from_config({**config, "clip_sample": False})
    make_plan(explicit, "ddim", 5)
    assert NoiseSchedule.from_config({**config, "clip_sample": None}).clip_sample is False
    with pytest.raises(ValueError, match="clip_sample=True .x0 clipping. is not implemented"):
        NoiseSchedule.from_config({**config, "clip_sample": True})


@pytest.mark.parametrize("config", [SD15_PNDM, SD21_DDIM, SD_DPM])
@pytest.mark.parametrize(
    "sampler,cls",
    [
        ("ddim", DDIMScheduler),
        ("euler", EulerDiscreteScheduler),
        ("dpmpp_2m", DPMSolverMultistepScheduler),
    ],
)
def test_spacing_left_out_of_the_file_is_the_sampling_schedulers_default(config, sampler, cls):
    """SD 1.5's and 2.1's scheduler configs have no timestep_spacing. A diffusers pipeline that
    samples them with another scheduler (XScheduler.from_config(pipe.scheduler.config)) takes
    that scheduler's default (leading for DDIM, linspace for Euler and DPM-Solver), not the
    folder class's: so does each fastdiff sampler."""
    config = {key: value for key, value in config.items() if key != "timestep_spacing"}
    config.setdefault("clip_sample", False)  # (left out, DDIM would clip: see the test above)
    folder_class = getattr(diffusers, config["_class_name"])
    reference = cls.from_config(folder_class.from_config(config).config)
    reference.set_timesteps(7)
    plan = make_plan(NoiseSchedule.from_config(config), sampler, 7)
    # Euler's linspace points are fractional here (832.5, ...), and so are fastdiff's.
    assert torch.equal(plan.timesteps.float(), reference.timesteps.float())


@pytest.mark.parametrize(
    "key,value",
    [
        ("clip_sample", True),
        ("thresholding", True),
        ("use_exponential_sigmas", True),
        ("solver_order", 4),
        ("algorithm_type", "dpmsolver"),
        ("final_sigmas_type", "sigma_min"),
        ("interpolation_type", "log_linear"),
        ("timestep_type", "continuous"),
        ("variance_type", "learned_range"),
        ("lambda_min_clipped", -5.1),
        ("predict_x0", False),
        ("disable_corrector", [0]),
        ("solver_type", "lobatto"),
    ],
)
def test_math_changing_values_are_refused(key, value):
    with pytest.raises(ValueError, match=key):
        NoiseSchedule.from_config({**SD_DPM, key: value})


def test_unknown_keys_and_classes_are_refused():
    with pytest.raises(ValueError, match="unknown scheduler config key 'shift'"):
        NoiseSchedule.from_config({**SDXL_EULER, "shift": 3.0})
    with pytest.raises(ValueError, match="DEISMultistepScheduler"):
        NoiseSchedule.from_config({"_class_name": "DEISMultistepScheduler"})
    with pytest.raises(ValueError, match="trailing"):
        NoiseSchedule.from_config({**SDXL_EULER, "timestep_spacing": "karras"})


def test_round_trip_through_to_config():
    schedule = NoiseSchedule.from_config(SD21_DDIM)
    again = NoiseSchedule.from_config(schedule.to_config())
    assert torch.equal(again.alphas_cumprod, schedule.alphas_cumprod)
    assert again.to_config() == schedule.to_config()


@pytest.mark.parametrize(
    "config,sampler",
    [
        ({"_class_name": "DDIMScheduler"}, "ddim"),
        ({"_class_name": "DDPMScheduler"}, "ddpm"),
        ({"_class_name": "EulerDiscreteScheduler"}, "euler"),
        ({"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True}, "euler_karras"),
        ({"_class_name": "EulerAncestralDiscreteScheduler"}, "euler_ancestral"),
        ({"_class_name": "DPMSolverMultistepScheduler"}, "dpmpp_2m"),
        ({"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": None}, "dpmpp_2m"),
        (
            {"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True},
            "dpmpp_2m_karras",
        ),
        (
            {"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"},
            "dpmpp_2m_sde",
        ),
        (
            {
                "_class_name": "DPMSolverMultistepScheduler",
                "algorithm_type": "sde-dpmsolver++",
                "use_karras_sigmas": True,
            },
            "dpmpp_2m_sde_karras",
        ),
        ({"_class_name": "DPMSolverMultistepScheduler", "solver_order": 3}, "dpmpp_3m"),
        (
            {
                "_class_name": "DPMSolverMultistepScheduler",
                "solver_order": 3,
                "algorithm_type": "sde-dpmsolver++",
                "use_karras_sigmas": True,
            },
            "dpmpp_3m_sde_karras",
        ),
        ({"_class_name": "HeunDiscreteScheduler"}, "heun"),
        ({"_class_name": "HeunDiscreteScheduler", "use_karras_sigmas": True}, "heun_karras"),
        ({"_class_name": "KDPM2DiscreteScheduler"}, "kdpm2"),
        ({"_class_name": "KDPM2DiscreteScheduler", "use_karras_sigmas": True}, "kdpm2_karras"),
        ({"_class_name": "KDPM2AncestralDiscreteScheduler"}, "kdpm2_ancestral"),
        (
            {"_class_name": "KDPM2AncestralDiscreteScheduler", "use_karras_sigmas": True},
            "kdpm2_ancestral_karras",
        ),
        ({"_class_name": "UniPCMultistepScheduler"}, "unipc"),
        ({"_class_name": "UniPCMultistepScheduler", "use_karras_sigmas": True}, "unipc_karras"),
        ({"_class_name": "PNDMScheduler"}, "ddim"),  # Runge-Kutta warm-up: not implemented
        ({"_class_name": "PNDMScheduler", "skip_prk_steps": True}, "pndm"),
        ({"_class_name": "LMSDiscreteScheduler"}, "lms"),
        ({"_class_name": "LMSDiscreteScheduler", "use_karras_sigmas": True}, "lms_karras"),
        ({}, "ddim"),
    ],
)
def test_default_sampler_is_the_folders_scheduler_where_implemented(config, sampler):
    assert default_sampler(config) == sampler


def test_a_third_order_unipc_folder_is_refused():
    """fastdiff's UniPC is second order; a folder asking for its third order gets an error
    rather than a sampler that differs from the one diffusers runs."""
    config = {"_class_name": "UniPCMultistepScheduler", "solver_order": 3}
    NoiseSchedule.from_config(config)  # the schedule itself is readable
    with pytest.raises(ValueError, match="solver_order 3 for UniPCMultistepScheduler"):
        default_sampler(config)


def test_karras_keys_are_read():
    config = {**SD_DPM, "use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 12.0}
    schedule = NoiseSchedule.from_config(config)
    assert torch.equal(schedule.alphas_cumprod, NoiseSchedule.from_config(SD_DPM).alphas_cumprod)
    assert (schedule.sigma_min, schedule.sigma_max) == (0.1, 12.0)
    assert NoiseSchedule.from_config(schedule.to_config()).to_config() == schedule.to_config()
    for bad in (0.0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="sigma_max must be a positive number or None"):
            NoiseSchedule.from_config({**SD_DPM, "sigma_max": bad})
    with pytest.raises(ValueError, match="use_karras_sigmas must be true or false, got 'yes'"):
        default_sampler({**SD_DPM, "use_karras_sigmas": "yes"})


def test_solver_types_are_read_as_each_diffusers_solver_reads_them():
    """DPMSolverMultistepScheduler reads UniPC's names ("bh1", "bh2", "logrho") as its midpoint
    update and UniPCMultistepScheduler DPM's ("midpoint", "heun") as bh2; DPM-Solver's "heun"
    update is not implemented and is refused when a dpmpp sampler would take it."""
    midpoint = make_plan(NoiseSchedule.from_config(SD_DPM), "dpmpp_2m", 6).coefficients
    for name in ("bh1", "bh2", "logrho"):
        schedule = NoiseSchedule.from_config({**SD_DPM, "solver_type": name})
        assert torch.equal(make_plan(schedule, "dpmpp_2m", 6).coefficients, midpoint)
    heun = NoiseSchedule.from_config({**SD_DPM, "solver_type": "heun"})
    with pytest.raises(ValueError, match="solver_type 'heun'"):
        make_plan(heun, "dpmpp_2m", 6)
    unipc = {**SD_DPM, "_class_name": "UniPCMultistepScheduler"}
    bh2 = make_plan(NoiseSchedule.from_config({**unipc, "solver_type": "bh2"}), "unipc", 6)
    for name in ("midpoint", "heun", None):
        schedule = NoiseSchedule.from_config({**unipc, "solver_type": name})
        assert torch.equal(make_plan(schedule, "unipc", 6).coefficients, bh2.coefficients)
    # lower_order_final: false would make diffusers' last UniPC step NaN; it stays first order
    late = NoiseSchedule.from_config({**unipc, "lower_order_final": False})
    assert late.lower_order_final is False
    assert torch.equal(make_plan(late, "unipc", 6).coefficients, bh2.coefficients)
    with pytest.raises(ValueError, match="lower_order_final must be true or false"):
        NoiseSchedule.from_config({**unipc, "lower_order_final": "no"})


@pytest.mark.parametrize(
    "config, named",
    [
        (
            {"_class_name": "DPMSolverSinglestepScheduler"},
            "'DPMSolverSinglestepScheduler' has no equal",
        ),
        ({"_class_name": "DEISMultistepScheduler"}, "'DEISMultistepScheduler' has no equal"),
        ({"_class_name": "PNDMScheduler"}, "Runge-Kutta steps"),
        ({"_class_name": "PNDMScheduler", "skip_prk_steps": False}, "Runge-Kutta steps"),
    ],
)
def test_a_folder_whose_scheduler_has_no_sampler_warns_at_load(config, named):
    """Such a folder generates with ddim by default; loading it says so, naming the scheduler,
    rather than switch samplers silently."""
    from fastdiff.pipeline.call_arguments import CallDefaults

    assert default_sampler(config) == "ddim"
    with pytest.warns(UserWarning, match=named):
        defaults = CallDefaults.for_folder({"_class_name": "StableDiffusionPipeline"}, config)
    assert defaults.sampler == "ddim"


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"_class_name": "DDIMScheduler"},
        {"_class_name": "PNDMScheduler", "skip_prk_steps": True},
        {"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True},
        {"_class_name": "DPMSolverMultistepScheduler", "solver_order": 3},
        {"_class_name": "LCMScheduler"},
    ],
)
def test_a_folder_whose_scheduler_has_its_sampler_loads_without_a_warning(config):
    from fastdiff.pipeline.call_arguments import CallDefaults
    from fastdiff.sampling.config import default_sampler_note

    assert default_sampler_note(config) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CallDefaults.for_folder({"_class_name": "StableDiffusionPipeline"}, config)
