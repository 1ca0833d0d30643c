"""Shared pieces of the sampling tests: a deterministic stand-in model and a diffusers loop."""

from __future__ import annotations

import torch

SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012}


def scheduler_config(
    spacing: str,
    prediction_type: str = "epsilon",
    zero_snr: bool = False,
    beta_schedule: str = "scaled_linear",
) -> dict:
    """A Stable Diffusion scheduler config (diffusers' keys) for one spacing and target; leading
    spacing takes SD's steps_offset of 1."""
    return dict(
        SD_BETAS,
        beta_schedule=beta_schedule,
        timestep_spacing=spacing,
        steps_offset=1 if spacing == "leading" else 0,
        prediction_type=prediction_type,
        rescale_betas_zero_snr=zero_snr,
    )


def our_trajectory(x_T, schedule, sampler: str, steps: int, seed: int, **kwargs) -> list:
    """The states fastdiff's ``sample`` visits (``toy_model``, a generator seeded with ``seed``)."""
    from fastdiff.sampling import sample

    states: list[torch.Tensor] = []
    sample(
        toy_model,
        x_T,
        schedule,
        sampler,
        steps,
        generator=torch.Generator().manual_seed(seed),
        callback=lambda i, t, x: states.append(x),
        **kwargs,
    )
    return states


def toy_model(x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """A fixed nonlinear function of x and t (any t dtype), standing in for a denoiser."""
    t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
    if t.dim() == 1:
        t = t.reshape(-1, *([1] * (x.dim() - 1)))
    t = t.to(x.dtype)
    return torch.tanh(x * (0.5 + t / 1000.0) + 0.3 * torch.sin(t / 97.0)) * 0.9 + 0.1 * torch.cos(x)


def run_diffusers(scheduler, x_start: torch.Tensor, generator=None, model=None, **step_kwargs):
    """Run a configured diffusers scheduler with ``model`` (default ``toy_model``); return
    per-step states, per-step x0 estimates and the largest magnitude seen so far at each step
    (initial state included)."""
    model = toy_model if model is None else model
    states, estimates, peaks = [], [], []
    x = x_start
    peak = float(x_start.abs().max())
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(x, t)
        output = model(model_in, t)
        if generator is not None:
            step_kwargs["generator"] = generator
        result = scheduler.step(output, t, x, **step_kwargs)
        x = result.prev_sample
        x0 = getattr(result, "pred_original_sample", None)
        if x0 is None:  # LCM returns its consistency estimate (the plan row's x0)
            x0 = getattr(result, "denoised", None)
        if x0 is None:  # TCD its estimate noised to the intermediate timestep
            x0 = getattr(result, "pred_noised_sample", None)
        if x0 is None:  # DPM-Solver keeps its converted (x0) outputs instead
            outputs = getattr(scheduler, "model_outputs", None)
            x0 = outputs[-1] if outputs else x  # (PNDM keeps none: the state's magnitude)
        peak = max(peak, float(x.abs().max()), float(x0.abs().max()))
        states.append(x.clone())
        estimates.append(x0.clone())
        peaks.append(peak)
    return states, estimates, peaks


def assert_trajectories_match(ours, theirs, peaks, label: str = "") -> None:
    """Per step, max|ours - diffusers| <= 1e-5 * max(1, the largest magnitude so far)."""
    assert len(ours) == len(theirs)
    for index, (mine, reference, peak) in enumerate(zip(ours, theirs, peaks, strict=True)):
        error = float((mine - reference).abs().max())
        assert error <= 1e-5 * max(1.0, peak), f"{label}: step {index} error {error:.3g}"
