"""Training configs: JSON onto dataclasses, unknown keys and bad values rejected by name."""

import json

import pytest

from fastdiff.training.config import (
    TrainConfig,
    config_from_dict,
    config_to_dict,
    load_config,
)


def test_round_trip_and_defaults(tiny_config_dict):
    config = config_from_dict(tiny_config_dict)
    assert config.vae.block_out_channels == [8, 16]
    assert config.unet.prediction_type == TrainConfig().unet.prediction_type  # default kept
    assert config_from_dict(config_to_dict(config)) == config


def test_unknown_keys_are_named():
    with pytest.raises(ValueError, match=r"unet: unknown key\(s\) \['lerning_rate'\]"):
        config_from_dict({"unet": {"lerning_rate": 1e-3}})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['epochs'\]; allowed keys"):
        config_from_dict({"epochs": 3})


def test_bad_values_raise():
    with pytest.raises(ValueError, match="unknown stage 'gan'"):
        config_from_dict({"stages": ["vae", "gan"]})
    with pytest.raises(ValueError, match="stages must be a non-empty list"):  # --stages ","
        config_from_dict({"stages": []})
    with pytest.raises(ValueError, match=r"vae.steps must lie in \[1, inf\), got 0"):
        config_from_dict({"vae": {"steps": 0}})
    with pytest.raises(ValueError, match="export_dtype"):
        config_from_dict({"export_dtype": "bfloat16"})
    with pytest.raises(ValueError, match="expected a JSON object"):
        config_from_dict({"vae": [1, 2]})


@pytest.mark.parametrize(
    "values,message",
    [
        # Each of these used to pass here and fail only when its stage started, after the
        # stages before it had trained (or, for the learning rate, deep in the optimizer).
        ({"unet": {"learning_rate": "1e-3"}}, "unet.learning_rate must be float, got '1e-3'"),
        ({"unet": {"learning_rate": -1.0}}, r"unet.learning_rate must lie in \(0, inf\)"),
        ({"vae": {"steps": 1.5}}, "vae.steps must be int, got 1.5"),
        ({"classifier": {"batch_size": True}}, "classifier.batch_size must be int, got True"),
        ({"unet": {"prediction_type": "x0"}}, "unet.prediction_type: unknown value 'x0'"),
        ({"unet": {"beta_schedule": "cosine"}}, "unet.beta_schedule: unknown value 'cosine'"),
        ({"unet": {"cond_drop_prob": 2}}, r"unet.cond_drop_prob must lie in \[0, 1\]"),
        (
            {"unet": {"block_out_channels": [64, 100], "norm_num_groups": 32}},
            "unet.norm_num_groups=32 must divide every entry",
        ),
        # These were only checked when the U-Net stage started, or never: a torch error without
        # the section, a ZeroDivisionError, an IndexError, a TypeError, or a flag read as true.
        ({"unet": {"weight_decay": -0.5}}, r"unet.weight_decay must lie in \[0, inf\)"),
        ({"unet": {"ema_decay": 1.5}}, r"unet.ema_decay must lie in \[0, 1\), got 1.5"),
        ({"unet": {"num_train_timesteps": 0}}, "unet.num_train_timesteps must lie in"),
        ({"unet": {"attention_head_dim": 0}}, "unet.attention_head_dim must lie in"),
        ({"unet": {"min_snr_gamma": -1}}, r"unet.min_snr_gamma must lie in \(0, inf\)"),
        ({"unet": {"log_every": 0}}, r"unet.log_every must lie in \[1, inf\)"),
        ({"vae": {"norm_num_groups": 0}}, "vae.norm_num_groups must lie in"),
        ({"vae": {"block_out_channels": []}}, "vae.block_out_channels must be a non-empty list"),
        ({"seed": "0"}, "seed must be int, got '0'"),
        ({"unet": {"cosine_decay": "false"}}, "unet.cosine_decay must be bool, got 'false'"),
        ({"progress": "false"}, "progress must be bool, got 'false'"),
    ],
)
def test_stage_values_are_checked_before_training(values, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict(values)
    assert config_from_dict({"unet": {"min_snr_gamma": None}}).unet.min_snr_gamma is None


def test_load_config_file(tmp_path, tiny_config_dict):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny_config_dict))
    assert load_config(path).data.num_images == 96
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config(path)


def test_shipped_config_is_valid():
    from fastdiff.commands.train import packaged_config_path

    with packaged_config_path().open() as handle:
        config = config_from_dict(json.load(handle))
    assert config.stages == ["classifier", "vae", "unet"]
