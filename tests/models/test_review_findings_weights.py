"""Review findings on weights in and out (checkpoint folders, save_pretrained) and the
autoencoders' configs: each test failed before its fix."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastdiff.models import AutoencoderKL, CheckpointError, load_vae, save_pretrained
from fastdiff.models.config import VAEConfig

diffusers = pytest.importorskip("diffusers")

WEIGHTS = "diffusion_pytorch_model"
TINY_KL = dict(
    block_out_channels=(8, 16),
    layers_per_block=1,
    norm_num_groups=4,
    latent_channels=4,
    sample_size=8,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
)


def diffusers_vae() -> torch.nn.Module:
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(**TINY_KL)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model.eval()


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_saving_over_a_sharded_folder_is_what_loads_back(tmp_path, variant):
    """save_pretrained into a folder that held a sharded checkpoint wrote the single weights file
    but left the old ``.index.json`` beside it; both fastdiff and diffusers prefer the index, so
    loading the folder back silently gave the old weights."""
    folder = tmp_path / "vae"
    diffusers_vae().save_pretrained(folder, max_shard_size="20KB", variant=variant)
    assert any(name.endswith(".json") and ".index" in name for name in os.listdir(folder))
    model = load_vae(folder, variant=variant)
    with torch.no_grad():
        model.decoder.conv_out.bias.add_(1.0)
    save_pretrained(model, folder, variant=variant)
    again = load_vae(folder, variant=variant)
    torch.testing.assert_close(again.decoder.conv_out.bias, model.decoder.conv_out.bias)
    reloaded = diffusers.AutoencoderKL.from_pretrained(folder, variant=variant)
    torch.testing.assert_close(reloaded.decoder.conv_out.bias, model.decoder.conv_out.bias)
    assert not any(name.endswith(".json") and ".index" in name for name in os.listdir(folder))
    assert not any("-of-" in name for name in os.listdir(folder))  # the old shards went too


def test_diffusers_older_variant_index_name_is_read(tmp_path):
    """The older name diffusers still reads for a sharded variant's index is
    ``diffusion_pytorch_model.safetensors.fp16.index.json`` (its ``_fetch_index_file_legacy``);
    fastdiff looked for ``diffusion_pytorch_model.fp16.safetensors.index.json`` instead, so a
    folder diffusers loads was refused."""
    reference = diffusers_vae()
    reference.save_pretrained(tmp_path, max_shard_size="20KB", variant="fp16")
    os.rename(
        tmp_path / f"{WEIGHTS}.safetensors.index.fp16.json",
        tmp_path / f"{WEIGHTS}.safetensors.fp16.index.json",
    )
    assert diffusers.AutoencoderKL.from_pretrained(tmp_path, variant="fp16") is not None
    for variant in ("fp16", None):  # None: an fp16 variant is all there is
        model = load_vae(tmp_path, variant=variant)
        torch.testing.assert_close(model.decoder.conv_out.bias, reference.decoder.conv_out.bias)


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, "float16"])
def test_save_pretrained_refuses_a_dtype_that_is_not_floating_point(tmp_path, dtype):
    """save_pretrained(dtype=torch.int8) cast every weight to int8 and wrote the folder (which
    then loaded nowhere); the dtype must be a floating-point torch.dtype, as load_vae asks."""
    model = AutoencoderKL(VAEConfig(**TINY_KL))
    with pytest.raises(ValueError, match="floating-point"):
        save_pretrained(model, tmp_path / "vae", dtype=dtype)
    assert not (tmp_path / "vae").exists()


def test_legacy_attention_weight_that_is_not_1x1_is_refused(tmp_path):
    """Old VAE attention keys (``query``/``key``/``value``/``proj_attn``) in 1x1-convolution form
    are squeezed to linear weights on load; any 4-D tensor was squeezed, so a (C, C, 3, 3) kernel
    loaded silently as its top-left taps instead of being reported as mis-shaped."""
    diffusers_vae().save_pretrained(tmp_path)
    path = tmp_path / f"{WEIGHTS}.safetensors"
    state = load_file(path)
    prefix = "encoder.mid_block.attentions.0"
    weight = state.pop(f"{prefix}.to_q.weight").clone()  # not the parameter's own memory
    state[f"{prefix}.query.weight"] = weight[:, :, None, None].repeat(1, 1, 3, 3).contiguous()
    save_file(state, path)
    with pytest.raises(CheckpointError, match=r"mis-shaped keys: encoder.mid_block.attentions"):
        load_vae(tmp_path)
    state[f"{prefix}.query.weight"] = weight[:, :, None, None].contiguous()  # 1x1 still loads
    save_file(state, path)
    torch.testing.assert_close(
        load_vae(tmp_path).encoder.mid_block.attentions[0].to_q.weight, weight
    )


def test_load_state_dict_refuses_a_legacy_attention_kernel_that_is_not_1x1(tmp_path):
    """The same squeeze in the attention modules' load_state_dict hook (a state dict loaded into
    a built model, not through load_vae): a (C, C, 3, 3) ``query`` kernel loaded as its top-left
    taps. It is now left as it is, and torch reports the size mismatch."""
    diffusers_vae().save_pretrained(tmp_path)
    model = load_vae(tmp_path)
    state = model.state_dict()
    prefix = "encoder.mid_block.attentions.0"
    weight = state.pop(f"{prefix}.to_q.weight").clone()  # not the parameter's own memory
    state[f"{prefix}.query.weight"] = weight[:, :, None, None].repeat(1, 1, 3, 3)
    with pytest.raises(RuntimeError, match=rf"size mismatch for {prefix}.to_q.weight"):
        model.load_state_dict(state)
    state[f"{prefix}.query.weight"] = 2 * weight[:, :, None, None]  # the 1x1 form still loads
    model.load_state_dict(state)
    torch.testing.assert_close(model.encoder.mid_block.attentions[0].to_q.weight, 2 * weight)


def test_index_json_written_by_diffusers_still_reads(tmp_path):
    """Guard for the stale-index cleanup: a folder that only has diffusers' sharded form (index
    and shards) still loads, and saving a variant leaves the default index alone."""
    reference = diffusers_vae()
    reference.save_pretrained(tmp_path, max_shard_size="20KB")
    model = load_vae(tmp_path)
    save_pretrained(model, tmp_path, dtype=torch.float16, variant="fp16")
    assert (tmp_path / f"{WEIGHTS}.safetensors.index.json").is_file()
    index = json.loads((tmp_path / f"{WEIGHTS}.safetensors.index.json").read_text())
    assert all((tmp_path / shard).is_file() for shard in index["weight_map"].values())
    torch.testing.assert_close(
        load_vae(tmp_path).decoder.conv_out.bias, reference.decoder.conv_out.bias
    )


def test_a_config_json_cannot_hold_leaves_the_saved_folder_as_it_was(tmp_path):
    """write_component replaced the weights file first and only then found that the config did
    not serialise (a value set on ``model.config`` that JSON cannot hold): the folder was left
    with the new weights beside the old config. Now it fails before writing anything."""
    model = AutoencoderKL(VAEConfig(**TINY_KL))
    save_pretrained(model, tmp_path)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    with torch.no_grad():
        model.decoder.conv_out.bias.add_(1.0)
    model.config.extra["note"] = {"a set", "is not JSON"}
    with pytest.raises(ValueError, match="config.json: the config cannot be written as JSON"):
        save_pretrained(model, tmp_path)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before
