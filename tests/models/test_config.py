"""The config dataclasses: diffusers keys in and out, dict-style access, validation messages."""

from __future__ import annotations

import pytest

from fastdiff.models import UNetConfig, VAEConfig
from tests.models.reference import UNET_CONFIGS, VAE_CONFIG


def test_round_trip_keeps_unknown_keys_and_drops_bookkeeping():
    raw = {**UNET_CONFIGS["sdxl"], "_diffusers_version": "0.42.1", "future_option": [1, 2]}
    config = UNetConfig.from_dict(raw)
    out = config.to_dict()
    assert out["_class_name"] == "UNet2DConditionModel"
    assert "_diffusers_version" not in out
    assert out["future_option"] == [1, 2] and config["future_option"] == [1, 2]
    assert out["transformer_layers_per_block"] == [1, 2]
    assert UNetConfig.from_dict(out).to_dict() == out


def test_dict_style_access():
    config = VAEConfig.from_dict(VAE_CONFIG)
    assert config["latent_channels"] == config.latent_channels == 4
    assert config.get("shift_factor") is None and config.get("absent", 3) == 3
    assert "scaling_factor" in config and "absent" not in config and "extra" not in config
    with pytest.raises(KeyError):
        config["absent"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, "mid_block_type="),
        ({"addition_embed_type": "text"}, "addition_embed_type="),
        ({"addition_embed_type": "text_time"}, "addition_time_embed_dim"),
        ({"act_fn": "gelu"}, "act_fn="),
        ({"layers_per_block": [1, 1, 1]}, "layers_per_block has 3 entries"),
        ({"up_block_types": ["UpBlock2D"]}, "same length"),
        ({"conv_in_kernel": 2}, "conv_in_kernel=2"),
        ({"transformer_layers_per_block": [[1], [1]]}, "transformer_layers_per_block"),
        ({"only_cross_attention": True}, "only_cross_attention="),
        # These failed later inside torch ("negative dimension", "must be divisible by
        # num_groups") without naming the config key.
        ({"in_channels": -4}, "in_channels=-4; supported values: a positive int"),
        ({"out_channels": "4"}, "out_channels='4'; supported values: a positive int"),
        ({"norm_num_groups": 5}, "must be a positive int that norm_num_groups=5 divides"),
        # A hand-edited config.json: these ended in a TypeError, a ZeroDivisionError or "98
        # unexpected keys" from torch or the loader, naming neither the key nor the value.
        ({"layers_per_block": "1"}, "layers_per_block='1'; supported values: a positive int"),
        ({"layers_per_block": 1.5}, "layers_per_block=1.5; supported"),
        ({"layers_per_block": 0}, "layers_per_block=0; supported"),
        ({"layers_per_block": [2, -1]}, "layers_per_block=-1; supported"),
        ({"attention_head_dim": "8"}, "attention_head_dim='8'; supported"),
        ({"attention_head_dim": 0}, "attention_head_dim=0; supported"),
        ({"cross_attention_dim": "32"}, "cross_attention_dim='32'; supported"),
        ({"num_class_embeds": "4"}, "num_class_embeds='4'; supported values: a positive int or"),
        ({"norm_eps": "1e-5"}, "norm_eps='1e-5'; supported values: a positive number"),
        (
            {"block_out_channels": "16,32"},
            "config block_out_channels must be a non-empty list, got '16,32'",
        ),
        ({"down_block_types": "DownBlock2D"}, "config down_block_types must be a non-empty list"),
        ({"block_out_channels": [], "down_block_types": [], "up_block_types": []}, "non-empty"),
        ({"block_out_channels": [0, 0]}, "must be a positive int"),
        (
            {
                "addition_embed_type": "text_time",
                "addition_time_embed_dim": "8",
                "projection_class_embeddings_input_dim": 80,
            },
            "addition_time_embed_dim='8'; supported",
        ),
        # Flags written as strings: "false" would read as true.
        ({"use_linear_projection": "false"}, "use_linear_projection='false'; supported values"),
        (
            {"flip_sin_to_cos": "false"},
            "flip_sin_to_cos='false'; supported values: true, false, null",
        ),
        ({"upcast_attention": 1}, "upcast_attention=1; supported values: true, false, null"),
        ({"freq_shift": "1"}, "freq_shift='1'; supported values: a number"),
        ({"block_out_channels": [2, 4], "norm_num_groups": 1, "freq_shift": 1}, "divide by zero"),
    ],
)
def test_unet_config_rejects_unsupported_values(overrides, message):
    with pytest.raises(ValueError, match=message) as error:
        UNetConfig.from_dict({**UNET_CONFIGS["sd1"], **overrides})
    assert any(
        word in str(error.value)
        for word in ("supported values", "entries", "length", "needs", "divide", "list")
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"down_block_types": ["AttnDownEncoderBlock2D", "DownEncoderBlock2D"]}, "supported"),
        ({"block_out_channels": [16]}, "same length"),
        ({"layers_per_block": 0}, "layers_per_block"),
        # 0 used to decode every image to NaN; a string failed in the decoder with a TypeError.
        ({"scaling_factor": 0}, "scaling_factor=0; supported values: a positive number"),
        ({"scaling_factor": "0.18"}, "scaling_factor='0.18'; supported values: a positive"),
        ({"shift_factor": float("nan")}, "shift_factor=nan"),
        ({"latent_channels": "4"}, "latent_channels='4'; supported values: a positive int"),
        ({"in_channels": "3"}, "in_channels='3'; supported values: a positive int"),
        ({"norm_num_groups": 0}, "norm_num_groups=0; supported values: a positive int"),
        # torch's "num_channels must be divisible by num_groups" named neither key nor file.
        ({"norm_num_groups": 3}, "every entry must be a positive int that norm_num_groups=3"),
        ({"block_out_channels": "32"}, "config block_out_channels must be a non-empty list"),
        ({"use_quant_conv": "no"}, "use_quant_conv='no'; supported values: true, false, null"),
        ({"mid_block_add_attention": "maybe"}, "mid_block_add_attention='maybe'; supported"),
    ],
)
def test_vae_config_rejects_unsupported_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        VAEConfig.from_dict({**VAE_CONFIG, **overrides})


# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json as published (JSON null -> None): its
# "upcast_attention": null was refused once flags had to be booleans.
SDXL_BASE_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.19.0.dev0",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}


def test_published_sdxl_unet_config_reads_and_builds():
    import torch

    from fastdiff.models import UNet2DConditionModel

    config = UNetConfig.from_dict(SDXL_BASE_UNET_CONFIG)
    assert config.upcast_attention is None and config.use_linear_projection is True
    with torch.device("meta"):  # the whole 2.6 B-parameter architecture, without its memory
        model = UNet2DConditionModel(config)
    assert sum(p.numel() for p in model.parameters()) == 2_567_463_684
