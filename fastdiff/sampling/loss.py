"""The denoising training objective (Ho et al. 2020, Eq. 14, "L_simple") for any prediction type,
with condition dropout for classifier-free guidance (Ho & Salimans 2022, Algorithm 1) and optional
Min-SNR-gamma loss weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
Weighting Strategy", Sec. 3.4)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fastdiff.sampling.schedule import PREDICTION_TYPES, NoiseSchedule

Condition = torch.Tensor | dict[str, Any] | None


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights min(SNR, gamma) expressed for the model's target: the x0-space
    weight min(SNR, gamma) becomes min(SNR, gamma) / SNR for an epsilon target and
    min(SNR, gamma) / (SNR + 1) for a velocity target (Hang et al. 2023, Eq. 9 and App. B).
    The epsilon form is written min(1, gamma / SNR) so a zero-SNR step gets weight 1 (its limit)."""
    if not gamma > 0:
        raise ValueError(f"min_snr_gamma must be > 0, got {gamma}")
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return torch.clamp(gamma / snr, max=1.0)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    if prediction_type == "sample":
        return clipped
    raise ValueError(
        f"unknown prediction_type {prediction_type!r}; allowed: {list(PREDICTION_TYPES)}"
    )


def _drop_condition(cond: Condition, null_cond: Any, drop: torch.Tensor) -> Condition:
    """Replace the rows of ``cond`` where ``drop`` is True by ``null_cond``: an index for integer
    class labels, a (broadcastable) embedding for float tensors, per key for dicts."""
    if isinstance(cond, dict):
        if not isinstance(null_cond, dict) or set(null_cond) != set(cond):
            got = sorted(null_cond) if isinstance(null_cond, dict) else type(null_cond).__name__
            raise ValueError(
                f"a dict condition needs a null_cond dict with the same keys {sorted(cond)}, "
                f"got {got}"
            )
        return {key: _drop_condition(cond[key], null_cond[key], drop) for key in cond}
    if not isinstance(cond, torch.Tensor):
        raise ValueError(f"cond must be a tensor, a dict of tensors or None, got {type(cond)}")
    if cond.dim() == 0 or cond.shape[0] != drop.shape[0]:
        raise ValueError(
            f"condition shape {tuple(cond.shape)} must have the batch size {drop.shape[0]} first"
        )
    null = torch.as_tensor(null_cond, device=cond.device)
    if cond.is_floating_point():
        null = null.to(cond.dtype)
    elif null.is_floating_point():
        raise ValueError(
            f"integer class-label conditions need an integer null_cond label, got {null_cond!r}"
        )
    mask = drop.to(cond.device).reshape(-1, *([1] * (cond.dim() - 1)))
    message = (
        f"null_cond shape {tuple(null.shape)} does not broadcast to condition rows "
        f"{tuple(cond.shape[1:])}"
    )
    try:
        dropped = torch.where(mask, null.to(cond.dtype), cond)
    except RuntimeError as error:
        raise ValueError(message) from error
    if dropped.shape != cond.shape:  # a null_cond with extra dims would reshape the condition
        raise ValueError(message)
    return dropped


def diffusion_loss(
    model_fn: Callable[[torch.Tensor, torch.Tensor, Condition], torch.Tensor],
    x0: torch.Tensor,
    cond: Condition,
    schedule: NoiseSchedule,
    cond_drop_prob: float = 0.1,
    null_cond: Any = None,
    min_snr_gamma: float | None = None,
    generator: torch.Generator | None = None,
    timesteps: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scalar training loss for ``model_fn(x_t, t, cond)``.

    Draws t ~ U{0, ..., T-1} per sample (or uses ``timesteps``) and noise ~ N(0, I), forms x_t in
    closed form, and returns the mean over the batch of the per-sample MSE between the model output
    and ``schedule.training_target`` (epsilon, velocity or x0), optionally weighted by
    :func:`min_snr_weights`. With probability ``cond_drop_prob`` a sample's condition is replaced
    by ``null_cond`` (the unconditional label/embedding the model learns for guidance); ``cond``
    None means an unconditional model and no dropout.
    """
    if not 0.0 <= cond_drop_prob <= 1.0:
        raise ValueError(f"cond_drop_prob must lie in [0, 1], got {cond_drop_prob}")
    if not isinstance(x0, torch.Tensor):
        raise ValueError(f"x0 must be a floating-point tensor, got {type(x0).__name__}")
    if x0.dim() < 1 or x0.shape[0] < 1 or not x0.is_floating_point():
        raise ValueError(
            "x0 must be a floating-point tensor with a non-empty batch dim, got shape "
            f"{tuple(x0.shape)} dtype {x0.dtype}"
        )
    batch = x0.shape[0]
    draw_device = generator.device if generator is not None else x0.device
    if timesteps is None:
        timesteps = torch.randint(
            0, schedule.num_train_timesteps, (batch,), generator=generator, device=draw_device
        )
    timesteps = torch.as_tensor(timesteps).to(x0.device)
    if timesteps.shape != (batch,) or timesteps.is_floating_point():
        raise ValueError(
            f"timesteps must be an integer tensor of shape ({batch},), got shape "
            f"{tuple(timesteps.shape)} dtype {timesteps.dtype}"
        )
    noise = torch.randn(x0.shape, generator=generator, device=draw_device, dtype=x0.dtype)
    noise = noise.to(x0.device)
    x_t = schedule.add_noise(x0, noise, timesteps)
    target = schedule.training_target(x0, noise, timesteps)

    if cond is not None and cond_drop_prob > 0:
        if null_cond is None:
            raise ValueError("cond_drop_prob > 0 needs null_cond (the unconditional condition)")
        drop = torch.rand((batch,), generator=generator, device=draw_device) < cond_drop_prob
        cond = _drop_condition(cond, null_cond, drop.to(x0.device))

    prediction = model_fn(x_t, timesteps, cond)
    if prediction.shape != target.shape:
        raise ValueError(
            f"model output shape {tuple(prediction.shape)} != x0 shape {tuple(target.shape)}"
        )
    loss_dtype = torch.promote_types(prediction.dtype, torch.float32)
    error = (prediction.to(loss_dtype) - target.to(loss_dtype)) ** 2
    per_sample = error.reshape(batch, -1).mean(dim=1)
    if min_snr_gamma is not None:
        snr = schedule.snr(timesteps.cpu())
        weights = min_snr_weights(snr, float(min_snr_gamma), schedule.prediction_type)
        per_sample = per_sample * weights.to(per_sample.device, loss_dtype)
    return per_sample.mean()
