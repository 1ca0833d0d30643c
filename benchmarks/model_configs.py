"""Real Stable Diffusion architectures as diffusers-style config dicts (no weights, no download).

Values are those of the published ``config.json`` files of the SD1.5 U-Net, the SDXL base U-Net and
the SD AutoencoderKL, restricted to the keys that change the architecture. Benchmarks build models
from them with random weights; ``tiny_*`` configs keep the same block structure at toy sizes so the
same benchmark code runs in seconds on a CPU.

Parameter counts (checked by ``count_parameters`` on the meta device, see tests/runtime):
SD1.5 U-Net 859.5 M, SDXL U-Net 2567.5 M, SD VAE 83.7 M.
"""

from __future__ import annotations

import copy

SD15_UNET: dict = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    # In SD1.x this key is (mis)named: it is the number of heads, giving head dims 40/80/160.
    "attention_head_dim": 8,
}

SDXL_UNET: dict = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 2048,
    "attention_head_dim": [5, 10, 20],
    "transformer_layers_per_block": [1, 2, 10],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}

SD_VAE: dict = {
    "sample_size": 512,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
}

# Toy versions with the same block types (cross-attention, text_time embedding, 4-level VAE), for
# CPU runs of the benchmarks and for tests.
TINY_SD15_UNET: dict = {
    **SD15_UNET,
    "sample_size": 8,
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 2,
}

# SD1.5's U-Net with every layer (16 transformer blocks, 22 ResNet blocks) at a tenth of its
# widths or less: the same op calls, in the same order, at a fraction of the arithmetic. For
# host-time measurements (benchmarks/host_overhead.py --unet), not speed.
NARROW_SD15_UNET: dict = {
    **SD15_UNET,
    "sample_size": 8,
    "block_out_channels": [32, 64, 128, 128],  # widths change where SD1.5's do
    "cross_attention_dim": 64,
}

TINY_SDXL_UNET: dict = {
    **SDXL_UNET,
    "sample_size": 8,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": [2, 4],
    "transformer_layers_per_block": [1, 2],
    "addition_time_embed_dim": 8,
    # text_embeds (32) + 6 time ids x addition_time_embed_dim (8)
    "projection_class_embeddings_input_dim": 32 + 6 * 8,
}

TINY_VAE: dict = {
    **SD_VAE,
    "sample_size": 32,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "block_out_channels": [32, 32],
    "layers_per_block": 1,
}

# TAESD (diffusers' AutoencoderTiny defaults: 64-wide, 1/3/3/3 encoder and 3/3/3/1 decoder
# blocks), and a small one for the CPU.
TAESD: dict = {}
TINY_TAESD: dict = {  # two stages: the toy VAE's downscale factor 2
    "encoder_block_out_channels": [16, 16],
    "decoder_block_out_channels": [16, 16],
    "num_encoder_blocks": [1, 1],
    "num_decoder_blocks": [1, 1],
}

MODELS: dict[str, dict] = {
    "taesd": TAESD,
    "tiny_taesd": TINY_TAESD,
    "sd15_unet": SD15_UNET,
    "sdxl_unet": SDXL_UNET,
    "sd_vae": SD_VAE,
    "tiny_sd15_unet": TINY_SD15_UNET,
    "narrow_sd15_unet": NARROW_SD15_UNET,
    "tiny_sdxl_unet": TINY_SDXL_UNET,
    "tiny_vae": TINY_VAE,
}

# Text-time conditioning widths (SDXL: pooled text embedding 1280, six size/crop ids).
TEXT_EMBED_DIM: dict[str, int] = {"sdxl_unet": 1280, "tiny_sdxl_unet": 32}


def model_config(name: str) -> dict:
    """A deep copy of the named config (so callers may edit it)."""
    if name not in MODELS:
        raise ValueError(f"unknown model config {name!r}; allowed values: {', '.join(MODELS)}")
    return copy.deepcopy(MODELS[name])


# The SD1.5 scheduler_config.json (DDIM-compatible; PNDM was the published default scheduler).
SD_SCHEDULER: dict = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
}
