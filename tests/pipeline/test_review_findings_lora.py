"""LoRA bugs found by a review of fastdiff.models.lora / fastdiff.pipeline.lora, each test failing
before its fix: files that name a module twice, SGM names out of range and alphas that are not
one number were read wrongly or refused without naming the key."""

from __future__ import annotations

import pytest
import torch

from fastdiff.pipeline import Pipeline

RANK = 4
ATTENTION = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"


def factors(layer: torch.nn.Linear, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    down = torch.randn(RANK, layer.in_features, generator=generator)
    return down, torch.randn(layer.out_features, RANK, generator=generator)


def unet_weights(pipe: Pipeline) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in pipe.unet.state_dict().items()}


def assert_unchanged(pipe: Pipeline, weights: dict[str, torch.Tensor]) -> None:
    for name, value in pipe.unet.state_dict().items():
        torch.testing.assert_close(value, weights[name], rtol=0, atol=0)


def test_a_module_given_in_two_layouts_is_refused_not_half_dropped(sd_folder):
    """A file giving one module's factors in two layouts (PEFT's ``to_q.lora_A`` and diffusers'
    older ``processor.to_q_lora.down``, as merged files do) was read as one layer whose factors
    the later keys overwrote: one LoRA's update silently dropped (or, with the keys in another
    order, one's down paired with the other's up). It is refused now, naming both keys."""
    pipe = Pipeline.from_pretrained(sd_folder)
    layer = pipe.unet.get_submodule(f"{ATTENTION}.to_q")
    (down, up), (older_down, older_up) = factors(layer, 0), factors(layer, 1)
    state = {
        f"unet.{ATTENTION}.to_q.lora_A.weight": down,
        f"unet.{ATTENTION}.to_q.lora_B.weight": up,
        f"unet.{ATTENTION}.processor.to_q_lora.down.weight": older_down,
        f"unet.{ATTENTION}.processor.to_q_lora.up.weight": older_up,
    }
    weights = unet_weights(pipe)
    with pytest.raises(ValueError, match=r"to_q\.lora_A\.weight.*to_q_lora\.down\.weight"):
        pipe.load_lora_weights(state)
    assert_unchanged(pipe, weights)


def test_sgm_input_block_part_out_of_range_is_refused_naming_the_layer(sdxl_folder):
    """An SGM input block has two parts (ResNet 0, transformer 1). A kohya key with part 2
    (``input_blocks_1_2_...``, a LoRA for another U-Net) raised IndexError ("tuple index out of
    range") from the name mapping, naming no key; now a ValueError that names the layer."""
    pipe = Pipeline.from_pretrained(sdxl_folder)
    weights = unet_weights(pipe)
    key = "lora_unet_input_blocks_1_2_conv"
    state = {
        f"{key}.lora_down.weight": torch.zeros(RANK, 8),
        f"{key}.lora_up.weight": torch.zeros(8, RANK),
    }
    with pytest.raises(ValueError, match="input_blocks_1_2_conv"):
        pipe.load_lora_weights(state)
    assert_unchanged(pipe, weights)


def test_an_alpha_that_is_not_one_number_is_refused_naming_the_key(sd_folder):
    """A kohya alpha must be one number; a tensor of several values raised torch's ValueError
    ("only one element tensors can be converted to Python scalars"), naming no key."""
    pipe = Pipeline.from_pretrained(sd_folder)
    layer = pipe.unet.get_submodule(f"{ATTENTION}.to_k")
    down, up = factors(layer, 0)
    key = "lora_unet_" + f"{ATTENTION}.to_k".replace(".", "_")
    state = {
        f"{key}.lora_down.weight": down,
        f"{key}.lora_up.weight": up,
        f"{key}.alpha": torch.tensor([1.0, 2.0]),
    }
    with pytest.raises(ValueError, match=rf"{key}\.alpha.*not one number"):
        pipe.load_lora_weights(state)


def test_a_scale_given_as_a_numpy_or_0_d_tensor_number_is_taken(sd_folder):
    """numpy.float32(0.5) and torch.tensor(0.5), which diffusers' fuse_lora takes, were refused
    as "not a finite number"; they fuse as 0.5 does."""
    import numpy as np

    pipe = Pipeline.from_pretrained(sd_folder)
    layer = pipe.unet.get_submodule(f"{ATTENTION}.to_q")
    down, up = factors(layer, 0)
    state = {
        f"unet.{ATTENTION}.to_q.lora_A.weight": down,
        f"unet.{ATTENTION}.to_q.lora_B.weight": up,
    }
    before = layer.weight.detach().clone()
    pipe.load_lora_weights(state, scale=0.5)
    wanted = layer.weight.detach().clone()
    for scale in (np.float32(0.5), torch.tensor(0.5)):
        pipe.unload_lora_weights()
        torch.testing.assert_close(layer.weight, before, rtol=0, atol=0)
        pipe.load_lora_weights(state, scale=scale)
        torch.testing.assert_close(layer.weight, wanted, rtol=0, atol=0)
    with pytest.raises(ValueError, match="LoRA scale must be a finite number"):
        pipe.load_lora_weights(state, scale=torch.tensor([0.5, 0.5]))


def test_adapter_metadata_that_is_not_an_object_is_named(sd_folder, tmp_path):
    """A lora_adapter_metadata entry holding valid JSON that is not an object (a list, a
    number) failed with AttributeError: 'list' object has no attribute 'items'."""
    from safetensors.torch import save_file

    pipe = Pipeline.from_pretrained(sd_folder)
    layer = pipe.unet.get_submodule(f"{ATTENTION}.to_q")
    down, up = factors(layer, 0)
    path = tmp_path / "lora.safetensors"
    state = {
        f"unet.{ATTENTION}.to_q.lora_A.weight": down.contiguous(),
        f"unet.{ATTENTION}.to_q.lora_B.weight": up.contiguous(),
    }
    save_file(state, path, metadata={"lora_adapter_metadata": "[1, 2]"})
    weights = unet_weights(pipe)
    with pytest.raises(ValueError, match="lora_adapter_metadata must be a JSON object"):
        pipe.load_lora_weights(path)
    assert_unchanged(pipe, weights)
