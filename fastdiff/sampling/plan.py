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
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fastdiff.sampling.schedule import NoiseSchedule
from fastdiff.sampling.spacing import (
    euler_spacing_ends,
    karras_sigmas,
    lcm_timesteps,
    timesteps_of_sigmas,
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


def _x0_coefficients(alpha_bar: float, prediction_type: str, timestep: int) -> tuple[float, float]:
    """(c1, c2) with x0 = c1 x_t + c2 m for a VP input x_t at noise level alpha_bar."""
    signal, sigma = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    if prediction_type == "sample":
        return 0.0, 1.0
    if prediction_type == "v_prediction":
        return signal, -sigma
    if alpha_bar == 0.0:
        raise ValueError(
            f"an epsilon-prediction model cannot be sampled from timestep {timestep}: alphā is 0 "
            "there (zero terminal SNR), so x0 = (x - eps) / 0 is undefined; use v_prediction, "
            "'leading' timestep_spacing, or the euler / dpmpp_2m samplers (which clamp alphā); "
            "the lcm sampler always starts at the last timestep: v_prediction only"
        )
    return 1.0 / signal, -sigma / signal


def _vp_row(
    alpha_bar: float, alpha_bar_next: float, noise_std: float, prediction_type: str, t: int
) -> list[float]:
    """DDIM-form update (Song et al. 2021, Eq. 12):
    x_next = sqrt(ā') x0 + sqrt(1 - ā' - s^2) eps + s z with eps = (x - sqrt(ā) x0)/sqrt(1 - ā)."""
    c1, c2 = _x0_coefficients(alpha_bar, prediction_type, t)
    direction = math.sqrt(max(1.0 - alpha_bar_next - noise_std**2, 0.0)) / math.sqrt(
        1.0 - alpha_bar
    )
    c4 = math.sqrt(alpha_bar_next) - direction * math.sqrt(alpha_bar)
    return [1.0, c1, c2, direction, c4, 0.0, noise_std]


def _ddim_rows(schedule: NoiseSchedule, timesteps: list[int], eta: float) -> list[list[float]]:
    """DDIM (Song et al. 2021, Eq. 12 and 16). As in diffusers' DDIMScheduler the previous
    timestep is t - num_train_timesteps // steps (not necessarily the next visited timestep), and
    past t = 0 alphā is 1 (``set_alpha_to_one``) or alphā_0."""
    alphas_cumprod = schedule.alphas_cumprod.tolist()
    # None: the config left it out, and DDIMScheduler's default is true.
    final = alphas_cumprod[0] if schedule.set_alpha_to_one is False else 1.0
    jump = schedule.num_train_timesteps // len(timesteps)
    rows = []
    for t in timesteps:
        alpha_bar = alphas_cumprod[t]
        alpha_bar_next = alphas_cumprod[t - jump] if t - jump >= 0 else final
        variance = (1 - alpha_bar_next) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_next)
        rows.append(
            _vp_row(
                alpha_bar, alpha_bar_next, eta * math.sqrt(variance), schedule.prediction_type, t
            )
        )
    return rows


def _ddpm_rows(schedule: NoiseSchedule, timesteps: list[int]) -> list[list[float]]:
    """Ancestral DDPM (Ho et al. 2020, Eq. 6-7, fixed-small variance beta~): sample the posterior
    q(x_{t'} | x_t, x0) with x0 predicted, over the visited timesteps t -> t' (t' = next visited
    timestep, alphā = 1 after the last, as diffusers' DDPMScheduler does)."""
    alphas_cumprod = schedule.alphas_cumprod.tolist()
    rows = []
    for index, t in enumerate(timesteps):
        alpha_bar = alphas_cumprod[t]
        is_last = index + 1 == len(timesteps)
        alpha_bar_next = 1.0 if is_last else alphas_cumprod[timesteps[index + 1]]
        beta = 1.0 - alpha_bar / alpha_bar_next  # effective beta of the (possibly skipped) step
        c1, c2 = _x0_coefficients(alpha_bar, schedule.prediction_type, t)
        from_x0 = math.sqrt(alpha_bar_next) * beta / (1.0 - alpha_bar)
        from_x = math.sqrt(1.0 - beta) * (1.0 - alpha_bar_next) / (1.0 - alpha_bar)
        variance = (1.0 - alpha_bar_next) / (1.0 - alpha_bar) * beta
        rows.append([1.0, c1, c2, from_x, from_x0, 0.0, math.sqrt(max(variance, 0.0))])
    return rows


def _lcm_rows(schedule: NoiseSchedule, timesteps: list[int]) -> list[list[float]]:
    """Multistep consistency sampling (Luo et al. 2023, "Latent Consistency Models", Algorithm 3;
    diffusers' LCMScheduler): at each step the consistency function
    f(x, t) = c_skip(t) x + c_out(t) x0(x, m), with the boundary-condition weights
    c_skip = s^2 / ((t k)^2 + s^2), c_out = t k / sqrt((t k)^2 + s^2) (s = 0.5, k the
    ``timestep_scaling``), is the row's x0; the next state is that estimate forward-diffused to
    the next visited timestep with fresh noise, and the last step returns it as it is."""
    alphas_cumprod = schedule.alphas_cumprod.tolist()
    scaling = 10.0 if schedule.timestep_scaling is None else float(schedule.timestep_scaling)
    sigma_data = 0.5
    rows = []
    for index, t in enumerate(timesteps):
        scaled = t * scaling
        c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
        c_out = scaled / math.sqrt(scaled**2 + sigma_data**2)
        c1, c2 = _x0_coefficients(alphas_cumprod[t], schedule.prediction_type, t)
        if index + 1 == len(timesteps):
            signal, noise_std = 1.0, 0.0
        else:
            alpha_bar_next = alphas_cumprod[timesteps[index + 1]]
            signal, noise_std = math.sqrt(alpha_bar_next), math.sqrt(1.0 - alpha_bar_next)
        rows.append([1.0, c_out * c1 + c_skip, c_out * c2, 0.0, signal, 0.0, noise_std])
    return rows


def _tcd_rows(schedule: NoiseSchedule, timesteps: list[int], gamma: float) -> list[list[float]]:
    """Trajectory consistency distillation's strategic stochastic sampling (Zheng et al. 2024,
    "Trajectory Consistency Distillation"; diffusers' TCDScheduler): from t the model's x0 and
    noise estimates jump to the earlier timestep s = floor((1 - gamma) t'), t' the next visited
    timestep (0 after the last), x_s = sqrt(ā_s) x0 + sqrt(1 - ā_s) eps; with gamma > 0 fresh
    noise then brings x_s back up to t' (not after the last step). eps is taken from x and x0,
    eps = (x - sqrt(ā_t) x0) / sqrt(1 - ā_t), which is the model's own for every prediction
    type."""
    alphas_cumprod = schedule.alphas_cumprod.tolist()
    rows = []
    for index, t in enumerate(timesteps):
        last = index + 1 == len(timesteps)
        t_next = 0 if last else timesteps[index + 1]
        # in float32, as diffusers' torch.floor((1 - eta) * prev_timestep) rounds it
        s = int(torch.floor((1.0 - gamma) * torch.tensor(t_next)))
        alpha_t, alpha_s, alpha_next = alphas_cumprod[t], alphas_cumprod[s], alphas_cumprod[t_next]
        c1, c2 = _x0_coefficients(alpha_t, schedule.prediction_type, t)
        from_x = math.sqrt(1.0 - alpha_s) / math.sqrt(1.0 - alpha_t)
        from_x0 = math.sqrt(alpha_s) - from_x * math.sqrt(alpha_t)
        scale, noise_std = 1.0, 0.0
        if gamma > 0 and not last:
            scale = math.sqrt(alpha_next / alpha_s)
            noise_std = math.sqrt(max(1.0 - alpha_next / alpha_s, 0.0))
        rows.append([1.0, c1, c2, scale * from_x, scale * from_x0, 0.0, noise_std])
    return rows


def _clamped_alphas_cumprod(schedule: NoiseSchedule) -> torch.Tensor:
    """alphā with, under zero terminal SNR, the last value clamped to 2**-24 (sigma ~ 4096), as
    diffusers' Euler and DPM-Solver schedulers do, so the first state and step stay finite."""
    alphas_cumprod = schedule.alphas_cumprod.clone()
    if schedule.rescale_betas_zero_snr:
        alphas_cumprod[-1] = 2.0**-24
    return alphas_cumprod


def _sigmas_at(schedule: NoiseSchedule, timesteps: list[float]) -> list[float]:
    """sigma_t = sqrt((1 - alphā_t) / alphā_t) at the visited timesteps (alphā clamped, see
    ``_clamped_alphas_cumprod``), then 0. A fractional timestep (Euler's ``linspace`` points)
    takes sigma interpolated linearly between its two neighbours, as diffusers'
    EulerDiscreteScheduler does (``interpolation_type`` "linear"); an integer one the table's."""
    values = _clamped_alphas_cumprod(schedule)
    table = ((1 - values) / values).sqrt()
    points = torch.tensor(timesteps, dtype=torch.float64)
    low = points.floor().long().clamp(max=table.shape[0] - 1)
    high = (low + 1).clamp(max=table.shape[0] - 1)
    weight = points - low.double()
    sigmas = table[low] + weight * (table[high] - table[low])
    return sigmas.tolist() + [0.0]


def _float32_sigmas_at(schedule: NoiseSchedule, timesteps: list[float]) -> list[float]:
    """``_sigmas_at`` as KDPM2's schedulers compute it: the table in float32 arithmetic,
    interpolated, and the levels rounded to float32 (KDPM2AncestralDiscreteScheduler's
    sigma_down cancels near-equal squares, so its value depends on those last bits)."""
    table32 = schedule.alphas_cumprod.to(torch.float32)
    table = (((1 - table32) / table32) ** 0.5).numpy()
    levels = np.interp(np.array(timesteps, dtype=np.float64), np.arange(table.shape[0]), table)
    return levels.astype(np.float32).astype(np.float64).tolist() + [0.0]


def _integral_as_long(timesteps: torch.Tensor) -> torch.Tensor:
    """Timesteps that are all whole numbers as a LongTensor; fractional ones as they are."""
    if timesteps.dtype.is_floating_point and bool((timesteps == timesteps.round()).all()):
        return timesteps.round().long()
    return timesteps


def karras_plan_inputs(
    schedule: NoiseSchedule, steps: int, sampler: str = "dpmpp_2m_karras", keep_fraction=False
) -> tuple[torch.Tensor, list[float]]:
    """(timesteps, sigmas) of a ``*_karras`` sampler (``karras_sigmas``). DPM-Solver's levels span
    the whole table and its timesteps are rounded (truncated for cosine), as diffusers does.
    Euler's span the sigmas of its spaced timesteps, and diffusers calls the model at the
    fractional timesteps of those levels. ``keep_fraction``: Euler's fractional timesteps
    themselves (float64; what ``make_plan`` uses), else rounded to the nearest integers."""
    alphas_cumprod = _clamped_alphas_cumprod(schedule)
    bounds = dict(sigma_min=schedule.sigma_min, sigma_max=schedule.sigma_max)
    if sampler == "euler_karras":
        ends = euler_spacing_ends(
            schedule.num_train_timesteps, steps, schedule.timestep_spacing, schedule.steps_offset
        )
        return karras_sigmas(
            alphas_cumprod,
            steps,
            True,
            ends_at=ends,
            float32_timesteps=True,
            keep_fraction=keep_fraction,
            **bounds,
        )
    # DPMSolverMultistepScheduler truncates the cosine schedule's, UniPCMultistepScheduler rounds
    cosine = schedule.beta_schedule == "squaredcos_cap_v2" and not sampler.startswith("unipc")
    return karras_sigmas(alphas_cumprod, steps, round_timesteps=not cosine, **bounds)


def _euler_rows(
    schedule: NoiseSchedule, timesteps: list[int], sigmas: list[float], ancestral: bool = False
) -> tuple[list[list[float]], float]:
    """Euler's method on the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma
    (Karras et al. 2022, Algorithm 1 with gamma = 0; diffusers' EulerDiscreteScheduler defaults).
    The state is x = x_vp * sqrt(sigma^2 + 1); the model sees x / sqrt(sigma^2 + 1). The start
    state is sqrt(sigma_max^2 + 1) * x_T (x_T ~ N(0, I) in VP scale); diffusers' init_noise_sigma
    equals it for ``leading`` but is sigma_max for ``linspace``/``trailing`` (0.2% less for SD).

    ``ancestral`` (diffusers' EulerAncestralDiscreteScheduler, k-diffusion's Euler ancestral with
    eta = 1): each step to sigma' is an ODE step to sigma_down plus fresh noise of std sigma_up,
    sigma_up^2 = sigma'^2 (sigma^2 - sigma'^2) / sigma^2, sigma_down^2 = sigma'^2 - sigma_up^2,
    so the state again has noise level sigma' (Song et al. 2021's reverse SDE, discretised).
    ``sigmas``: the steps' noise levels, then 0 (the schedule's at the timesteps, or Karras')."""
    rows = []
    for index, t in enumerate(timesteps):
        sigma, sigma_next = sigmas[index], sigmas[index + 1]
        c1, c2 = _x0_coefficients(1.0 / (sigma**2 + 1.0), schedule.prediction_type, t)
        noise_std = 0.0
        if ancestral:
            require_falling_noise(sigma, sigma_next, t, "euler_ancestral")
            noise_std = math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
            sigma_next = math.sqrt(sigma_next**2 - noise_std**2)  # sigma_down
        ratio = sigma_next / sigma
        rows.append([1.0 / math.sqrt(sigma**2 + 1.0), c1, c2, ratio, 1.0 - ratio, 0.0, noise_std])
    return rows, math.sqrt(sigmas[0] ** 2 + 1.0)


def require_falling_noise(sigma: float, sigma_next: float, t: int, sampler: str) -> None:
    """A stochastic step's fresh noise has variance ~ sigma^2 - sigma_next^2: a noise level that
    rises gives no real std (it raised "math domain error"; diffusers gives NaN)."""
    if sigma_next > sigma:
        raise ValueError(
            f"{sampler}: the noise level rises from sigma {sigma:.4g} to {sigma_next:.4g} after "
            f"t = {t}, so the step's noise would need a negative variance. Under "
            "rescale_betas_zero_snr this happens when alphā falls below 2**-24, the value the "
            "last step is clamped to, before the last step: use a smaller beta_end or a "
            "deterministic sampler"
        )


def pndm_calls(timesteps: torch.Tensor) -> torch.Tensor:
    """PNDMScheduler's model calls (``skip_prk_steps``) for its descending spaced ``timesteps``:
    each once, the second twice (the repeated call that gives its first step second order)."""
    if timesteps.shape[0] < 2:
        return timesteps.clone()
    return torch.cat([timesteps[:2], timesteps[1:]])


def _pndm_rows(
    schedule: NoiseSchedule, calls: list[int], steps: int, begin: int = 0
) -> list[list[float]]:
    """Pseudo linear multistep (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models
    on Manifolds", PLMS with its second-order start; diffusers' PNDMScheduler with
    skip_prk_steps): every call's update is the DDIM-type transfer (the paper's Eq. 9) from t to
    t' = t - T // steps,

        phi(x, e) = sqrt(a'/a) x - (a' - a) e / (a sqrt(1 - a') + sqrt(a (1 - a) a')),

    of a combination e of the model outputs e_k (eps, or for v-prediction
    sqrt(a) v + sqrt(1 - a) x): e_0 at the first call, (e_1 + e_0) / 2 at the repeated second
    call (which redoes the first step from its start: x_0 = (x_1' - B e_0) / A), then Adams-
    Bashforth weights over the outputs kept so far (e_1 is not kept): (3, -1) / 2,
    (23, -16, 5) / 12, (55, -59, 37, -9) / 24. The rows keep the raw model outputs as their
    history (c1 = 0, c2 = 1), so the combination reads up to four rows back. Rows ``begin:``
    are a run started at call ``begin`` (img2img), whose first two calls start the method
    again, as PNDMScheduler's call counter does."""
    alphas_cumprod = schedule.alphas_cumprod.tolist()
    final = 1.0 if schedule.set_alpha_to_one is True else alphas_cumprod[0]
    jump = schedule.num_train_timesteps // steps
    v_prediction = schedule.prediction_type == "v_prediction"

    def transfer(t: int, t_prev: int) -> tuple[float, float]:
        """(A, B) with phi(x, e_raw) = A x + B e_raw for a raw model output at timestep t."""
        a = alphas_cumprod[t]
        a_prev = alphas_cumprod[t_prev] if t_prev >= 0 else final
        gain = (a_prev - a) / (a * math.sqrt(1.0 - a_prev) + math.sqrt(a * (1.0 - a) * a_prev))
        from_x, from_e = math.sqrt(a_prev / a), -gain
        if v_prediction:  # e = sqrt(a) v + sqrt(1 - a) x
            from_x, from_e = from_x - gain * math.sqrt(1.0 - a), -gain * math.sqrt(a)
        return from_x, from_e

    rows = []
    for index in range(begin, len(calls)):
        t, k = calls[index], index - begin
        # weights of (e_k, h1, h2, h3, h4): the model output now and one to four calls back
        if k == 1:  # the repeated call: from the first call's start, t + jump -> t
            from_x, from_e = transfer(t + jump, t)
            start_x, start_e = transfer(calls[index - 1], calls[index - 1] - jump)
            scale = from_x / start_x  # x_0 = (x - start_e h1) / start_x
            rows.append([1.0, 0.0, 1.0, scale, from_e / 2, from_e / 2 - scale * start_e, 0.0])
            continue
        from_x, from_e = transfer(t, t - jump)
        if k == 0:
            weights = (1.0, 0.0, 0.0, 0.0, 0.0)
        elif k == 2:  # kept: e_0 (two calls back), e_2
            weights = (1.5, 0.0, -0.5, 0.0, 0.0)
        elif k == 3:  # e_0 (three back), e_2, e_3
            weights = (23 / 12, -16 / 12, 0.0, 5 / 12, 0.0)
        elif k == 4:  # e_0 (four back), e_2, e_3, e_4
            weights = (55 / 24, -59 / 24, 37 / 24, 0.0, -9 / 24)
        else:
            weights = (55 / 24, -59 / 24, 37 / 24, -9 / 24, 0.0)
        now, h1, h2, h3, h4 = (from_e * w for w in weights)
        rows.append([1.0, 0.0, 1.0, from_x, now, h1, 0.0, h2, h3, h4])
    return rows


def _check_pndm(schedule: NoiseSchedule) -> None:
    """What PNDMScheduler would do differently from the ``pndm`` plan, refused."""
    if schedule.skip_prk_steps is not True:
        raise ValueError(
            "pndm: the scheduler config's skip_prk_steps is not true, so PNDMScheduler would "
            "start with Runge-Kutta warm-up steps, which fastdiff does not implement; fastdiff's "
            'pndm is its PLMS steps (add "skip_prk_steps": true, as Stable Diffusion 1.x '
            "folders have it), or use another sampler"
        )
    if schedule.prediction_type == "sample":
        raise ValueError("pndm: PNDMScheduler takes epsilon or v_prediction models, not sample")


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


def _lms_weights(sigmas: list[float], index: int, order: int) -> list[float]:
    """Linear multistep weights of the derivatives at steps index, index - 1, ...: the integral
    from sigma_index to sigma_(index+1) of each Lagrange basis polynomial through the last
    ``order`` noise levels (exact, as a polynomial integral; diffusers integrates numerically)."""
    nodes = [sigmas[index - k] for k in range(order)]
    weights = []
    for j, node in enumerate(nodes):
        others = [other for k, other in enumerate(nodes) if k != j]
        basis = np.polynomial.polynomial.polyfromroots(others) if others else np.array([1.0])
        scale = float(np.prod([node - other for other in others])) if others else 1.0
        antiderivative = np.polynomial.polynomial.polyint(basis / scale)
        upper, lower = (
            np.polynomial.polynomial.polyval(sigmas[index + 1], antiderivative),
            np.polynomial.polynomial.polyval(sigmas[index], antiderivative),
        )
        weights.append(float(upper - lower))
    return weights


def _lms_rows(
    schedule: NoiseSchedule, timesteps: list[float], sigmas: list[float], begin: int = 0
) -> tuple[list[list[float]], float]:
    """Linear multistep in sigma on the probability-flow ODE (k-diffusion's LMS; diffusers'
    LMSDiscreteScheduler, order 4): x_next = x + sum_k w_k d_(i-k), d = (x - x0) / sigma, with
    the Lagrange weights of ``_lms_weights`` over min(i + 1, 4) levels. The rows write d, not x0,
    into the history (x0' = c1' x_in + c2' m with c1' = (1 - c1 c0) / (sigma c0), c2' = -c2 /
    sigma), which reaches three rows back. Started part-way (``begin``), diffusers keeps the
    order of the whole run's step index but has only the derivatives since the start: the
    weights of the missing ones are dropped, as its ``zip`` drops them."""
    euler, init_noise_scale = _euler_rows(schedule, timesteps, sigmas)
    rows = []
    for index in range(begin, len(timesteps)):
        sigma = sigmas[index]
        c0, c1, c2 = euler[index][:3]
        order = min(index + 1, 4)
        weights = _lms_weights(sigmas, index, order)[: index - begin + 1]
        weights += [0.0] * (4 - len(weights))
        derivative = [c0, (1.0 - c1 * c0) / (sigma * c0), -c2 / sigma]
        rows.append([*derivative, 1.0, weights[0], weights[1], 0.0, weights[2], weights[3], 0.0])
    return rows, init_noise_scale


def _heun_rows(
    schedule: NoiseSchedule, timesteps: list[float], sigmas: list[float]
) -> tuple[list[list[float]], float, list[int]]:
    """Heun's method on the probability-flow ODE (Karras et al. 2022, Algorithm 1 with gamma = 0;
    diffusers' HeunDiscreteScheduler): each step from sigma to sigma' is an Euler step to
    x' = x + (sigma' - sigma) d, d = (x - x0) / sigma, then, after a second model call at x'
    (sigma'), x_next = x + (sigma' - sigma) (d + d') / 2 with d' = (x' - x0') / sigma'. The last
    step (sigma' = 0) is the Euler step alone. Two plan rows per step, one per model call: the
    Euler row, then the correction, written in the state it sees. Since x' - x0 = sigma' d,
    d = (x' - x0) / sigma' and d' - d = (x0 - x0') / sigma', so

        x_next = x' + (sigma' - sigma) (d' - d) / 2 = x' + k (x0' - x0),
        k = (sigma - sigma') / (2 sigma')

    (x0, the first call's estimate, is the row's previous x0). Returns the rows, the initial
    state's scale, and the step each row's model call belongs to (its timestep and sigma: the
    correction's are the next step's)."""
    euler, init_noise_scale = _euler_rows(schedule, timesteps, sigmas)
    rows, at_step = [], []
    for index, first in enumerate(euler):
        rows.append(first)
        at_step.append(index)
        sigma, sigma_next = sigmas[index], sigmas[index + 1]
        if sigma_next == 0.0:
            continue
        c1, c2 = _x0_coefficients(
            1.0 / (sigma_next**2 + 1.0), schedule.prediction_type, timesteps[index + 1]
        )
        k = (sigma - sigma_next) / (2.0 * sigma_next)
        rows.append([1.0 / math.sqrt(sigma_next**2 + 1.0), c1, c2, 1.0, k, -k, 0.0])
        at_step.append(index + 1)
    return rows, init_noise_scale, at_step


def kdpm2_targets(sigmas: list[float], ancestral: bool = False) -> list[tuple[float, float, float]]:
    """(target, noise std, midpoint) of each KDPM2 step but the last (whose next level is 0):
    the level sigma_t the step's ODE update reaches, the std of the fresh noise added after it,
    and the midpoint s = sqrt(sigma sigma_t), halfway in log sigma, where its second call is
    (diffusers' ``sigmas_interpol``). Plain KDPM2: the next level sigma', no noise. Ancestral
    (KDPM2AncestralDiscreteScheduler, as Euler ancestral splits a step): sigma_down =
    sqrt(sigma'^2 - sigma_up^2) with sigma_up^2 = sigma'^2 (sigma^2 - sigma'^2) / sigma^2, so
    that the state again has noise level sigma' (and s = sigma' in exact arithmetic). Those
    are computed in float32 as diffusers computes them: sigma_down cancels two near-equal
    squares, so at large steps (sigma' << sigma) its float32 value, which diffusers samples
    with, is off the exact one by 1e-4 relative. ``sigmas``: the steps' levels, then 0."""
    if not ancestral:
        return [
            (sigma_next, 0.0, math.sqrt(sigma * sigma_next))
            for sigma, sigma_next in zip(sigmas[:-2], sigmas[1:-1], strict=True)
        ]
    levels = torch.tensor(sigmas[:-1], dtype=torch.float32)
    following = torch.tensor(sigmas[1:], dtype=torch.float32)
    up = (following**2 * (levels**2 - following**2) / levels**2) ** 0.5
    down = (following**2 - up**2) ** 0.5
    mid = levels.log().lerp(down.log(), 0.5).exp()
    rows = zip(down.tolist(), up.tolist(), mid.tolist(), strict=True)
    return list(rows)[: len(sigmas) - 2]


def kdpm2_midpoints(sigmas: list[float], ancestral: bool = False) -> list[float]:
    """KDPM2's midpoint noise levels (``kdpm2_targets``), for every step but the last."""
    return [mid for _, _, mid in kdpm2_targets(sigmas, ancestral)]


def _kdpm2_rows(
    schedule: NoiseSchedule, timesteps: list[float], sigmas: list[float], ancestral: bool = False
) -> tuple[list[list[float]], float]:
    """KDPM2 (k-diffusion's ``sample_dpm_2``, DPM-Solver-2: Lu et al. 2022's second-order
    single-step solver in the sigma parametrisation; diffusers' KDPM2DiscreteScheduler): each
    step from sigma to its target sigma_t (``kdpm2_targets``: the next level sigma', or, with
    ``ancestral``, sigma_down before fresh noise of std sigma_up) takes an Euler step to the
    midpoint s = sqrt(sigma sigma_t), x_s = x + (s - sigma) d with d = (x - x0) / sigma, calls
    the model there, and steps from x with the midpoint's slope d_s = (x_s - x0_s) / s:
    x_next = x + (sigma_t - sigma) d_s (+ sigma_up z). The last step (sigma' = 0) is the Euler
    step alone. Two plan rows per step, one per model call, the second written in the state it
    sees: x = (sigma / s) x_s + (1 - sigma / s) x0, so

        x_next = (sigma_t / s) x_s + ((sigma - sigma_t) / s) x0_s + (1 - sigma / s) x0

    (x0, the first call's estimate, is the row's previous x0). Returns the rows and the initial
    state's scale (Euler's)."""
    name = "kdpm2_ancestral" if ancestral else "kdpm2"
    if schedule.prediction_type == "sample":
        scheduler = "KDPM2AncestralDiscreteScheduler" if ancestral else "KDPM2DiscreteScheduler"
        raise ValueError(
            f"{name}: {scheduler} does not implement prediction_type 'sample'; fastdiff refuses "
            "rather than differ: use epsilon or v_prediction"
        )
    if ancestral:
        for index in range(len(timesteps) - 1):
            require_falling_noise(sigmas[index], sigmas[index + 1], timesteps[index], name)
    euler, init_noise_scale = _euler_rows(schedule, timesteps, sigmas)
    targets = kdpm2_targets(sigmas, ancestral)
    rows = []
    for index, first in enumerate(euler):
        if index == len(targets):
            rows.append(first)  # the last step: Euler's, to the clean estimate
            continue
        sigma, (target, noise_std, mid) = sigmas[index], targets[index]
        ratio = mid / sigma
        rows.append([*first[:3], ratio, 1.0 - ratio, 0.0, 0.0])
        c1, c2 = _x0_coefficients(1.0 / (mid**2 + 1.0), schedule.prediction_type, timesteps[index])
        rows.append(
            [
                1.0 / math.sqrt(mid**2 + 1.0),
                c1,
                c2,
                target / mid,
                (sigma - target) / mid,
                1.0 - sigma / mid,
                noise_std,
            ]
        )
    return rows, init_noise_scale


def kdpm2_call_levels(
    schedule: NoiseSchedule, timesteps: torch.Tensor, sigmas: list[float], ancestral: bool = False
) -> tuple[torch.Tensor, list[float]]:
    """(timesteps, noise levels) of KDPM2's model calls, in call order: each step's own, then,
    for every step but the last, its midpoint's, at the fractional timestep of the midpoint's
    level (t interpolated in log sigma over the training table, as diffusers does; float64)."""
    mids = kdpm2_midpoints(sigmas, ancestral)
    table = _clamped_alphas_cumprod(schedule)
    log_table = (((1 - table) / table).sqrt()).log().numpy()
    mid_timesteps = timesteps_of_sigmas(log_table, np.array(mids, dtype=np.float64))
    calls, levels = [], []
    for index, t in enumerate(timesteps.double().tolist()):
        calls.append(t)
        levels.append(sigmas[index])
        if index < len(mids):
            calls.append(float(mid_timesteps[index]))
            levels.append(mids[index])
    return torch.tensor(calls, dtype=torch.float64), levels + [0.0]


def _dpmpp_rows(
    schedule: NoiseSchedule,
    timesteps: list[int],
    sigmas: list[float],
    sde: bool = False,
    order: int = 2,
    begin: int = 0,
) -> list[list[float]]:
    """DPM-Solver++(2M) and (3M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2 and its third-order
    multistep form, as diffusers' DPMSolverMultistepScheduler with solver_order 2 or 3 and the
    midpoint update): in lambda = log(alpha/sigma), with h this step's lambda increment and
    r0, r1 the two previous increments over h,

        x_next = (s_t/s_s) x + alpha_t (1 - e^-h) D0 + A D1 + B D2

    D0 = x0, D1_0 = (x0 - x0_prev) / r0, D1_1 = (x0_prev - x0_prev2) / r1. Second order:
    D1 = D1_0, A = alpha_t (1 - e^-h) / 2, no D2. Third order:
    D1 = D1_0 + r0 (D1_0 - D1_1) / (r0 + r1), D2 = (D1_0 - D1_1) / (r0 + r1),
    A = alpha_t ((e^-h - 1)/h + 1), B = -alpha_t ((e^-h - 1 + h)/h^2 - 1/2). The run's first step
    and the last (final sigma 0) are first order; with ``order`` 3 the second is second order,
    and so is the second-to-last when the run has fewer than 15 steps and the config's
    ``lower_order_final`` holds (diffusers' defaults). ``sigmas`` are the noise levels of the
    steps (then 0): the schedule's at the timesteps, or Karras'. Rows ``begin:`` are those of a
    run that starts at step ``begin`` (img2img), whose history starts there.

    ``sde`` (SDE-DPM-Solver++, Lu et al. 2022 sec. 5; diffusers' algorithm_type
    "sde-dpmsolver++"): x_next = (s_t/s_s) e^-h x + alpha_t (1 - e^-2h) D0 + A D1 + B D2
    + s_t sqrt(1 - e^-2h) z, with A = alpha_t (1 - e^-2h) / 2 at second order and
    A = alpha_t ((1 - e^-2h)/(-2h) + 1), B = alpha_t ((1 - e^-2h - 2h)/(2h)^2 - 1/2) at third."""
    count = len(timesteps)
    late_second = order == 3 and count < 15 and schedule.lower_order_final is not False
    rows = []
    for index in range(begin, count):
        t = timesteps[index]
        sigma, sigma_next = sigmas[index], sigmas[index + 1]
        alpha_next = 1.0 / math.sqrt(sigma_next**2 + 1.0)
        noise_scale_ratio = (sigma_next * alpha_next) * math.sqrt(sigma**2 + 1.0) / sigma
        # e^{-h} = sigma_t / sigma_s, since lambda = log(alpha / s) = -log(sigma).
        decay = sigma_next / sigma
        noise_std = 0.0
        if sde:
            require_falling_noise(sigma, sigma_next, t, f"dpmpp_{order}m_sde")
            noise_std = sigma_next * alpha_next * math.sqrt(1.0 - decay**2)
            noise_scale_ratio *= decay
            decay = decay**2
        gain = alpha_next * (1.0 - decay)  # alpha_t (1 - e^{-h}), or (1 - e^{-2h}) for the SDE
        c1, c2 = _x0_coefficients(1.0 / (sigma**2 + 1.0), schedule.prediction_type, t)
        step_order = order
        if index == begin or index == count - 1:
            step_order = 1
        elif index == begin + 1 or (late_second and index == count - 2):
            step_order = min(order, 2)
        from_x0, from_prev, from_prev2 = gain, 0.0, 0.0
        if step_order >= 2:
            step = math.log(sigma / sigma_next)
            r0 = math.log(sigmas[index - 1] / sigma) / step
            # D1_0 = (x0 - x0_prev) / r0 and D1_1 = (x0_prev - x0_prev2) / r1 over
            # (x0, x0_prev, x0_prev2)
            d1_0 = (1.0 / r0, -1.0 / r0, 0.0)
            if step_order == 2:
                weight = 0.5 * gain  # the midpoint update's D1 coefficient
                d1, d2, weight2 = d1_0, (0.0, 0.0, 0.0), 0.0
            else:
                r1 = math.log(sigmas[index - 2] / sigmas[index - 1]) / step
                d1_1 = (0.0, 1.0 / r1, -1.0 / r1)
                spread = [a - b for a, b in zip(d1_0, d1_1, strict=True)]
                d1 = [a + r0 / (r0 + r1) * b for a, b in zip(d1_0, spread, strict=True)]
                d2 = [b / (r0 + r1) for b in spread]
                if sde:
                    two_h = 2.0 * step
                    weight = alpha_next * (-math.expm1(-two_h) / -two_h + 1.0)
                    weight2 = alpha_next * ((-math.expm1(-two_h) - two_h) / two_h**2 - 0.5)
                else:
                    weight = alpha_next * (math.expm1(-step) / step + 1.0)
                    weight2 = -alpha_next * ((math.expm1(-step) + step) / step**2 - 0.5)
            from_x0 += weight * d1[0] + weight2 * d2[0]
            from_prev += weight * d1[1] + weight2 * d2[1]
            from_prev2 += weight * d1[2] + weight2 * d2[2]
        rows.append([1.0, c1, c2, noise_scale_ratio, from_x0, from_prev, noise_std, from_prev2])
    return rows


def _unipc_rows(
    schedule: NoiseSchedule, timesteps: list[int], sigmas: list[float], begin: int = 0
) -> list[list[float]]:
    """UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework", B(h) variants;
    diffusers' UniPCMultistepScheduler with its defaults: x0 prediction, solver_order 2, the
    corrector at every step, lower-order final step). Rows ``begin:`` are those of a run that
    starts at step ``begin`` (its multistep history starts there, as after diffusers'
    ``set_begin_index``); rows before ``begin`` are left out of the list.

    Step i is the corrector UniC on the state the previous step predicted (with the model's x0
    at it, which needs no second model call) followed by the predictor UniP. In lambda = -log
    sigma, with h the step's lambda increment, alpha_t the VP signal level and
    B(h) = e^h - 1 (bh2) or h (bh1) taken at -h:

        UniP:  x_{i+1} = (s_{i+1}/s_i) xc_i - a_{i+1} (e^-h - 1) x0_i - a_{i+1} B rho_p D1
        UniC:  xc_i    = (s_i/s_{i-1}) xc_{i-1} - a_i (e^-h - 1) x0_{i-1}
                         - a_i B (rho_c[0] D1' + rho_c[1] (x0_i - x0_{i-1}))

    with D1 = (x0_{i-1} - x0_i) / r the scaled difference to the previous estimate (r the ratio of
    the previous lambda step to this one), rho_p = 1/2 at second order, and rho_c solving UniC's
    order conditions (rho_c = [1/2] at first order). diffusers keeps xc_{i-1}, the corrected
    state before the predictor; the predictor that produced x_i moved from it with the same
    factor s_i/s_{i-1}, so xc_i = x_i + (a combination of x0 differences), and the row is
    linear in x_i, x0_i, x0_{i-1} and x0_{i-2} (``NEXT_FROM_OLDER_X0[0]``). The predictor is first
    order at the run's first step and at the last (final sigma 0), the corrector absent at the
    first and first order at the second. The last step is first order whatever the config's
    ``lower_order_final`` says: diffusers' second-order last step divides by a zero ratio of
    lambda steps there (lambda is infinite at sigma 0) and returns NaN latents."""
    bh1 = schedule.solver_type == "bh1"

    def log_snr(sigma: float) -> float:
        return math.inf if sigma == 0.0 else -math.log(sigma)

    def signal(sigma: float) -> float:  # alpha_t
        return 1.0 / math.sqrt(sigma**2 + 1.0)

    def noise_level(sigma: float) -> float:  # sigma_t = sigma * alpha_t (VP)
        return sigma * signal(sigma)

    def update(i: int, order: int) -> tuple[float, float, float, float]:
        """The predictor from step i to i + 1 at ``order``: (from_x, from_x0, from_prev,
        scaled_b) with x_{i+1} = from_x xc_i + from_x0 x0_i + from_prev x0_{i-1}, and
        scaled_b = a_{i+1} B(h), the factor of UniC's terms over the same step."""
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        alpha_next = signal(sigma_next)
        if sigma_next == 0.0:  # the last step: x_{i+1} = x0_i
            return 0.0, 1.0, 0.0, math.nan
        h = log_snr(sigma_next) - log_snr(sigma)
        phi = math.expm1(-h)
        scaled_b = alpha_next * (-h if bh1 else phi)
        from_x = noise_level(sigma_next) / noise_level(sigma)
        from_x0, from_prev = -alpha_next * phi, 0.0
        if order == 2:
            ratio = (log_snr(sigmas[i - 1]) - log_snr(sigma)) / h
            from_x0 += scaled_b * 0.5 / ratio
            from_prev = -scaled_b * 0.5 / ratio
        return from_x, from_x0, from_prev, scaled_b

    def corrector_weights(i: int, order: int) -> tuple[float, float]:
        """UniC's (rho_c[0], rho_c[1]) from step i - 1 to i (rho_c[0] = 0 at first order)."""
        if order == 1:
            return 0.0, 0.5
        h = log_snr(sigmas[i]) - log_snr(sigmas[i - 1])
        hh = -h
        b_h = hh if bh1 else math.expm1(hh)
        phi_k = math.expm1(hh) / hh - 1.0
        b1 = phi_k / b_h
        phi_k = phi_k / hh - 0.5
        b2 = phi_k * 2.0 / b_h
        ratio = (log_snr(sigmas[i - 2]) - log_snr(sigmas[i - 1])) / h
        # [[1, 1], [r, 1]] rho = [b1, b2]
        rho0 = (b1 - b2) / (1.0 - ratio)
        return rho0, b1 - rho0

    count = len(timesteps)
    orders = {}  # the predictor's order at each step (UniC at i + 1 takes the same order)
    rows = []
    for i in range(begin, count):
        t = timesteps[i]
        sigma = sigmas[i]
        c1, c2 = _x0_coefficients(1.0 / (sigma**2 + 1.0), schedule.prediction_type, t)
        order = 1 if i == begin or i == count - 1 else 2
        orders[i] = order
        from_x, from_x0, from_prev, _ = update(i, order)
        from_prev2 = 0.0
        if i > begin:
            # xc_i = x_i + k_cur x0_i + k_prev x0_{i-1} + k_prev2 x0_{i-2}: UniC minus the
            # predictor that gave x_i (both from xc_{i-1} by the same factor).
            corrector_order = orders[i - 1]
            _, _, _, scaled_b = update(i - 1, corrector_order)
            rho0, rho1 = corrector_weights(i, corrector_order)
            k_cur = -scaled_b * rho1
            k_prev = scaled_b * rho1
            k_prev2 = 0.0
            if corrector_order == 2:
                ratio = (log_snr(sigmas[i - 2]) - log_snr(sigmas[i - 1])) / (
                    log_snr(sigma) - log_snr(sigmas[i - 1])
                )
                # UniC's D1' term minus the predictor's (both in x0_{i-2} - x0_{i-1})
                weight = -scaled_b * (rho0 - 0.5) / ratio
                k_prev2 += weight
                k_prev -= weight
            from_x0 += from_x * k_cur
            from_prev += from_x * k_prev
            from_prev2 = from_x * k_prev2
        rows.append([1.0, c1, c2, from_x, from_x0, from_prev, 0.0, from_prev2])
    return rows


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
        _check_pndm(schedule)
    refuse_zero_snr_rescale(schedule, sampler)
    if karras and kdpm2:
        # KDPM2DiscreteScheduler's Karras levels span its spaced levels, as Euler's do (it has
        # no sigma_min / sigma_max keys), and it rounds their timesteps
        ends = euler_spacing_ends(
            schedule.num_train_timesteps, steps, schedule.timestep_spacing, schedule.steps_offset
        )
        timesteps, sigmas = karras_sigmas(
            _clamped_alphas_cumprod(schedule), steps, True, ends_at=ends
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
            rows = _ddim_rows(schedule, visited, eta)
        elif sampler == "lcm":
            rows = _lcm_rows(schedule, visited)
        elif sampler == "tcd":
            rows = _tcd_rows(schedule, visited, eta)
        elif sampler == "ddpm":
            rows = _ddpm_rows(schedule, visited)
        elif sampler == "pndm":
            rows = _pndm_rows(schedule, visited, steps)
        elif sampler.startswith("euler"):
            if not karras:
                sigmas = _sigmas_at(schedule, visited)
            rows, init_noise_scale = _euler_rows(
                schedule, visited, sigmas, sampler == "euler_ancestral"
            )
        elif lms:
            if not karras:
                sigmas = _sigmas_at(schedule, visited)
            rows, init_noise_scale = _lms_rows(schedule, visited, sigmas)
        elif kdpm2:
            if not karras:
                sigmas = _float32_sigmas_at(schedule, visited)
            ancestral = "_ancestral" in sampler
            rows, init_noise_scale = _kdpm2_rows(schedule, visited, sigmas, ancestral)
            # each row's model call: the step's timestep and level, then its midpoint's
            timesteps, sigmas = kdpm2_call_levels(schedule, timesteps, sigmas, ancestral)
            timesteps = _integral_as_long(timesteps)
        elif heun:
            if not karras:
                sigmas = _sigmas_at(schedule, visited)
            rows, init_noise_scale, at_step = _heun_rows(schedule, visited, sigmas)
            # each row's model call: its step's timestep and noise level (then 0 after the last)
            timesteps = timesteps[at_step]
            sigmas = [sigmas[i] for i in at_step] + [0.0]
        elif sampler.startswith("unipc"):
            if not karras:
                sigmas = _sigmas_at(schedule, visited)
            rows = _unipc_rows(schedule, visited, sigmas)
        else:
            if schedule.solver_type == "heun":
                raise ValueError(
                    "solver_type 'heun' (DPM-Solver++'s Heun-type second order update) is not "
                    f"implemented; {sampler!r} takes the midpoint update (solver_type 'midpoint')"
                )
            if not karras:
                sigmas = _sigmas_at(schedule, visited)
            order = 3 if sampler.startswith("dpmpp_3m") else 2
            rows = _dpmpp_rows(schedule, visited, sigmas, sde="_sde" in sampler, order=order)
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
            rows = _lms_rows(schedule, timesteps, sigmas, begin=start_step)[0]
        elif plan.sampler == "pndm":
            steps = len(timesteps) - (len(timesteps) > 1)  # one repeated call
            rows = _pndm_rows(schedule, timesteps, steps, begin=start_step)
        elif plan.sampler.startswith("unipc"):
            rows = _unipc_rows(schedule, timesteps, sigmas, begin=start_step)
        else:
            sde = "_sde" in plan.sampler
            rows = _dpmpp_rows(schedule, timesteps, sigmas, sde, order=3, begin=start_step)
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
