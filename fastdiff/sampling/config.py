"""Reading a diffusers ``scheduler_config.json`` dict into :class:`NoiseSchedule` keyword arguments.

Every key diffusers' DDPM-family schedulers write is classified here, in one place:

* schedule keys we implement (passed through to ``NoiseSchedule``);
* keys whose non-default values change the math in ways we do not implement (clipping,
  thresholding, exponential/beta/flow sigmas, other solver variants ...): accepted only at
  the value our samplers implement, otherwise ``ValueError`` naming the key and the allowed value;
* keys that have no effect given the above (e.g. ``clip_sample_range`` while ``clip_sample`` is
  false) and diffusers metadata (``_class_name``, ``_diffusers_version``
  and every other ``_``-prefixed key): ignored.

Any other key raises, so a config from a scheduler we do not know cannot be silently misread.
A key missing from the file takes the default of the scheduler class named by ``_class_name``
(as diffusers does). The exceptions are ``timestep_spacing``, ``set_alpha_to_one`` and
``clip_sample``, whose defaults differ between the schedulers the samplers reproduce: left out,
they stay None and each sampler takes its own scheduler's default (``PER_SAMPLER_KEYS``), as
diffusers does when it samples a folder with another scheduler class than the one that wrote it.
"""

from __future__ import annotations

import math
from typing import Any

SCHEDULE_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "timestep_spacing",
    "steps_offset",
    "set_alpha_to_one",
    "rescale_betas_zero_snr",
    "clip_sample",
    "sigma_min",
    "sigma_max",
    "original_inference_steps",
    "timestep_scaling",
    "solver_type",
    "lower_order_final",
    "skip_prk_steps",
)

# key -> the values our samplers implement (a config with any other value is refused).
REQUIRED_VALUES: dict[str, tuple[Any, ...]] = {
    "thresholding": (False, None),  # null reads as false, as in diffusers
    "use_exponential_sigmas": (False, None),
    "use_beta_sigmas": (False, None),
    "use_lu_lambdas": (False,),
    "use_flow_sigmas": (False,),
    "use_dynamic_shifting": (False,),
    "interpolation_type": ("linear",),
    "timestep_type": ("discrete",),
    "final_sigmas_type": ("zero",),
    "euler_at_final": (False,),
    "lambda_min_clipped": (-math.inf, None),
    "variance_type": (None, "fixed_small"),
    "algorithm_type": ("dpmsolver++", "sde-dpmsolver++"),
    # 2 or 3: the folder's DPM-Solver++ order (``default_sampler``: dpmpp_2m or dpmpp_3m); UniPC
    # at 2 only (its third order reads three steps back)
    "solver_order": (2, 3),
    # UniPC's: x0 prediction, the corrector at every step, no other solver as its predictor
    "predict_x0": (True,),
    "disable_corrector": ([],),
    "solver_p": (None,),
    "shift_terminal": (None,),
}

# Keys with no effect once the REQUIRED_VALUES hold (they only parameterise disabled features),
# and the Karras flag, which default_sampler reads.
IGNORED_KEYS = frozenset(
    {
        "clip_sample_range",
        "dynamic_thresholding_ratio",
        "sample_max_value",
        # Which sampler the folder's scheduler runs, not the schedule: read by default_sampler.
        "use_karras_sigmas",
        "flow_shift",
        "time_shift_type",
    }
)

# Keys whose default differs between the diffusers schedulers fastdiff's samplers reproduce
# (timestep_spacing: leading for DDIM/DDPM, linspace for Euler and DPM-Solver; set_alpha_to_one:
# DDIM's true; clip_sample: DDIM's and DDPM's true, a clipping fastdiff does not implement).
# diffusers fills a key the file omits from the scheduler that samples, whichever class wrote the
# file (from_config drops the keys that took defaults): so a missing one stays None in the
# schedule and each sampler takes its own scheduler's default.
PER_SAMPLER_KEYS = ("timestep_spacing", "set_alpha_to_one", "clip_sample")

# Flags diffusers' schedulers test for truth, so that a null written in the file reads as false
# (lower_order_final: DPMSolverMultistepScheduler's "and len(self.timesteps) < 15").
NULL_IS_FALSE = ("clip_sample", "set_alpha_to_one", "rescale_betas_zero_snr", "lower_order_final")

# Defaults of the scheduler classes whose configs we read, for keys the file may omit.
_COMMON_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}
CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "DDIMScheduler": {},
    "DDPMScheduler": {},
    "PNDMScheduler": {},
    "EulerDiscreteScheduler": {},
    "EulerAncestralDiscreteScheduler": {},
    "DPMSolverMultistepScheduler": {},
    "LMSDiscreteScheduler": {},
    "HeunDiscreteScheduler": {"beta_start": 0.00085, "beta_end": 0.012},
    "KDPM2DiscreteScheduler": {"beta_start": 0.00085, "beta_end": 0.012},
    "KDPM2AncestralDiscreteScheduler": {"beta_start": 0.00085, "beta_end": 0.012},
    "LCMScheduler": {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"},
    "TCDScheduler": {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"},
    "UniPCMultistepScheduler": {},
}


def _same(value: Any, allowed: Any) -> bool:
    # Compare JSON values strictly enough that False is not mistaken for 0 or None.
    if value is None or allowed is None:
        return value is allowed
    if isinstance(value, bool) or isinstance(allowed, bool):
        return value is allowed
    return value == allowed


def schedule_kwargs_from_config(config: dict[str, Any]) -> dict[str, Any]:
    """Validate a diffusers scheduler config dict and return ``NoiseSchedule`` kwargs."""
    if not isinstance(config, dict):
        raise ValueError(f"scheduler config must be a dict, got {type(config).__name__}")
    class_name = config.get("_class_name")
    defaults = dict(_COMMON_DEFAULTS)
    if class_name in CLASS_DEFAULTS:
        defaults.update(CLASS_DEFAULTS[class_name])
    elif class_name is not None:
        raise ValueError(
            f"scheduler config _class_name {class_name!r} is not a DDPM-family scheduler we can "
            f"read; known: {sorted(CLASS_DEFAULTS)}"
        )
    merged = {**defaults, **config}

    kwargs: dict[str, Any] = {}
    for key, value in merged.items():
        if key.startswith("_") or key in IGNORED_KEYS:
            continue
        if key in NULL_IS_FALSE and value is None:
            kwargs[key] = False  # written null: diffusers' schedulers test these for truth
        elif key in SCHEDULE_KEYS:
            kwargs[key] = value
        elif key in REQUIRED_VALUES:
            allowed = REQUIRED_VALUES[key]
            if not any(_same(value, option) for option in allowed):
                raise ValueError(
                    f"scheduler config key {key!r} = {value!r} is not supported; fastdiff "
                    f"implements only {key} in {list(allowed)}"
                )
        else:
            raise ValueError(
                f"unknown scheduler config key {key!r}; supported keys: {sorted(SCHEDULE_KEYS)}, "
                f"accepted at fixed values: {sorted(REQUIRED_VALUES)}, ignored: "
                f"{sorted(IGNORED_KEYS)}"
            )
    for key in PER_SAMPLER_KEYS:
        kwargs.setdefault(key, None)
    return kwargs


def default_sampler(config: dict[str, Any]) -> str:
    """The fastdiff sampler that equals the diffusers scheduler ``config`` describes (what a
    diffusers pipeline loaded from the folder samples with), or ``"ddim"`` where fastdiff has
    none: PNDM with its Runge-Kutta warm-up (``skip_prk_steps`` false)."""
    karras = config.get("use_karras_sigmas")
    if karras is not None and not isinstance(karras, bool):
        raise ValueError(
            f"scheduler config use_karras_sigmas must be true or false, got {karras!r}"
        )
    class_name = config.get("_class_name")
    order = config.get("solver_order", 2)
    if class_name == "DPMSolverMultistepScheduler":
        sde = config.get("algorithm_type") == "sde-dpmsolver++"
        name = "dpmpp_3m" if order == 3 else "dpmpp_2m"
        return name + ("_sde" if sde else "") + ("_karras" if karras else "")
    if class_name == "UniPCMultistepScheduler" and order != 2:
        raise ValueError(
            f"scheduler config solver_order {order!r} for UniPCMultistepScheduler: fastdiff's "
            "unipc sampler is UniPC at solver_order 2 (its third order reads the x0 of three "
            "steps back); use solver_order 2"
        )
    if class_name == "PNDMScheduler":
        # PNDM's Runge-Kutta warm-up (skip_prk_steps false, its default) is not implemented
        return "pndm" if config.get("skip_prk_steps") is True else "ddim"
    if class_name in KARRAS_SAMPLER_OF_CLASS:
        return KARRAS_SAMPLER_OF_CLASS[class_name] + ("_karras" if karras else "")
    return SAMPLER_OF_CLASS.get(class_name, "ddim")


# The schedulers whose sampler is the class alone (default_sampler reads the others' keys)
SAMPLER_OF_CLASS = {
    "DDIMScheduler": "ddim",
    "DDPMScheduler": "ddpm",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "LCMScheduler": "lcm",
    "TCDScheduler": "tcd",
}
# The schedulers whose sampler is the class's, with "_karras" for use_karras_sigmas
KARRAS_SAMPLER_OF_CLASS = {
    "EulerDiscreteScheduler": "euler",
    "LMSDiscreteScheduler": "lms",
    "HeunDiscreteScheduler": "heun",
    "KDPM2DiscreteScheduler": "kdpm2",
    "KDPM2AncestralDiscreteScheduler": "kdpm2_ancestral",
    "UniPCMultistepScheduler": "unipc",
}
# Every scheduler class default_sampler has an equal sampler for
MATCHED_CLASSES = (
    *SAMPLER_OF_CLASS,
    *KARRAS_SAMPLER_OF_CLASS,
    "DPMSolverMultistepScheduler",
    "PNDMScheduler",
)


def default_sampler_note(config: dict[str, Any]) -> str | None:
    """Why ``default_sampler(config)`` is not the scheduler the config names, or None when it
    is (or the config names none): a folder whose scheduler fastdiff does not implement
    samples with ddim by default, and the loader says so rather than switch silently."""
    class_name = config.get("_class_name")
    if class_name is None:
        return None
    if class_name == "PNDMScheduler" and config.get("skip_prk_steps") is not True:
        return (
            "the folder's PNDMScheduler starts with Runge-Kutta steps (skip_prk_steps false), "
            "which fastdiff does not implement: its generations default to the ddim sampler "
            "(pass sampler=, or set skip_prk_steps true for the pndm sampler)"
        )
    if class_name not in MATCHED_CLASSES:
        return (
            f"the folder's scheduler {class_name!r} has no equal fastdiff sampler: its "
            "generations default to the ddim sampler (pass sampler= to choose another)"
        )
    return None
