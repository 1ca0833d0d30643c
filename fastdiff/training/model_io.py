"""Build the trainable VAE and U-Net from the training config (as diffusers ``config.json`` dicts)
and write the trained ones out in diffusers format."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from fastdiff.models import AutoencoderKL, UNet2DConditionModel, save_pretrained
from fastdiff.training.config import UNetConfig, VAEConfig
from fastdiff.training.shapes import IMAGE_SIZE, NUM_CLASSES


def vae_config_dict(section: VAEConfig, scaling_factor: float = 1.0) -> dict[str, Any]:
    """``AutoencoderKL`` config for a small VAE: one 2× downsample per block after the first."""
    blocks = len(section.block_out_channels)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * blocks,
        "up_block_types": ["UpDecoderBlock2D"] * blocks,
        "block_out_channels": list(section.block_out_channels),
        "layers_per_block": section.layers_per_block,
        "act_fn": "silu",
        "latent_channels": section.latent_channels,
        "norm_num_groups": section.norm_num_groups,
        "sample_size": IMAGE_SIZE,
        "scaling_factor": scaling_factor,
    }


def latent_size(section: VAEConfig) -> int:
    return IMAGE_SIZE // 2 ** (len(section.block_out_channels) - 1)


def unet_config_dict(section: UNetConfig, latent_channels: int, latent_size: int) -> dict[str, Any]:
    """Class-conditional ``UNet2DConditionModel`` config: ResNet down/up blocks, a self-attention
    mid block, no cross-attention. ``num_class_embeds`` is K + 1: index K is the null class that
    condition dropout trains for classifier-free guidance."""
    blocks = len(section.block_out_channels)
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": latent_size,
        "in_channels": latent_channels,
        "out_channels": latent_channels,
        "down_block_types": ["DownBlock2D"] * blocks,
        "up_block_types": ["UpBlock2D"] * blocks,
        "mid_block_type": "UNetMidBlock2D",
        "block_out_channels": list(section.block_out_channels),
        "layers_per_block": section.layers_per_block,
        "norm_num_groups": section.norm_num_groups,
        "attention_head_dim": section.attention_head_dim,
        "num_class_embeds": NUM_CLASSES + 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }


def build_vae(section: VAEConfig) -> nn.Module:
    return AutoencoderKL(vae_config_dict(section))


def build_unet(section: UNetConfig, latent_channels: int, latent_size: int) -> nn.Module:
    return UNet2DConditionModel(unet_config_dict(section, latent_channels, latent_size))


def export_dtype(name: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"export_dtype: unknown value {name!r}; allowed values: {sorted(dtypes)}")
    return dtypes[name]


def save_vae(vae: AutoencoderKL, folder: str | os.PathLike, scaling_factor: float, dtype: str):
    """Write the trained VAE with the latent ``scaling_factor`` measured on the training set."""
    vae.config.scaling_factor = float(scaling_factor)
    save_pretrained(vae, folder, dtype=export_dtype(dtype))


def save_unet(unet: UNet2DConditionModel, folder: str | os.PathLike, dtype: str) -> None:
    save_pretrained(unet, folder, dtype=export_dtype(dtype))
