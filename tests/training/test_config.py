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
    with pytest.raises(ValueError, match=r"unet\.: unknown key\(s\) \['lerning_rate'\]"):
        config_from_dict({"unet": {"lerning_rate": 1e-3}})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['epochs'\]; allowed keys"):
        config_from_dict({"epochs": 3})


def test_bad_values_raise():
    with pytest.raises(ValueError, match="unknown stage 'gan'"):
        config_from_dict({"stages": ["vae", "gan"]})
    with pytest.raises(ValueError, match="vae: steps, batch_size"):
        config_from_dict({"vae": {"steps": 0}})
    with pytest.raises(ValueError, match="export_dtype"):
        config_from_dict({"export_dtype": "bfloat16"})
    with pytest.raises(ValueError, match="expected a JSON object"):
        config_from_dict({"vae": [1, 2]})


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
