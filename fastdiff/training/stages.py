"""The classifier and VAE stages: each builds its model, defines its loss over the shared data,
runs the common loop, and reports a held-out metric."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.training.classifier import ShapeClassifier, accuracy, classifier_loss
from fastdiff.training.config import TrainConfig
from fastdiff.training.data import ShapesData
from fastdiff.training.distributed import DistContext
from fastdiff.training.loop import StageResult, train_stage
from fastdiff.training.model_io import build_vae


@dataclass
class ClassifierOutcome:
    model: ShapeClassifier
    held_out_accuracy: float
    result: StageResult


def train_classifier(
    config: TrainConfig, data: ShapesData, context: DistContext, stop_after_step: int | None = None
) -> ClassifierOutcome:
    section = config.classifier
    # Each stage seeds its own initialisation, so the weights do not depend on which other
    # stages ran earlier in the same process (a resumed run may start at any stage).
    torch.manual_seed(config.seed)
    model = ShapeClassifier(width=section.width)

    def loss_fn(module: nn.Module, indices: torch.Tensor, generator: torch.Generator):
        return classifier_loss(
            module, data.images[indices], data.labels[indices], generator, section.noise_std
        )

    result = train_stage(
        "classifier",
        model,
        loss_fn,
        data.images.shape[0],
        section,
        config.output_dir,
        context,
        seed=config.seed,
        progress=config.progress,
        stop_after_step=stop_after_step,
        inputs={"data": dataclasses.asdict(config.data)},
    )
    score = accuracy(result.model, data.held_out_images, data.held_out_labels)
    return ClassifierOutcome(result.model, score, result)


@dataclass
class VAEOutcome:
    model: nn.Module
    held_out_psnr: float  # dB, images mapped to [0, 1], decoding the posterior mean
    scaling_factor: float
    result: StageResult


def vae_loss(vae: nn.Module, images: torch.Tensor, generator: torch.Generator, kl_weight: float):
    """L1 + MSE reconstruction of a posterior sample plus a small KL to N(0, I) (Kingma & Welling
    2014, eq. 10; the KL weight is tiny, as in latent diffusion, so the latent keeps detail)."""
    posterior = vae.encode(images)
    reconstruction = vae.decode(posterior.sample(generator))
    return (
        F.l1_loss(reconstruction, images)
        + F.mse_loss(reconstruction, images)
        + kl_weight * posterior.kl().mean()
    )


@torch.no_grad()
def encode_means(vae: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Posterior means (unscaled latents) of ``images``."""
    vae.eval()
    return torch.cat(
        [
            vae.encode(images[start : start + batch_size]).mean
            for start in range(0, images.shape[0], batch_size)
        ]
    )


@torch.no_grad()
def reconstruction_psnr(vae: nn.Module, images: torch.Tensor, batch_size: int = 256) -> float:
    """Mean PSNR (dB) over images, pixel range [0, 1], decoding the posterior mean."""
    vae.eval()
    values = []
    for start in range(0, images.shape[0], batch_size):
        batch = images[start : start + batch_size]
        reconstruction = vae.decode(vae.encode(batch).mean).clamp(-1, 1)
        mse = ((reconstruction - batch) / 2).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
        values.append(-10.0 * torch.log10(mse))
    return torch.cat(values).mean().item()


def train_vae(
    config: TrainConfig, data: ShapesData, context: DistContext, stop_after_step: int | None = None
) -> VAEOutcome:
    section = config.vae
    torch.manual_seed(config.seed + 1)
    vae = build_vae(section)

    def loss_fn(module: nn.Module, indices: torch.Tensor, generator: torch.Generator):
        return vae_loss(module, data.images[indices], generator, section.kl_weight)

    result = train_stage(
        "vae",
        vae,
        loss_fn,
        data.images.shape[0],
        section,
        Path(config.output_dir),
        context,
        seed=config.seed + 1,
        progress=config.progress,
        stop_after_step=stop_after_step,
        inputs={"data": dataclasses.asdict(config.data)},
    )
    vae = result.model
    psnr = reconstruction_psnr(vae, data.held_out_images)
    # Unit-variance latents keep the diffusion schedule's signal-to-noise ratios as designed
    # (Rombach et al. 2022, sec. 4.3.2 / appendix G: scale by 1 / std of the latents).
    latents = encode_means(vae, data.images[: min(4096, data.images.shape[0])])
    scaling_factor = float(1.0 / latents.float().std().item())
    return VAEOutcome(vae, psnr, scaling_factor, result)
