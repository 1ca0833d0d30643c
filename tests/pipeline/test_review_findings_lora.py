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
