"""Plan rows of the samplers that step in alphā (the VP form): DDIM, DDPM, LCM, TCD and PNDM,
and the x0 estimate every sampler's row starts from. Each function returns one list of
coefficients per model call, in the column order of ``fastdiff.sampling.plan`` (c0..c6, or
c0..c9 for the samplers that read older estimates); ``make_plan`` turns them into a plan."""

from __future__ import annotations

import math

import torch

from fastdiff.sampling.schedule import NoiseSchedule


def x0_coefficients(alpha_bar: float, prediction_type: str, timestep: int) -> tuple[float, float]:
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


def vp_row(
    alpha_bar: float, alpha_bar_next: float, noise_std: float, prediction_type: str, t: int
) -> list[float]:
    """DDIM-form update (Song et al. 2021, Eq. 12):
    x_next = sqrt(ā') x0 + sqrt(1 - ā' - s^2) eps + s z with eps = (x - sqrt(ā) x0)/sqrt(1 - ā)."""
    c1, c2 = x0_coefficients(alpha_bar, prediction_type, t)
    direction = math.sqrt(max(1.0 - alpha_bar_next - noise_std**2, 0.0)) / math.sqrt(
        1.0 - alpha_bar
    )
    c4 = math.sqrt(alpha_bar_next) - direction * math.sqrt(alpha_bar)
    return [1.0, c1, c2, direction, c4, 0.0, noise_std]


def ddim_rows(schedule: NoiseSchedule, timesteps: list[int], eta: float) -> list[list[float]]:
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
            vp_row(
                alpha_bar, alpha_bar_next, eta * math.sqrt(variance), schedule.prediction_type, t
            )
        )
    return rows


def ddpm_rows(schedule: NoiseSchedule, timesteps: list[int]) -> list[list[float]]:
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
        c1, c2 = x0_coefficients(alpha_bar, schedule.prediction_type, t)
        from_x0 = math.sqrt(alpha_bar_next) * beta / (1.0 - alpha_bar)
        from_x = math.sqrt(1.0 - beta) * (1.0 - alpha_bar_next) / (1.0 - alpha_bar)
        variance = (1.0 - alpha_bar_next) / (1.0 - alpha_bar) * beta
        rows.append([1.0, c1, c2, from_x, from_x0, 0.0, math.sqrt(max(variance, 0.0))])
    return rows


def lcm_rows(schedule: NoiseSchedule, timesteps: list[int]) -> list[list[float]]:
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
        c1, c2 = x0_coefficients(alphas_cumprod[t], schedule.prediction_type, t)
        if index + 1 == len(timesteps):
            signal, noise_std = 1.0, 0.0
        else:
            alpha_bar_next = alphas_cumprod[timesteps[index + 1]]
            signal, noise_std = math.sqrt(alpha_bar_next), math.sqrt(1.0 - alpha_bar_next)
        rows.append([1.0, c_out * c1 + c_skip, c_out * c2, 0.0, signal, 0.0, noise_std])
    return rows


def tcd_rows(schedule: NoiseSchedule, timesteps: list[int], gamma: float) -> list[list[float]]:
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
        c1, c2 = x0_coefficients(alpha_t, schedule.prediction_type, t)
        from_x = math.sqrt(1.0 - alpha_s) / math.sqrt(1.0 - alpha_t)
        from_x0 = math.sqrt(alpha_s) - from_x * math.sqrt(alpha_t)
        scale, noise_std = 1.0, 0.0
        if gamma > 0 and not last:
            scale = math.sqrt(alpha_next / alpha_s)
            noise_std = math.sqrt(max(1.0 - alpha_next / alpha_s, 0.0))
        rows.append([1.0, c1, c2, scale * from_x, scale * from_x0, 0.0, noise_std])
    return rows


def pndm_calls(timesteps: torch.Tensor) -> torch.Tensor:
    """PNDMScheduler's model calls (``skip_prk_steps``) for its descending spaced ``timesteps``:
    each once, the second twice (the repeated call that gives its first step second order)."""
    if timesteps.shape[0] < 2:
        return timesteps.clone()
    return torch.cat([timesteps[:2], timesteps[1:]])


def pndm_rows(
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


def check_pndm(schedule: NoiseSchedule) -> None:
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
