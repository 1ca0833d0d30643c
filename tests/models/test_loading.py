"""Checkpoint folders: variants, shards, our writer, and every error case naming what is wrong."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastdiff.models import CheckpointError, UNetConfig, load_unet, load_vae, save_pretrained
from fastdiff.models.loading import build_from_folder
from tests.models.reference import unet_inputs

WEIGHTS = "diffusion_pytorch_model.safetensors"


def run(model, name: str = "class_conditional") -> torch.Tensor:
    with torch.no_grad():
        return model(**unet_inputs(name))


def copy_folder(source, target):
    shutil.copytree(source, target)
    return target


def test_fp16_variant(checkpoints, tmp_path):
    reference, _ = checkpoints.unet("class_conditional")
    reference.save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert not (tmp_path / WEIGHTS).exists()
    # Only the fp16 file exists: chosen with variant=None as well as variant="fp16".
    for variant in (None, "fp16"):
        model = load_unet(tmp_path, variant=variant, dtype=torch.float16)
        assert model.dtype == torch.float16
        assert torch.equal(
            model.conv_in.weight, reference.conv_in.weight.detach().to(torch.float16)
        )
    # Both present: variant picks the file (the copies differ so the choice is visible).
    state = load_file(tmp_path / "diffusion_pytorch_model.fp16.safetensors")
    state["conv_in.bias"] = state["conv_in.bias"] + 1
    save_file(state, tmp_path / WEIGHTS)
    default = load_unet(tmp_path)
    half = load_unet(tmp_path, variant="fp16")
    assert default.dtype == half.dtype == torch.float32
    torch.testing.assert_close(default.conv_in.bias, half.conv_in.bias + 1)
    with pytest.raises(FileNotFoundError, match="bf16"):
        load_unet(tmp_path, variant="bf16")


def test_sharded_checkpoint(checkpoints, tmp_path):
    reference, _ = checkpoints.unet("sd1")
    reference.save_pretrained(tmp_path, max_shard_size="60KB")
    index = json.loads((tmp_path / f"{WEIGHTS}.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    expected = run(reference, "sd1").sample
    torch.testing.assert_close(run(load_unet(tmp_path), "sd1"), expected, atol=1e-4, rtol=0)


def test_sharded_errors_name_the_file(checkpoints, tmp_path):
    reference, _ = checkpoints.unet("sd1")
    reference.save_pretrained(tmp_path, max_shard_size="60KB")
    index_path = tmp_path / f"{WEIGHTS}.index.json"
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / shard).unlink()
    with pytest.raises(FileNotFoundError, match=shard):
        load_unet(tmp_path)
    index_path.write_text("{not json")
    with pytest.raises(CheckpointError, match="index.json"):
        load_unet(tmp_path)


def test_shards_are_read_whole_and_checked_against_the_index(checkpoints, tmp_path):
    """As diffusers does, every tensor of each shard the index names is read: a tensor the index
    leaves out is still an (unexpected) key of the checkpoint, named; a tensor the index lists
    that its shard lacks is named with the shard."""
    reference, _ = checkpoints.unet("sd1")
    reference.save_pretrained(tmp_path, max_shard_size="60KB")
    index_path = tmp_path / f"{WEIGHTS}.index.json"
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    tensors = load_file(tmp_path / shard)
    save_file({**tensors, "stray.weight": torch.zeros(2)}, tmp_path / shard)
    with pytest.raises(CheckpointError, match="1 unexpected keys: stray.weight"):
        load_unet(tmp_path)
    dropped = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, tmp_path / shard)
    with pytest.raises(CheckpointError, match=rf"{shard}: the index lists 1 tensors this file"):
        load_unet(tmp_path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("conv_in.weight"), r"1 missing keys: conv_in.weight"),
        (lambda s: s.update(extra_layer=torch.zeros(2)), r"1 unexpected keys: extra_layer"),
        (
            lambda s: s.update({"conv_out.bias": torch.zeros(5)}),
            r"1 mis-shaped keys: conv_out.bias \(checkpoint \(5,\), model \(4,\)\)",
        ),
        (  # used to fail inside load_state_dict without naming the file
            lambda s: s.update({"conv_out.bias": torch.zeros(4, dtype=torch.int32)}),
            r"1 weights are not floating-point tensors: conv_out.bias \(torch.int32\)",
        ),
    ],
    ids=["missing", "unexpected", "mis-shaped", "integer"],
)
def test_mismatched_weights_raise_naming_keys(checkpoints, tmp_path, edit, message):
    _, folder = checkpoints.unet("class_conditional")
    copy_folder(folder, tmp_path / "unet")
    state = load_file(tmp_path / "unet" / WEIGHTS)
    edit(state)
    save_file(state, tmp_path / "unet" / WEIGHTS)
    with pytest.raises(CheckpointError, match=message):
        load_unet(tmp_path / "unet")


def test_many_missing_keys_are_summarised(checkpoints, tmp_path):
    _, folder = checkpoints.unet("sd1")
    copy_folder(folder, tmp_path / "unet")
    state = load_file(tmp_path / "unet" / WEIGHTS)
    dropped = [key for key in state if key.startswith("up_blocks.")]
    for key in dropped:
        del state[key]
    save_file(state, tmp_path / "unet" / WEIGHTS)
    with pytest.raises(CheckpointError, match=rf"{len(dropped)} missing keys: .*more\)"):
        load_unet(tmp_path / "unet")


def test_truncated_and_corrupt_safetensors(checkpoints, tmp_path):
    _, folder = checkpoints.vae()
    copy_folder(folder, tmp_path / "vae")
    weights = tmp_path / "vae" / WEIGHTS
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS}.*truncated or corrupt"):
        load_vae(tmp_path / "vae")
    weights.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match=WEIGHTS):
        load_vae(tmp_path / "vae")


@pytest.mark.parametrize(
    "key, value, supported",
    [
        ("resnet_time_scale_shift", "scale_shift", "'default'"),
        ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"], "'DownBlock2D'"),
        ("class_embed_type", "projection", "None"),
        ("num_attention_heads", 8, "None"),
        ("attention_head_dim", [4, 4, 4], "3 entries"),
    ],
)
def test_unsupported_config_raises_naming_key(checkpoints, tmp_path, key, value, supported):
    _, folder = checkpoints.unet("sd1")
    copy_folder(folder, tmp_path / "unet")
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    config[key] = value
    (tmp_path / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=key) as error:
        load_unet(tmp_path / "unet")
    assert supported in str(error.value) and "config.json" in str(error.value)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_unet(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_unet(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(FileNotFoundError, match=WEIGHTS):
        load_vae(tmp_path)


def test_bad_dtype_and_device_are_named(tmp_path):
    # These used to fail in Tensor.to() or load_state_dict (or with an AssertionError).
    with pytest.raises(ValueError, match="dtype must be a floating-point torch.dtype.*'fp16'"):
        load_unet(tmp_path, dtype="fp16")
    with pytest.raises(ValueError, match="floating-point torch.dtype or None, got torch.int8"):
        load_unet(tmp_path, dtype=torch.int8)
    with pytest.raises(ValueError, match="device 'gpu' is not a torch device"):
        load_vae(tmp_path, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="'cuda' was requested but CUDA is not available"):
            load_vae(tmp_path, device="cuda")


def test_failed_load_assigns_nothing(checkpoints, tmp_path, monkeypatch):
    """Validation happens before any tensor is assigned: a bad checkpoint never reaches the model's
    load_state_dict."""
    from fastdiff.models.unet import UNet2DConditionModel

    _, folder = checkpoints.unet("class_conditional")
    copy_folder(folder, tmp_path / "unet")
    state = load_file(tmp_path / "unet" / WEIGHTS)
    state.pop("conv_out.bias")
    save_file(state, tmp_path / "unet" / WEIGHTS)
    calls = []
    original = UNet2DConditionModel.load_state_dict
    monkeypatch.setattr(
        UNet2DConditionModel,
        "load_state_dict",
        lambda self, *a, **k: calls.append(1) or original(self, *a, **k),
    )
    with pytest.raises(CheckpointError):
        build_from_folder(UNet2DConditionModel, UNetConfig, tmp_path / "unet", None, None, None)
    assert calls == []


@pytest.mark.parametrize("name", ["class_conditional", "sdxl"])
def test_saved_unet_loads_in_fastdiff_and_diffusers(checkpoints, tmp_path, name):
    from diffusers import UNet2DConditionModel as DiffusersUNet

    reference, folder = checkpoints.unet(name)
    model = load_unet(folder)
    model.fuse_qkv_projections()  # saving must still write diffusers' unfused keys
    save_pretrained(model, tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["config.json", WEIGHTS]
    expected = run(reference, name).sample
    torch.testing.assert_close(
        run(load_unet(tmp_path / "saved"), name), expected, atol=1e-4, rtol=0
    )
    reloaded = DiffusersUNet.from_pretrained(tmp_path / "saved").eval()
    torch.testing.assert_close(run(reloaded, name).sample, expected, atol=1e-4, rtol=0)


def test_saved_vae_loads_in_diffusers_and_fp16_variant(checkpoints, tmp_path):
    from diffusers import AutoencoderKL as DiffusersVAE

    reference, folder = checkpoints.vae()
    model = load_vae(folder)
    model.save_pretrained(tmp_path / "vae")
    model.save_pretrained(tmp_path / "vae", dtype=torch.float16, variant="fp16")
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        expected = reference.decode(z).sample
        reloaded = DiffusersVAE.from_pretrained(tmp_path / "vae").eval()
        torch.testing.assert_close(reloaded.decode(z).sample, expected, atol=1e-4, rtol=0)
        half = load_vae(tmp_path / "vae", variant="fp16", dtype=torch.float16)
        assert half.post_quant_conv.weight.dtype == torch.float16
        stored = load_file(tmp_path / "vae" / "diffusion_pytorch_model.fp16.safetensors")
        assert all(tensor.dtype == torch.float16 for tensor in stored.values())


def test_save_rejects_other_modules(tmp_path):
    with pytest.raises(ValueError, match="UNet2DConditionModel, AutoencoderKL or AutoencoderTiny"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path)
