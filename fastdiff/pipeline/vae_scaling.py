"""Between the VAE's latent space and the unit-variance latents the U-Net was trained on.

Stable Diffusion scales latents by one number (``scaling_factor``, Rombach et al. 2022, sec. 4.3.2
and appendix G); SD3/Flux-style VAEs also shift them (``shift_factor``); some SDXL derivatives
normalise per channel (``latents_mean`` / ``latents_std``). All three are read from the VAE config.
"""

from __future__ import annotations

from typing import Any

import torch


def _per_channel(values: Any, like: torch.Tensor) -> torch.Tensor:
    tensor = torch.as_tensor(values, dtype=like.dtype, device=like.device)
    if tensor.ndim != 1 or tensor.shape[0] != like.shape[1]:
        raise ValueError(
            f"latents_mean/latents_std must list one value per latent channel ({like.shape[1]}), "
            f"got shape {tuple(tensor.shape)}"
        )
    return tensor.view(1, -1, 1, 1)


def _per_channel_stats(config) -> tuple[Any, Any] | None:
    mean, std = config.get("latents_mean"), config.get("latents_std")
    return (mean, std) if mean is not None and std is not None else None


def to_vae_latents(latents: torch.Tensor, config) -> torch.Tensor:
    """Diffusion-model latents -> VAE decoder input."""
    scale = config["scaling_factor"]
    stats = _per_channel_stats(config)
    if stats is not None:
        return latents * _per_channel(stats[1], latents) / scale + _per_channel(stats[0], latents)
    latents = latents / scale
    shift = config.get("shift_factor")
    return latents + shift if shift is not None else latents


def from_vae_latents(latents: torch.Tensor, config) -> torch.Tensor:
    """VAE encoder sample -> diffusion-model latents (the inverse of ``to_vae_latents``)."""
    scale = config["scaling_factor"]
    stats = _per_channel_stats(config)
    if stats is not None:
        mean, std = _per_channel(stats[0], latents), _per_channel(stats[1], latents)
        return (latents - mean) * scale / std
    shift = config.get("shift_factor")
    if shift is not None:
        latents = latents - shift
    return latents * scale
