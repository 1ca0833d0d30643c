"""fastdiff's U-Net against diffusers' UNet2DConditionModel on the same saved checkpoints."""

from __future__ import annotations

import pytest
import torch

from fastdiff.models import UNet2DConditionModel, UNetConfig, load_unet
from tests.models.reference import UNET_CONFIGS, unet_inputs

TOLERANCE = 1e-4
NAMES = list(UNET_CONFIGS)


def reference_output(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).sample


@pytest.mark.parametrize("name", NAMES)
def test_matches_diffusers(checkpoints, name):
    reference, folder = checkpoints.unet(name)
    inputs = unet_inputs(name)
    expected = reference_output(reference, inputs)
    with torch.no_grad():
        actual = load_unet(folder)(**inputs)
    assert actual.shape == expected.shape == inputs["sample"].shape
    assert expected.abs().max() > 0.1  # a real output, not a degenerate zero map
    torch.testing.assert_close(actual, expected, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize(
    "timestep",
    [7, 7.5, torch.tensor(7), torch.tensor(7.5), torch.tensor([7]), torch.tensor([7.0, 980.0])],
    ids=["int", "float", "0d-long", "0d-float", "1-element", "per-sample-float"],
)
def test_timestep_forms(checkpoints, timestep):
    reference, folder = checkpoints.unet("sd1")
    inputs = {**unet_inputs("sd1"), "timestep": timestep}
    expected = reference_output(reference, inputs)
    with torch.no_grad():
        actual = load_unet(folder)(**inputs)
    torch.testing.assert_close(actual, expected, atol=TOLERANCE, rtol=0)


def test_timestep_shape_mismatch_raises(checkpoints):
    _, folder = checkpoints.unet("sd1")
    inputs = {**unet_inputs("sd1", batch=2), "timestep": torch.tensor([1, 2, 3])}
    with pytest.raises(ValueError, match="timestep"):
        load_unet(folder)(**inputs)


@pytest.mark.parametrize("name", ["sd1", "sdxl", "class_conditional_attention"])
def test_fused_projections_same_output(checkpoints, name):
    _, folder = checkpoints.unet(name)
    model = load_unet(folder)
    inputs = unet_inputs(name)
    with torch.no_grad():
        expected = model(**inputs)
    state_before = model.state_dict()
    fused = model.fuse_qkv_projections()
    assert fused == len(model.attention_modules()) > 0
    assert all(hasattr(m, "to_qkv") != m.is_cross_attention for m in model.attention_modules())
    with torch.no_grad():
        actual = model(**inputs)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    # state_dict() still speaks diffusers' key names with the same tensors.
    state_after = model.state_dict()
    assert state_after.keys() == state_before.keys()
    for key, value in state_before.items():
        assert torch.equal(state_after[key], value), key
    # ...and a fused model accepts diffusers' unfused keys.
    fresh = UNet2DConditionModel(UNET_CONFIGS[name]).eval()
    fresh.fuse_qkv_projections()
    fresh.load_state_dict(state_before)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs), actual, atol=0, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_channels_last_same_output(checkpoints, name):
    _, folder = checkpoints.unet(name)
    model = load_unet(folder)
    inputs = unet_inputs(name)
    with torch.no_grad():
        expected = model(**inputs)
        model = model.to(memory_format=torch.channels_last)
        inputs["sample"] = inputs["sample"].to(memory_format=torch.channels_last)
        actual = model(**inputs)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_class_labels_condition_the_output(checkpoints):
    _, folder = checkpoints.unet("class_conditional")
    model = load_unet(folder)
    inputs = unet_inputs("class_conditional")
    with torch.no_grad():
        first = model(**inputs)
        other = model(**{**inputs, "class_labels": inputs["class_labels"] + 1})
    assert (first - other).abs().max() > 1e-3
    with pytest.raises(ValueError, match="class_labels"):
        model(inputs["sample"], inputs["timestep"])


def test_cross_attention_model_needs_context(checkpoints):
    _, folder = checkpoints.unet("sd1")
    inputs = unet_inputs("sd1")
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        load_unet(folder)(inputs["sample"], inputs["timestep"])


def test_text_time_needs_added_cond_kwargs(checkpoints):
    _, folder = checkpoints.unet("sdxl")
    inputs = unet_inputs("sdxl")
    inputs["added_cond_kwargs"] = {"text_embeds": inputs["added_cond_kwargs"]["text_embeds"]}
    with pytest.raises(ValueError, match="time_ids"):
        load_unet(folder)(**inputs)


def test_odd_latent_size_matches_diffusers(checkpoints):
    # 10x10 latents: the upsampler must restore the skip connection's 5x5 size, not 2x of it.
    reference, folder = checkpoints.unet("class_conditional")
    inputs = unet_inputs("class_conditional", size=10)
    inputs["sample"] = inputs["sample"][:, :, :9, :9]
    expected = reference_output(reference, inputs)
    with torch.no_grad():
        actual = load_unet(folder)(**inputs)
    torch.testing.assert_close(actual, expected, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("name", ["sdxl", "class_conditional"])
def test_forward_reads_no_tensor_values(name):
    """Runs entirely on the meta device: any .item(), value-dependent branch or data-dependent
    shape would fail there. That is what CUDA-graph capture requires of the forward pass."""
    with torch.device("meta"):
        model = UNet2DConditionModel(UNET_CONFIGS[name])
    inputs = unet_inputs(name)
    meta_inputs = {
        key: (
            {k: v.to("meta") for k, v in value.items()}
            if isinstance(value, dict)
            else value.to("meta")
        )
        for key, value in inputs.items()
        if value is not None
    }
    out = model(**meta_inputs)
    assert out.device.type == "meta" and out.shape == inputs["sample"].shape


def test_model_conveniences(checkpoints):
    _, folder = checkpoints.unet("sd1")
    model = load_unet(folder, dtype=torch.float64)
    assert model.dtype == torch.float64
    assert model.device == torch.device("cpu")
    assert isinstance(model.config, UNetConfig)
    assert model.config.in_channels == model.config["in_channels"] == 4
    assert not model.training


def test_self_attention_blocks_read_attention_head_dim_as_head_width():
    model = UNet2DConditionModel(UNET_CONFIGS["class_conditional_attention"])
    down = model.down_blocks[1].attentions[0]
    up = model.up_blocks[0].attentions[0]
    assert (down.heads, down.dim_head) == (4, 16)  # 64 channels / attention_head_dim[1]
    assert (up.heads, up.dim_head) == (8, 8)  # diffusers uses attention_head_dim[0] here
    assert not model.needs_context


def test_sd2_heads_follow_diffusers_attention_head_dim_semantics():
    # attention_head_dim=[2, 4] with block widths (32, 64): 2 and 4 heads of 16 features.
    model = UNet2DConditionModel(UNET_CONFIGS["sd2"])
    first = model.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    second = model.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    assert (first.heads, first.dim_head) == (2, 16)
    assert (second.heads, second.dim_head) == (4, 16)


def test_non_default_scalar_options_match_diffusers():
    from diffusers import UNet2DConditionModel as DiffusersUNet

    from tests.models.reference import perturb

    config = dict(
        UNET_CONFIGS["sd1"],
        resnet_out_scale_factor=2.0,  # diffusers ignores it for these block types
        mid_block_scale_factor=1.5,
        time_embedding_dim=48,
        center_input_sample=True,
        downsample_padding=0,
        conv_in_kernel=1,
        conv_out_kernel=5,
        cross_attention_dim=[32, 32],
        norm_eps=1e-3,
    )
    reference = perturb(DiffusersUNet(**config), seed=7)
    model = UNet2DConditionModel(config).eval()
    model.load_state_dict(reference.state_dict())
    inputs = unet_inputs("sd1")
    torch.testing.assert_close(
        model(**inputs).detach(), reference_output(reference, inputs), atol=TOLERANCE, rtol=0
    )


@pytest.mark.parametrize("dim", [1, 2, 7, 320])
@pytest.mark.parametrize("flip,shift", [(True, 0.0), (False, 1.0)])
def test_timestep_embedding_matches_diffusers(dim, flip, shift):
    """Widths down to 1 (addition_time_embed_dim=1: only the zero padding column, where our
    frequency exponent used to divide by zero), odd widths, both orders and shifts."""
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    from fastdiff.models.embeddings import timestep_embedding

    if dim // 2 == shift:  # diffusers divides by zero too (NaN); the config refuses it
        pytest.skip("freq_shift equal to half the width")
    timesteps = torch.tensor([0.0, 1.5, 999.0])
    ours = timestep_embedding(timesteps, dim, flip_sin_to_cos=flip, freq_shift=shift)
    theirs = embeddings.get_timestep_embedding(
        timesteps, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift
    )
    assert ours.shape == (3, dim)
    # Bitwise: the same operations in the same order (a reordering differed by 3e-5 at t = 999).
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


@pytest.mark.parametrize("dim", [4, 5, 12, 256])
def test_guidance_scale_embedding_matches_diffusers(dim):
    pipelines = pytest.importorskip("diffusers")
    from fastdiff.models.embeddings import guidance_scale_embedding

    scales = torch.tensor([0.0, 1.5, 7.5])
    ours = guidance_scale_embedding(scales, dim)
    embed = pipelines.LatentConsistencyModelPipeline.get_guidance_scale_embedding
    theirs = embed(None, scales, embedding_dim=dim)
    assert ours.shape == theirs.shape == (3, dim)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="at least 4 features, got 3"):
        guidance_scale_embedding(scales, 3)  # diffusers divides by zero there


def test_timestep_cond_needs_a_unet_that_takes_it(checkpoints):
    _, folder = checkpoints.unet("sd1")
    inputs = {**unet_inputs("sd1"), "timestep_cond": torch.randn(2, 12)}
    with torch.no_grad(), pytest.raises(ValueError, match="time_cond_proj_dim is not set"):
        load_unet(folder)(**inputs)
    _, folder = checkpoints.unet("lcm")
    model = load_unet(folder)
    inputs = unet_inputs("lcm")
    with torch.no_grad():
        conditioned = model(**inputs)
        other = model(**{**inputs, "timestep_cond": inputs["timestep_cond"] + 1})
    assert (conditioned - other).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["sd1", "sdxl", "class_conditional_attention"])
def test_freeu_matches_diffusers(checkpoints, name):
    """enable_freeu: the first two up stages' backbone and skip features rescaled, as diffusers
    does; disable_freeu restores the plain output."""
    reference, folder = checkpoints.unet(name)
    inputs = unet_inputs(name)
    model = load_unet(folder)
    with torch.no_grad():
        plain = model(**inputs)
        reference.enable_freeu(s1=0.9, s2=0.2, b1=1.3, b2=1.4)
        model.enable_freeu(s1=0.9, s2=0.2, b1=1.3, b2=1.4)
        try:
            expected = reference_output(reference, inputs)
        finally:
            reference.disable_freeu()
        actual = model(**inputs)
        assert model.graph_state() != ((None,) * len(model.up_blocks))
        model.disable_freeu()
        again = model(**inputs)
    torch.testing.assert_close(actual, expected, atol=TOLERANCE, rtol=0)
    assert (actual - plain).abs().max() > 1e-3
    assert torch.equal(again, plain)
    with pytest.raises(ValueError, match="FreeU s1 must be a number"):
        model.enable_freeu("0.9", 0.2, 1.3, 1.4)
    # NaN or inf was taken, and the sampling failed later on "model output contains NaN"
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="FreeU b2 must be a finite number"):
            model.enable_freeu(0.9, 0.2, 1.3, bad)
        assert model.graph_state() == (None,) * len(model.up_blocks)  # left off
    model.enable_freeu(s1=0.9, s2=0.0, b1=1.3, b2=1.4)  # a zero factor: off, as in diffusers
    assert model.graph_state() == (None,) * len(model.up_blocks)


@pytest.mark.parametrize("shape", [(1, 2, 8, 8), (2, 3, 5, 7), (1, 1, 6, 4)])
def test_freeu_fourier_filter_matches_diffusers(shape):
    torch_utils = pytest.importorskip("diffusers.utils.torch_utils")
    from fastdiff.models.unet_blocks import fourier_filter

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    expected = torch_utils.fourier_filter(x, threshold=1, scale=0.3)
    torch.testing.assert_close(fourier_filter(x, 0.3), expected, atol=1e-6, rtol=0)
