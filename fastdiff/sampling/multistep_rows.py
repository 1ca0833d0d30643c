"""Plan rows of the multistep solvers in lambda = log(alpha / sigma): DPM-Solver++ (2M, 3M and
their SDE variants) and UniPC. Their rows read the x0 estimates of earlier rows (columns c5 and
c7..c9 of ``fastdiff.sampling.plan``); ``make_plan`` turns them into a plan, and
``restarted_coefficients`` builds them again for a run that starts part-way."""

from __future__ import annotations

import math

from fastdiff.sampling.schedule import NoiseSchedule
from fastdiff.sampling.sigma_rows import require_falling_noise
from fastdiff.sampling.vp_rows import x0_coefficients


def dpmpp_rows(
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
        c1, c2 = x0_coefficients(1.0 / (sigma**2 + 1.0), schedule.prediction_type, t)
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


def unipc_rows(
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
        c1, c2 = x0_coefficients(1.0 / (sigma**2 + 1.0), schedule.prediction_type, t)
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
