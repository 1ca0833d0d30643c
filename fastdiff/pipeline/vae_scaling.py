"""Between the VAE's latent space and the unit-variance latents the U-Net was trained on.

Stable Diffusion scales latents by one number (``scaling_factor``, Rombach et al. 2022, sec. 4.3.2
and appendix G); SD3/Flux-style VAEs also shift them (``shift_factor``); some SDXL derivatives
normalise per channel (``latents_mean`` / ``latents_std``). All three are read from the VAE config,
but each diffusers pipeline applies only some of them (``LATENT_KEYS``): a folder is decoded as the
pipeline it names would decode it.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

ALL_LATENT_KEYS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std")
# The keys the diffusers pipeline classes read: StableDiffusionPipeline (and its img2img and
# inpainting siblings) and LatentConsistencyModelPipeline (and its img2img) divide by
# scaling_factor only; the StableDiffusionXL* pipelines also normalise per channel when both
# latents_mean and latents_std are given; none reads shift_factor. Any other folder
# (fastdiff's own) uses every key its VAE config gives.
LATENT_KEYS = {
    "StableDiffusionXL": ("scaling_factor", "latents_mean", "latents_std"),
    "StableDiffusion": ("scaling_factor",),
    "LatentConsistencyModel": ("scaling_factor",),
}


def latent_keys_for(pipeline_class: str | None) -> tuple[str, ...]:
    """The VAE config keys that map latents for a folder whose model_index.json names
    ``pipeline_class`` (longest matching prefix of ``LATENT_KEYS``, else all of them)."""
    name = str(pipeline_class or "")
    for prefix in sorted(LATENT_KEYS, key=len, reverse=True):
        if name.startswith(prefix):
            return LATENT_KEYS[prefix]
    return ALL_LATENT_KEYS


def latent_scaling(config, keys: tuple[str, ...] = ALL_LATENT_KEYS) -> dict[str, Any]:
    """The VAE config's latent-scaling values, those not in ``keys`` read as absent."""
    return {key: config.get(key) if key in keys else None for key in ALL_LATENT_KEYS}


def vae_run_dtype(unet_config, vae_config, dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype the VAE runs in when the models are cast to ``dtype``: float32 instead of
    float16 for SDXL, whose VAE overflows in fp16 (its config says ``force_upcast``), as diffusers'
    StableDiffusionXLPipeline upcasts it."""
    if (
        dtype == torch.float16
        and unet_config.get("addition_embed_type") == "text_time"
        and vae_config.get("force_upcast", False)
    ):
        return torch.float32
    return dtype


@functools.cache
def _device_stats(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Built once per (values, dtype, device) and never freed: the decoder runs inside a captured
    # CUDA graph, where building it from host data is an illegal H2D copy, and the graph keeps
    # reading this tensor's address on every replay. Not an inference tensor, so training's
    # from_vae_latents can use it after an inference-mode generation.
    with torch.inference_mode(False):
        return torch.tensor(values, dtype=dtype, device=device)


def _per_channel(values: Any, like: torch.Tensor) -> torch.Tensor:
    try:  # host values only: nothing here may touch the device (see _device_stats)
        flat = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        flat = None
    if flat is None or len(flat) != like.shape[1]:
        raise ValueError(
            f"latents_mean/latents_std must list one value per latent channel ({like.shape[1]}), "
            f"got {values!r}"
        )
    return _device_stats(flat, like.dtype, like.device).view(1, -1, 1, 1)


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
