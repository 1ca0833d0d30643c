"""The U-Net stage: the DDPM objective on the frozen VAE's scaled latents, class-conditional with
condition dropout to the null class (classifier-free guidance, Ho & Salimans 2022)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fastdiff.training.config import TrainConfig, UNetConfig
from fastdiff.training.distributed import DistContext
from fastdiff.training.loop import StageResult, train_stage
from fastdiff.training.model_io import build_unet
from fastdiff.training.shapes import NUM_CLASSES


def scheduler_config_dict(section: UNetConfig) -> dict[str, Any]:
    """The diffusers ``scheduler_config.json`` of the training schedule (DDIM for sampling)."""
    return {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": section.num_train_timesteps,
        "beta_schedule": section.beta_schedule,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "prediction_type": section.prediction_type,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "timestep_spacing": "trailing",
        "rescale_betas_zero_snr": False,
    }


def noise_schedule(section: UNetConfig):
    from fastdiff.sampling import NoiseSchedule

    return NoiseSchedule.from_config(scheduler_config_dict(section))


def class_conditional(unet: nn.Module):
    """``model_fn(x_t, t, class_labels)`` for the sampling/objective helpers: no text context."""

    def model_fn(x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        return unet(x_t, t, None, class_labels=class_labels)

    return model_fn


@dataclass
class UNetOutcome:
    model: nn.Module  # the raw weights
    ema_model: nn.Module  # the weights that ship
    result: StageResult


def train_unet(
    config: TrainConfig,
    latents: torch.Tensor,
    labels: torch.Tensor,
    context: DistContext,
    stop_after_step: int | None = None,
    vae_config: dict | None = None,
) -> UNetOutcome:
    """Train on ``latents`` (already multiplied by the VAE's scaling factor) and ``labels``. The
    U-Net's latent channels and sample size are the latents' (those of the VAE on disk, whatever
    the config's vae section says now); ``vae_config`` (that VAE's config.json) is part of the
    settings a resumed run must share."""
    from fastdiff.sampling import diffusion_loss

    section = config.unet
    if latents.shape[0] != labels.shape[0]:
        raise ValueError(f"{latents.shape[0]} latents but {labels.shape[0]} labels")
    torch.manual_seed(config.seed + 2)  # initialisation independent of the stages run before
    unet = build_unet(section, latent_channels=latents.shape[1], latent_size=latents.shape[-1])
    schedule = noise_schedule(section)
    latents = latents.to(context.device)
    labels = labels.to(context.device)

    def loss_fn(module: nn.Module, indices: torch.Tensor, generator: torch.Generator):
        return diffusion_loss(
            class_conditional(module),
            latents[indices.to(latents.device)],
            labels[indices.to(labels.device)],
            schedule,
            cond_drop_prob=section.cond_drop_prob,
            # One null label per item of the batch (not a slice of the labels: a batch may be
            # larger than the data set when it spans several epochs).
            null_cond=torch.full(
                (indices.shape[0],), NUM_CLASSES, dtype=labels.dtype, device=labels.device
            ),
            min_snr_gamma=section.min_snr_gamma,
            generator=generator,
        )

    result = train_stage(
        "unet",
        unet,
        loss_fn,
        latents.shape[0],
        section,
        config.output_dir,
        context,
        seed=config.seed + 2,
        ema_decay=section.ema_decay,
        progress=config.progress,
        stop_after_step=stop_after_step,
        inputs={"data": dataclasses.asdict(config.data), "vae": vae_config},
    )
    return UNetOutcome(result.model, result.ema_model, result)
