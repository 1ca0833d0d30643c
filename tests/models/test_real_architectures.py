"""The real SD 1.5 / SD 2.1 / SDXL U-Nets and the SD VAE, built on the meta device (no memory,
no weights): same state-dict keys and shapes as diffusers, and the published parameter counts."""

from __future__ import annotations

import pytest
import torch

from fastdiff.models import AutoencoderKL, UNet2DConditionModel

SD15 = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
SD21 = dict(
    sample_size=96,
    cross_attention_dim=1024,
    attention_head_dim=[5, 10, 20, 20],
    use_linear_projection=True,
    upcast_attention=True,
)
SDXL = dict(
    sample_size=128,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[320, 640, 1280],
    attention_head_dim=[5, 10, 20],
    cross_attention_dim=2048,
    transformer_layers_per_block=[1, 2, 10],
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SD_VAE = dict(
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    latent_channels=4,
    sample_size=512,
)


def shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


@pytest.mark.parametrize(
    "config, parameters",
    [(SD15, 859_520_964), (SD21, 865_910_724), (SDXL, 2_567_463_684)],
    ids=["sd15", "sd21", "sdxl"],
)
def test_unet_architecture_matches_diffusers(config, parameters):
    from diffusers import UNet2DConditionModel as DiffusersUNet

    with torch.device("meta"):
        ours = UNet2DConditionModel(config)
        reference = DiffusersUNet(**config)
    assert shapes(ours) == shapes(reference)
    assert sum(param.numel() for param in ours.parameters()) == parameters


def test_sd_vae_architecture_matches_diffusers():
    from diffusers import AutoencoderKL as DiffusersVAE

    with torch.device("meta"):
        ours = AutoencoderKL(SD_VAE)
        reference = DiffusersVAE(**SD_VAE)
    assert shapes(ours) == shapes(reference)
    assert sum(param.numel() for param in ours.parameters()) == 83_653_863
