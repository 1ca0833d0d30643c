"""Plan rows of the samplers that step in the noise level sigma (Karras et al.'s form of the
probability-flow ODE): Euler, Euler ancestral, Heun, LMS and KDPM2, and the noise levels they
read (the schedule's at the visited timesteps, or Karras'). Rows are lists of coefficients in
the column order of ``fastdiff.sampling.plan``; ``make_plan`` turns them into a plan."""

from __future__ import annotations

import math

import numpy as np
import torch

from fastdiff.sampling.schedule import NoiseSchedule
from fastdiff.sampling.spacing import euler_spacing_ends, karras_sigmas, timesteps_of_sigmas
from fastdiff.sampling.vp_rows import x0_coefficients


def clamped_alphas_cumprod(schedule: NoiseSchedule) -> torch.Tensor:
    """alphā with, under zero terminal SNR, the last value clamped to 2**-24 (sigma ~ 4096), as
    diffusers' Euler and DPM-Solver schedulers do, so the first state and step stay finite."""
    alphas_cumprod = schedule.alphas_cumprod.clone()
    if schedule.rescale_betas_zero_snr:
        alphas_cumprod[-1] = 2.0**-24
    return alphas_cumprod


def sigmas_at(schedule: NoiseSchedule, timesteps: list[float]) -> list[float]:
    """sigma_t = sqrt((1 - alphā_t) / alphā_t) at the visited timesteps (alphā clamped, see
    ``clamped_alphas_cumprod``), then 0. A fractional timestep (Euler's ``linspace`` points)
    takes sigma interpolated linearly between its two neighbours, as diffusers'
    EulerDiscreteScheduler does (``interpolation_type`` "linear"); an integer one the table's."""
    values = clamped_alphas_cumprod(schedule)
    table = ((1 - values) / values).sqrt()
    points = torch.tensor(timesteps, dtype=torch.float64)
    low = points.floor().long().clamp(max=table.shape[0] - 1)
    high = (low + 1).clamp(max=table.shape[0] - 1)
    weight = points - low.double()
    sigmas = table[low] + weight * (table[high] - table[low])
    return sigmas.tolist() + [0.0]


def float32_sigmas_at(schedule: NoiseSchedule, timesteps: list[float]) -> list[float]:
    """``sigmas_at`` as KDPM2's schedulers compute it: the table in float32 arithmetic,
    interpolated, and the levels rounded to float32 (KDPM2AncestralDiscreteScheduler's
    sigma_down cancels near-equal squares, so its value depends on those last bits)."""
    table32 = schedule.alphas_cumprod.to(torch.float32)
    table = (((1 - table32) / table32) ** 0.5).numpy()
    levels = np.interp(np.array(timesteps, dtype=np.float64), np.arange(table.shape[0]), table)
    return levels.astype(np.float32).astype(np.float64).tolist() + [0.0]


def karras_plan_inputs(
    schedule: NoiseSchedule, steps: int, sampler: str = "dpmpp_2m_karras", keep_fraction=False
) -> tuple[torch.Tensor, list[float]]:
    """(timesteps, sigmas) of a ``*_karras`` sampler (``karras_sigmas``). DPM-Solver's levels span
    the whole table and its timesteps are rounded (truncated for cosine), as diffusers does.
    Euler's span the sigmas of its spaced timesteps, and diffusers calls the model at the
    fractional timesteps of those levels. ``keep_fraction``: Euler's fractional timesteps
    themselves (float64; what ``make_plan`` uses), else rounded to the nearest integers."""
    alphas_cumprod = clamped_alphas_cumprod(schedule)
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


def euler_rows(
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
        c1, c2 = x0_coefficients(1.0 / (sigma**2 + 1.0), schedule.prediction_type, t)
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


def lms_weights(sigmas: list[float], index: int, order: int) -> list[float]:
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


def lms_rows(
    schedule: NoiseSchedule, timesteps: list[float], sigmas: list[float], begin: int = 0
) -> tuple[list[list[float]], float]:
    """Linear multistep in sigma on the probability-flow ODE (k-diffusion's LMS; diffusers'
    LMSDiscreteScheduler, order 4): x_next = x + sum_k w_k d_(i-k), d = (x - x0) / sigma, with
    the Lagrange weights of ``lms_weights`` over min(i + 1, 4) levels. The rows write d, not x0,
    into the history (x0' = c1' x_in + c2' m with c1' = (1 - c1 c0) / (sigma c0), c2' = -c2 /
    sigma), which reaches three rows back. Started part-way (``begin``), diffusers keeps the
    order of the whole run's step index but has only the derivatives since the start: the
    weights of the missing ones are dropped, as its ``zip`` drops them."""
    euler, init_noise_scale = euler_rows(schedule, timesteps, sigmas)
    rows = []
    for index in range(begin, len(timesteps)):
        sigma = sigmas[index]
        c0, c1, c2 = euler[index][:3]
        order = min(index + 1, 4)
        weights = lms_weights(sigmas, index, order)[: index - begin + 1]
        weights += [0.0] * (4 - len(weights))
        derivative = [c0, (1.0 - c1 * c0) / (sigma * c0), -c2 / sigma]
        rows.append([*derivative, 1.0, weights[0], weights[1], 0.0, weights[2], weights[3], 0.0])
    return rows, init_noise_scale


def heun_rows(
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
    euler, init_noise_scale = euler_rows(schedule, timesteps, sigmas)
    rows, at_step = [], []
    for index, first in enumerate(euler):
        rows.append(first)
        at_step.append(index)
        sigma, sigma_next = sigmas[index], sigmas[index + 1]
        if sigma_next == 0.0:
            continue
        c1, c2 = x0_coefficients(
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


def kdpm2_rows(
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
    euler, init_noise_scale = euler_rows(schedule, timesteps, sigmas)
    targets = kdpm2_targets(sigmas, ancestral)
    rows = []
    for index, first in enumerate(euler):
        if index == len(targets):
            rows.append(first)  # the last step: Euler's, to the clean estimate
            continue
        sigma, (target, noise_std, mid) = sigmas[index], targets[index]
        ratio = mid / sigma
        rows.append([*first[:3], ratio, 1.0 - ratio, 0.0, 0.0])
        c1, c2 = x0_coefficients(1.0 / (mid**2 + 1.0), schedule.prediction_type, timesteps[index])
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
    table = clamped_alphas_cumprod(schedule)
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
