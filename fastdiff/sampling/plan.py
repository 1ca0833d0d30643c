"""Samplers compiled ahead of time into a :class:`SamplingPlan`: the contract shared by the
samplers, the fused step kernel and the CUDA-graph runtime.

Every sampler we ship is, model call by model call, linear in the state x, the model output m,
up to four earlier calls' x0 estimates and Gaussian noise z (one row per call: a step of Heun's
method or KDPM2, which call the model twice, takes two rows). Row i of ``plan.coefficients`` holds

    x_in   = c0 * x                                           (model input, VP scale)
    x0     = c1 * x_in + c2 * m                               (m in the schedule's prediction type)
    x_next = c3 * x + c4 * x0 + c5 * x0_prev + c6 * z
             + c7 * x0_older[0] + c8 * x0_older[1] + c9 * x0_older[2]
                                                              (z ~ N(0, I) only where c6 != 0)

x0_prev is the previous row's x0, x0_older the ones before it (two, three and four rows back).
DPM-Solver++(3M) and UniPC (whose corrector reaches one step further back than its predictor)
read two rows back, LMS three, PNDM's linear multistep four (those two keep, in the x0 slot,
what their multistep combines: LMS the derivative, PNDM the raw model output); the other
samplers' c7..c9 are 0, and a loop keeps only the history a plan reads
(``SamplingPlan.history_depth``). So the eager loop (:func:`fastdiff.sampling.sample`), the
fused step kernel and the CUDA-graph runtime all apply the same numbers. :func:`plan_step` is
the one reference implementation of a row. After the last row the state x is the clean sample
in VP scale.

This module holds the row layout, the plan and ``make_plan``; the rows themselves are built per
sampler family: ``vp_rows`` (DDIM, DDPM, LCM, TCD, PNDM), ``sigma_rows`` (Euler, Heun, LMS,
KDPM2) and ``multistep_rows`` (DPM-Solver++, UniPC).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fastdiff.sampling.multistep_rows import dpmpp_rows, unipc_rows
from fastdiff.sampling.schedule import NoiseSchedule
from fastdiff.sampling.sigma_rows import (
    clamped_alphas_cumprod,
    euler_rows,
    float32_sigmas_at,
    heun_rows,
    karras_plan_inputs,
    kdpm2_call_levels,
    kdpm2_rows,
    lms_rows,
    sigmas_at,
)
from fastdiff.sampling.spacing import euler_spacing_ends, karras_sigmas, lcm_timesteps
from fastdiff.sampling.vp_rows import (
    check_pndm,
    ddim_rows,
    ddpm_rows,
    lcm_rows,
    pndm_rows,
    tcd_rows,
)

INPUT_SCALE = 0
X0_FROM_INPUT = 1
X0_FROM_OUTPUT = 2
NEXT_FROM_X = 3
NEXT_FROM_X0 = 4
NEXT_FROM_PREV_X0 = 5
NOISE_STD = 6
NEXT_FROM_OLDER_X0 = (7, 8, 9)  # the x0 of two, three and four rows back
NUM_COEFFICIENTS = 10
# Column of history slot k (1: the previous row's x0, 2..4: x0_older[k - 2]).
HISTORY_COLUMNS = (NEXT_FROM_PREV_X0, *NEXT_FROM_OLDER_X0)

SAMPLERS = (
    "ddpm",
    "ddim",
    "euler",
    "euler_ancestral",
    "euler_karras",
    "dpmpp_2m",
    "dpmpp_2m_karras",
    "dpmpp_2m_sde",
    "dpmpp_2m_sde_karras",
    "dpmpp_3m",
    "dpmpp_3m_karras",
    "dpmpp_3m_sde",
    "dpmpp_3m_sde_karras",
    "heun",
    "heun_karras",
    "kdpm2",
    "kdpm2_karras",
    "kdpm2_ancestral",
    "kdpm2_ancestral_karras",
    "pndm",
    "lms",
    "lms_karras",
    "lcm",
    "tcd",
    "unipc",
    "unipc_karras",
)


def rows_per_step(sampler: str) -> int:
    """Plan rows (model calls) per sampling step: 2 for Heun's method (its correction calls the
    model again at the next noise level) and KDPM2 (DPM-Solver-2: again at the midpoint), else
    1. diffusers calls this the scheduler's ``order``; img2img starts at row
    ``rows_per_step * start step``."""
    return 2 if sampler.startswith(("heun", "kdpm2")) else 1


@dataclass(frozen=True, eq=False)
class SamplingPlan:
    """Timesteps (LongTensor [S], call order; float64 where some are fractional: the Euler
    family's with ``linspace`` spacing or Karras levels, which diffusers' Euler schedulers pass
    to the model as they are), float64 coefficients [S, 8], the factor that
    turns x_T ~ N(0, I) into the initial state, and ``alphas_cumprod`` (float64 [S]): the VP
    noise level alphā of each step's input state, the level img2img diffuses an image to before
    starting at that step (None: the schedule's alphā at the step's timestep)."""

    sampler: str
    timesteps: torch.Tensor
    coefficients: torch.Tensor
    init_noise_scale: float
    eta: float = 0.0
    alphas_cumprod: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def stochastic(self) -> bool:
        """True when some step draws noise (ddpm, euler_ancestral, the sde samplers, ddim with
        eta > 0)."""
        return bool((self.coefficients[:, NOISE_STD] != 0).any())

    @property
    def history_depth(self) -> int:
        """How many rows back the plan reads x0 estimates: 0 (none), 1 (the previous row's:
        DPM-Solver++(2M), Heun's correction), 2 (DPM-Solver++(3M), UniPC) or 4 (PNDM). A loop
        keeps that many (``x0_prev`` and ``history_depth - 1`` older ones)."""
        return history_depth(self.coefficients)

    @property
    def reads_prev2(self) -> bool:
        """True when some row reads x0 estimates from two or more rows back."""
        return self.history_depth >= 2


def step_noise_dtype(plan: SamplingPlan, dtype: torch.dtype) -> torch.dtype:
    """The dtype a step's noise is drawn in: float32 for the SDE samplers (diffusers'
    DPMSolverMultistepScheduler draws it so, whatever the latents' dtype), else the state's (as
    DDPMScheduler and EulerAncestralDiscreteScheduler draw it), so a seed gives diffusers' noise."""
    return torch.float32 if "_sde" in plan.sampler else dtype


def _integral_as_long(timesteps: torch.Tensor) -> torch.Tensor:
    """Timesteps that are all whole numbers as a LongTensor; fractional ones as they are."""
    if timesteps.dtype.is_floating_point and bool((timesteps == timesteps.round()).all()):
        return timesteps.round().long()
    return timesteps


# The samplers whose diffusers schedulers have no rescale_betas_zero_snr, by name prefix (the
# ancestral KDPM2 first): diffusers samples the unrescaled schedule with them.
WITHOUT_ZERO_SNR_RESCALE = (
    ("kdpm2_ancestral", "KDPM2AncestralDiscreteScheduler"),
    ("kdpm2", "KDPM2DiscreteScheduler"),
    ("heun", "HeunDiscreteScheduler"),
    ("lms", "LMSDiscreteScheduler"),
    ("pndm", "PNDMScheduler"),
)


def refuse_zero_snr_rescale(schedule: NoiseSchedule, sampler: str) -> None:
    """Raise for a zero-SNR rescaled schedule when ``sampler``'s diffusers scheduler lacks the
    rescale (``WITHOUT_ZERO_SNR_RESCALE``): fastdiff refuses rather than differ from it."""
    if not schedule.rescale_betas_zero_snr:
        return
    for prefix, scheduler in WITHOUT_ZERO_SNR_RESCALE:
        if sampler.startswith(prefix):
            raise ValueError(
                f"{sampler}: {scheduler} has no rescale_betas_zero_snr (diffusers samples the "
                "unrescaled schedule); fastdiff refuses rather than differ: use euler, or a "
                "schedule without the rescale"
            )


def make_plan(
    schedule: NoiseSchedule,
    sampler: str = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    lcm_strength: float = 1.0,
) -> SamplingPlan:
    """Compile ``sampler`` over ``steps`` timesteps of ``schedule`` into a :class:`SamplingPlan`.

    ``eta`` (Song et al. 2021, Eq. 16) is the DDIM noise level: 0 deterministic, 1 DDPM-like; the
    other samplers have fixed noise and accept only ``eta=0``. ``dpmpp_2m_sde`` is the SDE
    variant of DPM-Solver++(2M); the ``*_karras`` samplers step through Karras et al.'s noise
    levels (diffusers' DPMSolverMultistepScheduler / EulerDiscreteScheduler with
    ``use_karras_sigmas``; see ``karras_plan_inputs``); ``lcm`` is the multistep sampling of
    latent consistency models (LCMScheduler: LCM checkpoints and LCM-LoRAs, a few steps);
    ``lcm_strength`` < 1 takes its steps within that share of its distillation schedule
    (LCMScheduler's ``strength``, LatentConsistencyModelImg2ImgPipeline's img2img); ``tcd``
    (TCDScheduler, for TCD-LoRAs) takes the same timesteps, with ``eta`` as its gamma.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; allowed: {list(SAMPLERS)}")
    eta = float(eta)
    if not 0.0 <= eta <= 1.0:
        # Above 1 the DDIM direction term sqrt(1 - ā' - s^2) can become imaginary.
        raise ValueError(f"eta must lie in [0, 1], got {eta}")
    if eta != 0 and sampler not in ("ddim", "tcd"):
        raise ValueError(
            f"eta applies to the 'ddim' and 'tcd' (its gamma) samplers only; {sampler!r} needs "
            "eta=0"
        )
    if sampler in ("ddim", "ddpm") and schedule.clip_sample is None:
        raise ValueError(
            f"the scheduler config leaves clip_sample out, and the diffusers scheduler {sampler!r} "
            "reproduces (DDIMScheduler / DDPMScheduler) then clips x0 to [-1, 1] (its default), "
            'which fastdiff does not implement: add "clip_sample": false to '
            "scheduler_config.json, or use another sampler"
        )
    if lcm_strength != 1.0 and sampler not in ("lcm", "tcd"):
        raise ValueError(
            f"lcm_strength applies to the 'lcm' and 'tcd' samplers only, not {sampler!r}"
        )
    karras = sampler.endswith("_karras")
    # The Euler family calls the model at diffusers' own, possibly fractional, timesteps; Heun
    # takes Euler's timesteps and noise levels (HeunDiscreteScheduler spaces them the same way).
    fractions = sampler.startswith(("euler", "heun", "lms", "kdpm2"))
    heun = sampler.startswith("heun")
    lms = sampler.startswith("lms")
    kdpm2 = sampler.startswith("kdpm2")
    if sampler == "pndm":
        check_pndm(schedule)
    refuse_zero_snr_rescale(schedule, sampler)
    if karras and kdpm2:
        # KDPM2DiscreteScheduler's Karras levels span its spaced levels, as Euler's do, or a
        # config's sigma_min / sigma_max (not its own keys, but read from its config, where
        # from_config keeps them), and it rounds their timesteps
        ends = euler_spacing_ends(
            schedule.num_train_timesteps, steps, schedule.timestep_spacing, schedule.steps_offset
        )
        timesteps, sigmas = karras_sigmas(
            clamped_alphas_cumprod(schedule),
            steps,
            True,
            sigma_min=schedule.sigma_min,
            sigma_max=schedule.sigma_max,
            ends_at=ends,
        )
    elif karras:
        base = "euler_karras" if heun or lms else sampler
        # (LMSDiscreteScheduler's Karras levels ignore a config's sigma_min / sigma_max)
        levels = dataclasses.replace(schedule, sigma_min=None, sigma_max=None) if lms else schedule
        timesteps, sigmas = karras_plan_inputs(levels, steps, base, keep_fraction=fractions)
    elif sampler in ("lcm", "tcd"):  # TCDScheduler takes LCMScheduler's timesteps
        original = schedule.original_inference_steps
        timesteps = lcm_timesteps(schedule.num_train_timesteps, steps, original, lcm_strength)
    else:
        base = "euler" if heun or lms or kdpm2 else sampler
        timesteps = schedule.timesteps(steps, base, keep_fraction=fractions)
    timesteps = _integral_as_long(timesteps)
    visited = timesteps.tolist()
    init_noise_scale = 1.0
    try:
        if sampler == "ddim":
            rows = ddim_rows(schedule, visited, eta)
        elif sampler == "lcm":
            rows = lcm_rows(schedule, visited)
        elif sampler == "tcd":
            rows = tcd_rows(schedule, visited, eta)
        elif sampler == "ddpm":
            rows = ddpm_rows(schedule, visited)
        elif sampler == "pndm":
            rows = pndm_rows(schedule, visited, steps)
        elif sampler.startswith("euler"):
            if not karras:
                sigmas = sigmas_at(schedule, visited)
            rows, init_noise_scale = euler_rows(
                schedule, visited, sigmas, sampler == "euler_ancestral"
            )
        elif lms:
            if not karras:
                sigmas = sigmas_at(schedule, visited)
            rows, init_noise_scale = lms_rows(schedule, visited, sigmas)
        elif kdpm2:
            if not karras:
                sigmas = float32_sigmas_at(schedule, visited)
            ancestral = "_ancestral" in sampler
            rows, init_noise_scale = kdpm2_rows(schedule, visited, sigmas, ancestral)
            # each row's model call: the step's timestep and level, then its midpoint's
            timesteps, sigmas = kdpm2_call_levels(schedule, timesteps, sigmas, ancestral)
            timesteps = _integral_as_long(timesteps)
        elif heun:
            if not karras:
                sigmas = sigmas_at(schedule, visited)
            rows, init_noise_scale, at_step = heun_rows(schedule, visited, sigmas)
            # each row's model call: its step's timestep and noise level (then 0 after the last)
            timesteps = timesteps[at_step]
            sigmas = [sigmas[i] for i in at_step] + [0.0]
        elif sampler.startswith("unipc"):
            if not karras:
                sigmas = sigmas_at(schedule, visited)
            rows = unipc_rows(schedule, visited, sigmas)
        else:
            if schedule.solver_type == "heun":
                raise ValueError(
                    "solver_type 'heun' (DPM-Solver++'s Heun-type second order update) is not "
                    f"implemented; {sampler!r} takes the midpoint update (solver_type 'midpoint')"
                )
            if not karras:
                sigmas = sigmas_at(schedule, visited)
            order = 3 if sampler.startswith("dpmpp_3m") else 2
            rows = dpmpp_rows(schedule, visited, sigmas, sde="_sde" in sampler, order=order)
    except ZeroDivisionError as error:  # 0 / 0 where alphā is 0 at two timesteps a row reads
        raise _degenerate_schedule_error(schedule, sampler) from error
    coefficients = _coefficient_table(rows)
    if not bool(torch.isfinite(coefficients).all()):
        raise _degenerate_schedule_error(schedule, sampler)
    if sampler in ("ddim", "ddpm", "lcm", "tcd", "pndm"):
        alphas_cumprod = schedule.alphas_cumprod[timesteps]
    else:  # the sigma samplers' own levels (clamped under zero SNR, or Karras')
        alphas_cumprod = 1.0 / (torch.tensor(sigmas[:-1], dtype=torch.float64) ** 2 + 1.0)
    return SamplingPlan(
        sampler, timesteps, coefficients, float(init_noise_scale), eta, alphas_cumprod
    )


def _degenerate_schedule_error(schedule: NoiseSchedule, sampler: str) -> ValueError:
    """The error for a plan that cannot be computed: names where the schedule's alphā is 0."""
    message = f"{sampler} plan has non-finite coefficients for this schedule"
    zeros = (schedule.alphas_cumprod == 0).nonzero().flatten().tolist()
    if zeros:
        message += (
            f": its alphā is 0 (an infinite noise level) from timestep {zeros[0]} of "
            f"0..{schedule.num_train_timesteps - 1} on"
        )
        if not schedule.rescale_betas_zero_snr or len(zeros) > 1:
            message += ", where it underflows; use smaller betas (beta_end, trained_betas)"
    return ValueError(message)


def _coefficient_table(rows: list[list[float]]) -> torch.Tensor:
    """The float64 [S, NUM_COEFFICIENTS] table of row lists; the samplers that read at most one
    row back write 7 columns, and c7..c9 are 0 for them."""
    return torch.tensor(
        [row + [0.0] * (NUM_COEFFICIENTS - len(row)) for row in rows], dtype=torch.float64
    )


def restarted_coefficients(
    plan: SamplingPlan, start_step: int, schedule: NoiseSchedule | None = None
) -> torch.Tensor:
    """The coefficient rows ``start_step:`` of ``plan`` for a run that starts there (img2img,
    a refiner's ``denoising_start``), whose multistep history starts empty, as diffusers'
    schedulers start after ``set_begin_index``. Where a row's weights do not depend on the
    start (DPM-Solver++(2M): x0_prev := x0, first order), the older slots a row cannot have yet
    are folded into the earliest estimate it has. UniPC, DPM-Solver++(3M), PNDM and LMS change
    their first rows' weights (UniPC: no corrector at the first step, a first-order one at the
    second; 3M: a second-order second step; PNDM: its method begun again; LMS: the whole run's
    order over fewer derivatives): those rows are built again from the plan's timesteps and
    noise levels, which needs the ``schedule``."""
    if not 0 <= start_step < len(plan):
        raise ValueError(f"start_step {start_step} out of range for a {len(plan)}-step plan")
    rebuilt = plan.sampler.startswith(("unipc", "dpmpp_3m", "pndm", "lms"))
    if rebuilt and start_step > 0:
        if schedule is None:
            raise ValueError(f"restarting a {plan.sampler} plan part-way needs its schedule")
        alphas_cumprod = plan.alphas_cumprod.tolist()
        sigmas = [math.sqrt((1.0 - a) / a) for a in alphas_cumprod] + [0.0]
        timesteps = plan.timesteps.tolist()
        if plan.sampler.startswith("lms"):
            rows = lms_rows(schedule, timesteps, sigmas, begin=start_step)[0]
        elif plan.sampler == "pndm":
            steps = len(timesteps) - (len(timesteps) > 1)  # one repeated call
            rows = pndm_rows(schedule, timesteps, steps, begin=start_step)
        elif plan.sampler.startswith("unipc"):
            rows = unipc_rows(schedule, timesteps, sigmas, begin=start_step)
        else:
            sde = "_sde" in plan.sampler
            rows = dpmpp_rows(schedule, timesteps, sigmas, sde, order=3, begin=start_step)
        return _coefficient_table(rows)
    coefficients = plan.coefficients[start_step:].clone()
    if start_step > 0:
        # Row r of the run has r estimates behind it: the older slots it would read stand for
        # the run's first estimate, which is in slot r (slot 0: the row's own x0).
        columns = (NEXT_FROM_X0, *HISTORY_COLUMNS)
        for r in range(min(len(HISTORY_COLUMNS), coefficients.shape[0])):
            row = coefficients[r]
            for column in columns[r + 1 :]:
                row[columns[r]] += row[column]
                row[column] = 0.0
    return coefficients


def history_depth(coefficients: torch.Tensor) -> int:
    """The deepest history slot a coefficient table [S, 10] reads (0: none; see
    ``SamplingPlan.history_depth``)."""
    depth = 0
    for slot, column in enumerate(HISTORY_COLUMNS, start=1):
        if bool((coefficients[:, column] != 0).any()):
            depth = slot
    return depth


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half precision states are updated in fp32; fp32 and fp64 keep their own precision.
    return torch.promote_types(dtype, torch.float32)


def apply_plan_row(
    row: Sequence[float] | torch.Tensor,
    x: torch.Tensor,
    model_output: torch.Tensor,
    x0_prev: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    guidance_scale: float | None = None,
    x0_older: Sequence[torch.Tensor] | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step from a coefficient row (10 floats, or a [10] tensor): returns (x_next, x0).

    ``model_output`` is the model output at input ``row[0] * x``: shaped like x, or, with
    ``guidance_scale`` w given, the [2B, ...] batch [uncond; cond] combined here as
    uncond + w (cond - uncond) (the fused kernel's inputs). ``x0_prev`` is the previous step's x0
    (None or zeros at step 0), ``x0_older`` the ones before it, two, three and four rows back
    (a sequence, or a stacked [K, ...] tensor, K <= 3; missing ones count as zeros);
    ``noise`` is required iff ``row[6] != 0``. Arithmetic is in fp32
    (fp64 for fp64 inputs); results are returned in x's dtype.
    """
    dtype = _compute_dtype(x.dtype)
    if guidance_scale is not None:
        if model_output.shape[0] != 2 * x.shape[0] or model_output.shape[1:] != x.shape[1:]:
            raise ValueError(
                f"guided model output shape {tuple(model_output.shape)} must be [uncond; cond] "
                f"with twice the batch of the sample shape {tuple(x.shape)}"
            )
        uncond, cond = model_output.to(dtype).chunk(2)
        model_output = uncond + float(guidance_scale) * (cond - uncond)
    if model_output.shape != x.shape:
        raise ValueError(
            f"model output shape {tuple(model_output.shape)} != sample shape {tuple(x.shape)}"
        )
    if isinstance(row, torch.Tensor):
        row = row.detach().to("cpu", torch.float64).tolist()
    if len(row) != NUM_COEFFICIENTS:
        raise ValueError(f"a plan row has {NUM_COEFFICIENTS} coefficients, got {len(row)}")
    c0, c1, c2, c3, c4, c5, c6, *older_weights = (float(value) for value in row)
    state = x.to(dtype)
    x0 = c1 * (c0 * state) + c2 * model_output.to(dtype)
    x_next = c3 * state + c4 * x0
    if c5 != 0 and x0_prev is not None:
        x_next = x_next + c5 * x0_prev.to(dtype)
    older = [] if x0_older is None else list(x0_older)
    if len(older) > len(older_weights):
        raise ValueError(f"x0_older holds {len(older)} estimates; a row reads at most 3")
    for weight, estimate in zip(older_weights, older, strict=False):
        if weight != 0:
            x_next = x_next + weight * estimate.to(dtype)
    if c6 != 0:
        if noise is None:
            raise ValueError("this plan step adds noise (NOISE_STD != 0) but noise is None")
        if noise.shape != x.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != sample shape {tuple(x.shape)}")
        x_next = x_next + c6 * noise.to(dtype)
    return x_next.to(x.dtype), x0.to(x.dtype)


def plan_step(
    plan: SamplingPlan,
    index: int,
    x: torch.Tensor,
    model_output: torch.Tensor,
    x0_prev: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    guidance_scale: float | None = None,
    x0_older: Sequence[torch.Tensor] | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply row ``index`` of ``plan`` eagerly: returns (x_next, x0). The reference for the fused
    sampler-step kernel; see :func:`apply_plan_row` for the arguments (``guidance_scale`` takes
    an unguided [uncond; cond] model output; guidance rescale needs ``combine_guidance`` first)."""
    if not 0 <= index < len(plan):
        raise ValueError(f"step index {index} out of range for a {len(plan)}-step plan")
    row = plan.coefficients[index].tolist()
    return apply_plan_row(row, x, model_output, x0_prev, noise, guidance_scale, x0_older)


def model_input(plan: SamplingPlan, index: int, x: torch.Tensor) -> torch.Tensor:
    """The model's input at step ``index``: c0 * x in x's dtype (VP scale)."""
    scale = float(plan.coefficients[index, INPUT_SCALE])
    if scale == 1.0:
        return x
    return (x.to(_compute_dtype(x.dtype)) * scale).to(x.dtype)
