"""U-Net config values that built a model computing something else, or failing later with an
error that named no config key, found by review of ``UNet2DConditionModel``'s options (each test
failed before its fix)."""

from __future__ import annotations

import math

import pytest
import torch

from fastdiff.models import UNet2DConditionModel, UNetConfig
from tests.models.reference import UNET_CONFIGS, perturb, unet_inputs


def refused(overrides: dict, message: str, name: str = "sd1") -> None:
    with pytest.raises(ValueError, match=message):
        UNetConfig.from_dict({**UNET_CONFIGS[name], **overrides})


@pytest.mark.parametrize("padding", [2, -1, "1", None, 1.0])
def test_downsample_padding_other_than_0_or_1_is_refused(padding):
    """2 built a model whose down path shrank 8 -> 5, which diffusers cannot run at an 8x8
    latent (its 2x upsampling meets an 8x8 skip) and fastdiff ran by resizing to the skip; -1,
    "1", 1.0 and null failed in torch ("negative padding", "Invalid padding string", a conv2d
    TypeError), naming no config key."""
    refused({"downsample_padding": padding}, f"downsample_padding={padding!r}; supported values")


@pytest.mark.parametrize("dropout", [1.5, -0.1, "0.1", None])
def test_dropout_outside_0_to_1_is_refused(dropout):
    """Failed inside nn.Dropout ("dropout probability has to be between 0 and 1", or a
    TypeError comparing a string), naming no config key."""
    refused({"dropout": dropout}, f"dropout={dropout!r}; supported values: a number from 0 to 1")


@pytest.mark.parametrize("factor", [0, -1.0, math.nan, "1.5", None])
def test_mid_block_scale_factor_must_be_a_positive_number(factor):
    """0 (or NaN) built a U-Net whose every output was NaN: the mid block divides by it; a
    string or null built too and failed with a TypeError in the first forward."""
    refused(
        {"mid_block_scale_factor": factor},
        rf"mid_block_scale_factor={factor!r}; supported values: a positive number",
    )


@pytest.mark.parametrize("shift", [math.nan, math.inf])
def test_freq_shift_must_be_finite(shift):
    """freq_shift=NaN (JSON NaN reads in Python) built a U-Net whose every output was NaN."""
    refused({"freq_shift": shift}, rf"freq_shift={shift!r}; supported values: a number, finite")


@pytest.mark.parametrize("key, kernel", [("conv_in_kernel", -1), ("conv_out_kernel", -3)])
def test_negative_conv_kernel_is_refused(key, kernel):
    """-1 % 2 == 1 in Python: a negative odd kernel passed the "odd int" check and failed in
    torch with "Trying to create tensor with negative dimension"."""
    refused({key: kernel}, f"{key}={kernel}; supported values: a positive odd int")


def test_norm_num_groups_true_is_refused():
    """A JSON true is an int to Python: it passed the config and failed in the first forward
    inside the GroupNorm op ("num_groups must be an int, got True")."""
    refused({"norm_num_groups": True}, "norm_num_groups=True; supported values: a positive int")


def test_null_flags_read_as_false_as_diffusers_reads_them():
    """dual_cross_attention, resnet_skip_time_act and class_embeddings_concat null were refused
    ("supported values: False") where diffusers, like fastdiff's other flags, reads null as
    false; the model now matches diffusers'."""
    from diffusers import UNet2DConditionModel as DiffusersUNet

    config = {
        **UNET_CONFIGS["sd1"],
        "dual_cross_attention": None,
        "resnet_skip_time_act": None,
        "class_embeddings_concat": None,
    }
    torch.manual_seed(0)
    reference = perturb(DiffusersUNet(**config), seed=11)
    model = UNet2DConditionModel(config).eval()
    model.load_state_dict(reference.state_dict())
    inputs = unet_inputs("sd1")
    with torch.no_grad():
        expected = reference(**inputs).sample
        torch.testing.assert_close(model(**inputs), expected, atol=1e-4, rtol=0)


def test_cross_attention_blocks_of_different_context_widths_are_refused():
    """cross_attention_dim=[32, 24] gave the two cross-attention stages different key/value
    widths: no encoder_hidden_states fits both, and the first forward failed in a matmul
    ("mat1 and mat2 shapes cannot be multiplied"), in diffusers too. A width at a stage without
    cross-attention is still free (diffusers ignores it)."""
    sd2 = {**UNET_CONFIGS["sd2"], "cross_attention_dim": [32, 24]}
    refused(sd2, r"cross_attention_dim=\[32, 24\].*different widths \[24, 32\]", name="sd2")

    # SDXL-like: the first stage has no cross-attention; the mid and up blocks use the last
    # stage's width, as diffusers indexes them.
    from diffusers import UNet2DConditionModel as DiffusersUNet

    config = {**UNET_CONFIGS["sdxl"], "cross_attention_dim": [8, 32]}
    torch.manual_seed(0)
    reference = perturb(DiffusersUNet(**config), seed=12)
    model = UNet2DConditionModel(config).eval()
    model.load_state_dict(reference.state_dict())
    inputs = unet_inputs("sdxl")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs), reference(**inputs).sample, atol=1e-4, rtol=0)


def built(name: str) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(UNET_CONFIGS[name]).eval()


@pytest.mark.parametrize(
    "shape", [(2, 7, 24), (2, 32), (2, 7, 32, 1)], ids=["other-width", "2-d", "4-d"]
)
def test_a_context_of_another_width_is_named(shape):
    """A context whose width is not the config's cross_attention_dim failed in the first
    cross-attention with "mat1 and mat2 shapes cannot be multiplied" (as in diffusers), naming
    neither the input nor the width it needs."""
    model, inputs = built("sd1"), unet_inputs("sd1")
    width = UNET_CONFIGS["sd1"]["cross_attention_dim"]
    inputs["encoder_hidden_states"] = torch.randn(shape)
    with pytest.raises(ValueError, match=rf"encoder_hidden_states must be \(B, tokens, {width}\)"):
        with torch.no_grad():
            model(**inputs)


@pytest.mark.parametrize("part", ["text_embeds", "time_ids"])
def test_added_conditions_that_do_not_add_up_are_named(part):
    """SDXL's pooled text embedding and micro-conditioning ids are projected together: features
    that do not add up to projection_class_embeddings_input_dim failed in that GEMM with a
    shape error naming neither input."""
    model, inputs = built("sdxl"), unet_inputs("sdxl")
    added = inputs["added_cond_kwargs"]
    added[part] = added[part][:, :-1]  # one feature / one id short
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim"):
        with torch.no_grad():
            model(**inputs)
