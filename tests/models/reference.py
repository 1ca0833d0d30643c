"""Tiny random-weight diffusers checkpoints, written by diffusers' own ``save_pretrained``.

Built once per session (diffusers is a test-only reference). Every parameter gets a random
perturbation so layers diffusers initialises to zero or one cannot hide a wrong implementation.
"""

from __future__ import annotations

from pathlib import Path

import torch

BASE = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, norm_num_groups=8)

UNET_CONFIGS = {
    # SD 1.x: conv proj_in/out, attention_head_dim an int = number of heads.
    "sd1": dict(
        BASE,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
    ),
    # SD 2.x: linear projections, attention_head_dim a per-block list (heads of 16 features here).
    "sd2": dict(
        BASE,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=[2, 4],
        use_linear_projection=True,
        upcast_attention=True,
        flip_sin_to_cos=False,
        freq_shift=1,
    ),
    # SDXL: per-block transformer depth, text_time added conditioning.
    "sdxl": dict(
        BASE,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=[2, 4],
        use_linear_projection=True,
        transformer_layers_per_block=[1, 2],
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8,
    ),
    # A latent consistency model's U-Net: the guidance-scale embedding enters the time embedding.
    "lcm": dict(
        BASE,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        time_cond_proj_dim=12,
    ),
    # Small class-conditional model without any cross-attention.
    "class_conditional": dict(
        BASE,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2D",
        num_class_embeds=5,
    ),
    # Class-conditional with spatial self-attention blocks (attention_head_dim = head width here,
    # and diffusers indexes it unreversed for the up blocks).
    "class_conditional_attention": dict(
        BASE,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2D",
        attention_head_dim=[8, 16],
        num_class_embeds=5,
    ),
}

VAE_CONFIG = dict(
    block_out_channels=(16, 32),
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
    sample_size=16,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
)


def perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.eval()


def unet_inputs(name: str, batch: int = 2, size: int = 8) -> dict:
    generator = torch.Generator().manual_seed(1)
    inputs = {
        "sample": torch.randn(batch, 4, size, size, generator=generator),
        "timestep": torch.tensor([3, 977][:batch] + [500] * max(0, batch - 2)),
    }
    config = UNET_CONFIGS[name]
    if config.get("num_class_embeds"):
        inputs["class_labels"] = torch.arange(batch) % config["num_class_embeds"]
        inputs["encoder_hidden_states"] = None  # diffusers' forward needs the argument
    else:
        context_dim = config["cross_attention_dim"]
        inputs["encoder_hidden_states"] = torch.randn(batch, 7, context_dim, generator=generator)
    if config.get("time_cond_proj_dim"):
        inputs["timestep_cond"] = torch.randn(
            batch, config["time_cond_proj_dim"], generator=generator
        )
    if config.get("addition_embed_type") == "text_time":
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, 16, generator=generator),
            "time_ids": torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]]).repeat(batch, 1),
        }
    return inputs


class Checkpoints:
    """Lazily built diffusers models and their saved folders, shared by the whole session."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.models: dict[str, torch.nn.Module] = {}

    def unet(self, name: str):
        if name not in self.models:
            from diffusers import UNet2DConditionModel

            torch.manual_seed(0)
            model = perturb(UNet2DConditionModel(**UNET_CONFIGS[name]), seed=len(self.models))
            model.save_pretrained(self.root / name)
            self.models[name] = model
        return self.models[name], self.root / name

    def vae(self, name: str = "vae", **overrides):
        if name not in self.models:
            from diffusers import AutoencoderKL

            torch.manual_seed(0)
            model = perturb(AutoencoderKL(**{**VAE_CONFIG, **overrides}), seed=len(self.models))
            model.save_pretrained(self.root / name)
            self.models[name] = model
        return self.models[name], self.root / name
