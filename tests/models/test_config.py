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
        ({"norm_num_groups": 5}, "must be an int that norm_num_groups=5 divides"),
    ],
)
def test_unet_config_rejects_unsupported_values(overrides, message):
    with pytest.raises(ValueError, match=message) as error:
        UNetConfig.from_dict({**UNET_CONFIGS["sd1"], **overrides})
    assert (
        "supported values" in str(error.value)
        or "entries" in str(error.value)
        or ("length" in str(error.value) or "needs" in str(error.value))
        or "divides" in str(error.value)
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
    ],
)
def test_vae_config_rejects_unsupported_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        VAEConfig.from_dict({**VAE_CONFIG, **overrides})
