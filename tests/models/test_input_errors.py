"""Bad input to the models layer fails with an error that names what is wrong: the file, the
config key and value, the tensor's shape. One case per check; every case builds at most a tiny
model and runs no forward pass."""

from __future__ import annotations

import json
import re

import pytest
import torch

from fastdiff.models import (
    AutoencoderTiny,
    CheckpointError,
    UNet2DConditionModel,
    UNetConfig,
    VAEConfig,
    load_unet,
)
from fastdiff.models.context_groups import GroupedEmbedding
from fastdiff.models.embeddings import guidance_scale_embedding, timestep_embedding
from fastdiff.models.lora import LoraLayer, apply_adapter_config
from tests.models.reference import UNET_CONFIGS

WEIGHTS = "diffusion_pytorch_model"
TINY_VAE = dict(
    encoder_block_out_channels=(8, 8),
    decoder_block_out_channels=(8, 8),
    num_encoder_blocks=(1, 1),
    num_decoder_blocks=(1, 1),
)


def unet_folder(tmp_path, index: object, suffix: str = "safetensors"):
    """A U-Net folder with a valid config and only a weights index holding ``index``. (sd1: a
    model with a class embedding, built on the meta device, imports seconds of torch._refs.)"""
    (tmp_path / "config.json").write_text(json.dumps(UNET_CONFIGS["sd1"]))
    (tmp_path / f"{WEIGHTS}.{suffix}.index.json").write_text(json.dumps(index))
    return tmp_path


# ---- checkpoint folders ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "file_name",
    ["config.json", f"{WEIGHTS}.safetensors.index.json"],
    ids=["config-is-a-list", "index-is-a-list"],
)
def test_json_that_is_not_an_object_names_the_file(tmp_path, file_name):
    unet_folder(tmp_path, {"weight_map": {"conv_in.weight": "shard.safetensors"}})
    (tmp_path / file_name).write_text(json.dumps([1, 2]))
    with pytest.raises(CheckpointError, match=rf"{re.escape(file_name)}: expected a JSON object"):
        load_unet(tmp_path)


@pytest.mark.parametrize(
    "index",
    [{"metadata": {"total_size": 4}}, {"weight_map": {}}, {"weight_map": ["a.safetensors"]}],
    ids=["no-weight-map", "empty-weight-map", "weight-map-is-a-list"],
)
def test_index_without_a_weight_map_is_named(tmp_path, index):
    unet_folder(tmp_path, index)
    with pytest.raises(CheckpointError, match=r"index.json: index has no 'weight_map' object"):
        load_unet(tmp_path)


@pytest.mark.parametrize("shard", [None, 3], ids=["shard-is-null", "shard-is-a-number"])
def test_index_entry_that_is_not_a_file_name_is_named(tmp_path, shard):
    unet_folder(tmp_path, {"weight_map": {"conv_in.weight": shard}})
    with pytest.raises(
        CheckpointError, match=rf"weight_map\['conv_in.weight'\] is {shard!r}, not a file name"
    ):
        load_unet(tmp_path)


def test_missing_pickled_shard_is_named(tmp_path):
    unet_folder(tmp_path, {"weight_map": {"conv_in.weight": "gone-00001.bin"}}, suffix="bin")
    with pytest.raises(FileNotFoundError, match=r"gone-00001.bin: file not found"):
        load_unet(tmp_path)


# ---- configs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config_class, raw, message",
    [
        (UNetConfig, [("in_channels", 4)], "UNetConfig: config must be a dict, got list"),
        (VAEConfig, "config.json", "VAEConfig: config must be a dict, got str"),
    ],
    ids=["unet-config-is-a-list", "vae-config-is-a-path"],
)
def test_config_that_is_not_a_dict_names_its_type(config_class, raw, message):
    with pytest.raises(ValueError, match=message):
        config_class.from_dict(raw)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"norm_num_groups": 0}, "norm_num_groups=0; supported values: a positive int"),
        ({"norm_num_groups": None}, "norm_num_groups=None; supported values: a positive int"),
        ({"norm_num_groups": "8"}, "norm_num_groups='8'; supported values: a positive int"),
        (
            {"reverse_transformer_layers_per_block": [[1], [1]]},
            r"reverse_transformer_layers_per_block=\[\[1\], \[1\]\]; supported values: None",
        ),
    ],
    ids=["norm-groups-zero", "norm-groups-null", "norm-groups-string", "reverse-transformer"],
)
def test_unet_config_names_the_unsupported_value(overrides, message):
    with pytest.raises(ValueError, match=message):
        UNetConfig.from_dict({**UNET_CONFIGS["sd1"], **overrides})


@pytest.mark.parametrize(
    "change, message",
    [
        (
            dict(encoder_block_out_channels=8),
            "config encoder_block_out_channels must be a non-empty list, got 8",
        ),
        (
            dict(decoder_block_out_channels="8,8"),
            "config decoder_block_out_channels must be a non-empty list, got '8,8'",
        ),
        (
            dict(num_decoder_blocks=[]),
            r"config num_decoder_blocks must be a non-empty list, got \[\]",
        ),
        (dict(num_encoder_blocks=(1, -1)), "config num_encoder_blocks must hold ints >= 0, got -1"),
        (
            dict(num_decoder_blocks=(1, 1.5)),
            "config num_decoder_blocks must hold ints >= 0, got 1.5",
        ),
        (dict(num_encoder_blocks=(True, 1)), "num_encoder_blocks must hold ints >= 0, got True"),
    ],
    ids=[
        "widths-an-int",
        "widths-a-string",
        "no-decoder-blocks",
        "negative-block-count",
        "fractional-block-count",
        "bool-block-count",
    ],
)
def test_tiny_vae_config_names_the_bad_key(change, message):
    with pytest.raises(ValueError, match=message):
        AutoencoderTiny({**TINY_VAE, **change})


# ---- building a U-Net -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, overrides, message",
    [
        (
            "sd1",
            {"cross_attention_dim": None},
            "cross-attention blocks need attention_head_dim and cross_attention_dim values, got "
            "attention_head_dim=4 cross_attention_dim=None",
        ),
        (
            "sd1",
            {"attention_head_dim": 3},
            "attention_head_dim=3 heads do not divide the 32 channels of this block",
        ),
        (
            "class_conditional_attention",
            {"attention_head_dim": [8, 24]},
            "attention_head_dim=24 does not divide the 64 channels of this self-attention block",
        ),
    ],
    ids=[
        "cross-attention-without-context-width",
        "heads-do-not-divide",
        "head-width-does-not-divide",
    ],
)
def test_unet_that_cannot_be_built_names_the_key(name, overrides, message):
    with pytest.raises(ValueError, match=message):
        UNet2DConditionModel({**UNET_CONFIGS[name], **overrides})


# ---- model inputs -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def class_conditional_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(UNET_CONFIGS["class_conditional"]).eval()


@pytest.mark.parametrize(
    "shape, message",
    [((4, 8, 8), r"got \(4, 8, 8\)"), ((1, 3, 8, 8), r"got \(1, 3, 8, 8\)")],
    ids=["sample-without-batch", "sample-with-3-channels"],
)
def test_unet_sample_of_the_wrong_shape_is_named(class_conditional_unet, shape, message):
    with pytest.raises(ValueError, match=r"sample must be \(B, 4, H, W\), " + message):
        class_conditional_unet(torch.zeros(shape), 10, class_labels=torch.tensor([0]))


def test_unet_timestep_of_the_wrong_shape_is_named(class_conditional_unet):
    with pytest.raises(
        ValueError,
        match=r"timestep must be a number, a 0-d tensor or a tensor of shape \(1,\) or \(2,\), "
        r"got shape \(2, 1\)",
    ):
        class_conditional_unet(
            torch.zeros(2, 4, 8, 8), torch.zeros(2, 1), class_labels=torch.tensor([0, 1])
        )


@pytest.mark.parametrize(
    "method, shape, message",
    [
        ("decode", (1, 3, 4, 4), r"vae.decode expects \(B, 4, H, W\), got \(1, 3, 4, 4\)"),
        ("encode", (3, 8, 8), r"vae.encode expects \(B, 3, H, W\), got \(3, 8, 8\)"),
    ],
    ids=["latents-with-3-channels", "image-without-batch"],
)
def test_tiny_vae_input_of_the_wrong_shape_is_named(method, shape, message):
    with pytest.raises(ValueError, match=message):
        getattr(AutoencoderTiny(TINY_VAE), method)(torch.zeros(shape))


@pytest.mark.parametrize(
    "embed, message",
    [
        (
            lambda t: timestep_embedding(t, 8),
            r"timestep_embedding expects a 1-D tensor, got shape \(2, 1\)",
        ),
        (
            lambda t: guidance_scale_embedding(t, 8),
            r"guidance scales must be a 1-D tensor, got \(2, 1\)",
        ),
    ],
    ids=["timesteps-2d", "guidance-scales-2d"],
)
def test_embeddings_of_a_column_name_its_shape(embed, message):
    with pytest.raises(ValueError, match=message):
        embed(torch.zeros(2, 1))


def test_grouped_embedding_names_a_row_count_that_is_no_group():
    # An internal guard: the U-Net only runs its blocks on B or groups * B rows.
    embedding = GroupedEmbedding(torch.zeros(2, 8), batch=2, groups=2)
    with pytest.raises(
        ValueError,
        match=r"a block ran on 3 rows; the timestep embedding has 2 \(2 contexts per sample: 4",
    ):
        embedding.for_batch(3)


def test_dora_adapter_config_is_refused():
    # diffusers writes the PEFT adapter config into the LoRA file's metadata.
    layers = {"down_blocks.0.attentions.0.proj_in": LoraLayer(torch.zeros(2, 4), torch.zeros(4, 2))}
    config = {"r": 2, "lora_alpha": 2, "use_dora": True}
    with pytest.raises(ValueError, match=r"LoRA weights for unet: DoRA adapters \(use_dora\)"):
        apply_adapter_config(layers, config, "LoRA weights for unet")
