"""Stable-Diffusion-compatible models and diffusers checkpoint loading.

Public API:
  UNet2DConditionModel(config)   noise predictor; config = diffusers config dict or UNetConfig
  AutoencoderKL(config)          VAE; ``encode(x) -> DiagonalGaussian``, ``decode(z) -> image``
  AutoencoderTiny(config)        TAESD; ``encode(x) -> latents`` (deterministic), ``decode(z)``
  DiagonalGaussian               the encoder's posterior (mean, std, sample, mode, kl)
  load_unet(path, dtype=None, device=None, variant=None)
  load_vae(path, dtype=None, device=None, variant=None)
  save_pretrained(model, folder, dtype=None, variant=None)
  UNetConfig, VAEConfig, CheckpointError
"""

from fastdiff.models.checkpoint import CheckpointError
from fastdiff.models.config import UNetConfig, VAEConfig
from fastdiff.models.loading import load_unet, load_vae, save_pretrained
from fastdiff.models.tiny_vae import AutoencoderTiny
from fastdiff.models.unet import UNet2DConditionModel
from fastdiff.models.vae import AutoencoderKL, DiagonalGaussian

__all__ = [
    "AutoencoderKL",
    "AutoencoderTiny",
    "CheckpointError",
    "DiagonalGaussian",
    "UNet2DConditionModel",
    "UNetConfig",
    "VAEConfig",
    "load_unet",
    "load_vae",
    "save_pretrained",
]
