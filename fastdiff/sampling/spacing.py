"""Which training timesteps a sampler visits: the ``leading`` / ``linspace`` / ``trailing``
spacings of Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are Flawed",
Table 2), computed the way each diffusers scheduler computes them so that results agree.

diffusers computes the spacings slightly differently per scheduler family:

* ``ddim`` / ``ddpm`` (DDIMScheduler, DDPMScheduler): ``steps`` points.
* ``euler`` (EulerDiscreteScheduler, and EulerAncestralDiscreteScheduler for
  ``euler_ancestral``): the same points, but ``linspace`` keeps them as float32
  (fractional timesteps such as 946.42 for 20 steps). ``spaced_timesteps`` rounds them to the
  nearest integer (half to even, as the DDIM family does) for the step-count checks and for
  callers that index tables; ``keep_fraction`` returns them as diffusers keeps them, and
  ``make_plan`` calls the model at those, with sigma interpolated between the neighbouring
  table entries as diffusers does.
* ``dpmpp_2m`` and ``dpmpp_2m_sde`` (DPMSolverMultistepScheduler), and ``unipc``
  (UniPCMultistepScheduler, which spaces them the same way): ``linspace`` and ``leading``
  build ``steps + 1`` points and drop the last one (t = 0).

A config that leaves the spacing out gets the default of the scheduler the sampler reproduces
(``DEFAULT_SPACING``). The Karras levels of ``dpmpp_2m_karras`` (and ``unipc_karras``) take no
spacing; those of
``euler_karras`` span the spaced timesteps' noise levels (``karras_sigmas``).
"""

from __future__ import annotations

import numpy as np
import torch

SPACINGS = ("leading", "linspace", "trailing")
SAMPLER_FAMILIES = {
    "ddim": "ddim",
    "ddpm": "ddim",
    "euler": "euler",
    "euler_ancestral": "euler",
    "dpmpp_2m": "dpmpp_2m",
    "dpmpp_2m_sde": "dpmpp_2m",
    "dpmpp_3m": "dpmpp_2m",
    "dpmpp_3m_sde": "dpmpp_2m",
    "unipc": "dpmpp_2m",
}


def _round_half_even(values: np.ndarray) -> np.ndarray:
    # numpy's round is half-to-even, which is what diffusers relies on (499.5 -> 500, 0.5 -> 0).
    return np.round(values).astype(np.int64)


# The timestep_spacing default of the diffusers scheduler each sampler family reproduces.
DEFAULT_SPACING = {"ddim": "leading", "euler": "linspace", "dpmpp_2m": "linspace"}


def _grid(total: int, steps: int, spacing: str, steps_offset: int, family: str) -> np.ndarray:
    """The timesteps (descending) a diffusers scheduler family spaces, unchecked."""
    # DPM-Solver places steps + 1 boundaries and never evaluates the model at the last one.
    points = steps + 1 if family == "dpmpp_2m" else steps
    if spacing == "linspace":
        grid = np.linspace(0, total - 1, points)
        if family == "euler":
            grid = np.linspace(0, total - 1, points, dtype=np.float32).astype(np.float64)
        timesteps = _round_half_even(grid)[::-1]
    elif spacing == "leading":
        ratio = total // points
        timesteps = (np.arange(points, dtype=np.int64) * ratio)[::-1] + steps_offset
    else:  # trailing
        ratio = total / steps
        timesteps = _round_half_even(np.arange(total, 0, -ratio)) - 1
    if family == "dpmpp_2m" and spacing != "trailing":
        timesteps = timesteps[:-1]
    return np.ascontiguousarray(timesteps)


def spaced_timesteps(
    num_train_timesteps: int,
    steps: int,
    spacing: str | None,
    steps_offset: int = 0,
    sampler: str = "ddim",
    keep_fraction: bool = False,
) -> torch.Tensor:
    """Return the model timesteps (LongTensor [steps], descending) a sampler visits.
    ``keep_fraction``: the Euler family's ``linspace`` points as diffusers keeps them, float32
    fractions (a float64 tensor; other samplers' integer timesteps as floats), for comparisons
    that diffusers makes on them (``denoising_start`` / ``denoising_end`` cut-offs).

    ``sampler`` selects the diffusers scheduler whose arithmetic is reproduced (see module doc);
    ``spacing`` None takes that scheduler's default (``DEFAULT_SPACING``).
    Raises ``ValueError`` for unknown names, ``steps`` outside [1, num_train_timesteps], and for a
    combination that would visit a timestep twice or fall outside [0, num_train_timesteps).
    """
    if sampler not in SAMPLER_FAMILIES:
        raise ValueError(f"unknown sampler {sampler!r}; allowed: {sorted(SAMPLER_FAMILIES)}")
    if spacing is None:
        spacing = DEFAULT_SPACING[SAMPLER_FAMILIES[sampler]]
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep_spacing {spacing!r}; allowed: {list(SPACINGS)}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise ValueError(f"steps must be an integer, got {steps!r}")
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(
            f"steps must be in [1, num_train_timesteps={num_train_timesteps}], got {steps}"
        )
    total = num_train_timesteps
    timesteps = _grid(total, steps, spacing, steps_offset, SAMPLER_FAMILIES[sampler])
    if timesteps.shape[0] != steps:
        raise ValueError(
            f"{spacing} spacing produced {timesteps.shape[0]} timesteps for steps={steps}; "
            "choose a step count that divides the schedule more evenly"
        )
    if timesteps.min() < 0 or timesteps.max() >= total:
        raise ValueError(
            f"{spacing} spacing with steps={steps} and steps_offset={steps_offset} gives timesteps "
            f"outside [0, {total - 1}]: {timesteps.tolist()}"
        )
    if steps > 1 and not np.all(np.diff(timesteps) < 0):
        raise ValueError(
            f"{spacing} spacing with steps={steps} visits a timestep twice for sampler "
            f"{sampler!r}; use fewer steps"
        )
    if keep_fraction:
        if spacing == "linspace" and SAMPLER_FAMILIES[sampler] == "euler":
            grid = np.linspace(0, total - 1, steps, dtype=np.float32)[::-1]
            return torch.from_numpy(grid.astype(np.float64))
        return torch.from_numpy(timesteps.astype(np.float64))
    return torch.from_numpy(timesteps.copy())


def karras_sigmas(
    alphas_cumprod: torch.Tensor,
    steps: int,
    round_timesteps: bool = True,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    ends_at: tuple[int, int] | None = None,
    float32_timesteps: bool = False,
    keep_fraction: bool = False,
) -> tuple[torch.Tensor, list[float]]:
    """Karras et al. 2022 (Eq. 5, rho = 7) noise levels, as diffusers' DPMSolverMultistepScheduler
    (and EulerDiscreteScheduler) build them with ``use_karras_sigmas``: ``steps`` sigmas from
    ``sigma_max`` down to ``sigma_min``, evenly spaced in sigma^(1/7), then 0. Unset, the ends
    are the table's sigmas at the timesteps ``ends_at`` = (last, first) (Euler: the spaced
    timesteps' ends), or the table's smallest and largest sigma (DPM-Solver). Each model
    timestep is found by interpolating log sigma in the training table, rounded to the nearest
    integer (truncated when ``round_timesteps`` is false, as diffusers does for the cosine
    schedule; rounded from float32 with ``float32_timesteps``, the dtype in which diffusers'
    Euler passes these fractional timesteps to the model).

    Returns (LongTensor [steps] timesteps, non-increasing: rounding can repeat one at either end
    of the table; steps + 1 sigmas).
    """
    total = alphas_cumprod.shape[0]
    if (
        isinstance(steps, bool)
        or not isinstance(steps, (int, np.integer))
        or not 1 <= steps <= total
    ):
        raise ValueError(f"steps must be in [1, num_train_timesteps={total}], got {steps!r}")
    # The training table in float32, computed as diffusers computes it (the timesteps are
    # rounded afterwards, so the table's last bits can decide a timestep).
    table32 = alphas_cumprod.to(torch.float32)
    table = (((1 - table32) / table32) ** 0.5).numpy()
    log_table = np.log(table)
    low_index, high_index = (0, total - 1) if ends_at is None else ends_at
    low_end = float(table[low_index]) if sigma_min is None else float(sigma_min)
    high_end = float(table[high_index]) if sigma_max is None else float(sigma_max)
    rho = 7.0
    ramp = np.linspace(0, 1, steps)
    sigmas = (high_end ** (1 / rho) + ramp * (low_end ** (1 / rho) - high_end ** (1 / rho))) ** rho

    fractional = timesteps_of_sigmas(log_table, sigmas)
    if float32_timesteps:
        fractional = fractional.astype(np.float32)
    timesteps = np.round(fractional) if round_timesteps else np.trunc(fractional)
    # diffusers keeps the sigmas in float32; so do we, so both step with the same numbers.
    levels = sigmas.astype(np.float32).astype(np.float64).tolist() + [0.0]
    if keep_fraction:  # the unrounded timesteps (float64), as diffusers' Euler keeps them
        return torch.from_numpy(fractional.astype(np.float64)), levels
    return torch.from_numpy(timesteps.astype(np.int64)), levels


def timesteps_of_sigmas(log_table: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """The fractional timesteps of noise levels ``sigmas``: t interpolated piecewise-linearly in
    log sigma over the training table's log sigmas ``log_table`` (increasing with t), as
    diffusers' ``_sigma_to_t`` does (clamped to the table's ends; sigma 0 maps to t = 0)."""
    log_sigmas = np.log(np.maximum(np.asarray(sigmas, dtype=np.float64), 1e-10))
    below = (log_sigmas[None, :] - log_table[:, None]) >= 0
    low = np.cumsum(below, axis=0).argmax(axis=0).clip(max=log_table.shape[0] - 2)
    weight = np.clip((log_table[low] - log_sigmas) / (log_table[low] - log_table[low + 1]), 0, 1)
    return (1 - weight) * low + weight * (low + 1)


def euler_spacing_ends(
    num_train_timesteps: int, steps: int, spacing: str | None, steps_offset: int = 0
) -> tuple[int, int]:
    """(last, first) table index of the timesteps diffusers' EulerDiscreteScheduler spaces before
    it converts their noise levels to Karras': the grid's end points, clamped to the table as its
    ``np.interp`` clamps them (no step-count checks: every count runs there)."""
    spacing = DEFAULT_SPACING["euler"] if spacing is None else spacing
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep_spacing {spacing!r}; allowed: {list(SPACINGS)}")
    grid = _grid(num_train_timesteps, steps, spacing, steps_offset, "euler")
    last, first = (min(max(int(index), 0), num_train_timesteps - 1) for index in grid[[-1, 0]])
    return last, first


# LCMScheduler's default number of steps of the schedule the consistency model was distilled on.
LCM_ORIGINAL_STEPS = 50


def lcm_timesteps(
    num_train_timesteps: int,
    steps: int,
    original_steps: int | None = None,
    strength: float = 1.0,
) -> torch.Tensor:
    """The timesteps of diffusers' LCMScheduler (Luo et al. 2023, "Latent Consistency Models"):
    the distillation schedule's ``original_steps`` timesteps k - 1, 2k - 1, ..., T - 1
    (k = T // original_steps), of which ``steps`` are taken evenly by index, from the top.
    ``strength`` < 1 keeps the first ``int(original_steps * strength)`` of that schedule only
    (LatentConsistencyModelImg2ImgPipeline's img2img: every step runs, lower down). They ignore
    ``timestep_spacing`` and ``steps_offset``. LongTensor [steps], descending."""
    original = LCM_ORIGINAL_STEPS if original_steps is None else int(original_steps)
    if not 1 <= original <= num_train_timesteps:
        raise ValueError(
            f"original_inference_steps must lie in [1, num_train_timesteps="
            f"{num_train_timesteps}], got {original}"
        )
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if steps > original:
        raise ValueError(
            f"the lcm sampler takes at most original_inference_steps={original} steps (its "
            f"timesteps are a subset of that distillation schedule), got {steps}"
        )
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must lie in (0, 1], got {strength!r}")
    kept = int(original * strength)
    if kept < steps:
        raise ValueError(
            f"strength {strength} keeps {kept} of the lcm sampler's original_inference_steps="
            f"{original} timesteps, fewer than the {steps} steps asked for: use fewer steps or "
            "a higher strength"
        )
    ratio = num_train_timesteps // original
    schedule = (np.arange(1, kept + 1) * ratio - 1)[::-1]
    indices = np.floor(np.linspace(0, kept, num=steps, endpoint=False)).astype(np.int64)
    return torch.from_numpy(np.ascontiguousarray(schedule[indices]))
