"""Review findings in prompt and condition handling (``fastdiff.pipeline.conditioning``): inputs
that were accepted and then ignored without a word, or refused with an error that blamed
another argument."""

from __future__ import annotations

import pytest
import torch

from fastdiff.pipeline import Pipeline
from tests.pipeline.folders import make_class_folder, make_sd_folder

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

FAST = dict(num_inference_steps=1, height=16, width=16, output_type="latent", progress=False)


@pytest.fixture(scope="module")
def class_pipe(tmp_path_factory):
    return Pipeline.from_pretrained(make_class_folder(tmp_path_factory.mktemp("cls") / "pipe"))


@pytest.fixture(scope="module")
def lcm(tmp_path_factory):
    folder = make_sd_folder(tmp_path_factory.mktemp("lcm") / "pipe", lcm=True)
    return Pipeline.from_pretrained(folder)


@pytest.mark.parametrize(
    "name,value",
    [
        ("negative_prompt_embeds", torch.randn(1, 16, 32)),
        ("pooled_prompt_embeds", torch.randn(1, 32)),
        ("negative_pooled_prompt_embeds", torch.randn(1, 32)),
    ],
)
def test_a_class_conditional_model_refuses_text_embeddings(class_pipe, name, value):
    """A class-conditional model without a text encoder refused prompt, negative_prompt,
    prompt_embeds, prompt_2, negative_prompt_2 and clip_skip, but took the other embedding
    inputs and dropped them without a word."""
    with pytest.raises(ValueError, match=f"class-conditional and has no text encoder.*{name}"):
        class_pipe(class_labels=0, guidance_scale=5.0, **{name: value}, **FAST)


@pytest.mark.parametrize(
    "name,value",
    [("negative_prompt_2", "a blue dog"), ("negative_pooled_prompt_embeds", torch.randn(1, 32))],
)
def test_force_zeros_refuses_negative_inputs_it_would_zero(sdxl, name, value):
    """With force_zeros_for_empty_prompt (SDXL base) and no negative_prompt, the unconditional
    input is all zeros: a negative_prompt_2 or negative_pooled_prompt_embeds given then was
    replaced by zeros without a word. It is refused, naming the argument; with a negative
    prompt the same input is taken."""
    assert sdxl.force_zeros_for_empty_prompt
    with pytest.raises(ValueError, match=f"{name} given without negative_prompt.*force_zeros"):
        sdxl("a red cat", guidance_scale=5.0, **{name: value}, **FAST)
    negative = dict(guidance_scale=5.0, negative_prompt="", seed=0, **FAST)
    without = sdxl("a red cat", **negative)
    given = sdxl("a red cat", **negative, **{name: value})
    assert (given - without).abs().max() > 1e-5  # taken, not ignored


@pytest.mark.parametrize("shape", [(0, 16, 32), (1, 0, 32)], ids=["no-batch", "no-tokens"])
@pytest.mark.parametrize("guidance_scale", [5.0, 1.0], ids=["guided", "unguided"])
def test_empty_prompt_embeds_are_named(sd, shape, guidance_scale):
    """prompt_embeds with no prompt or no token failed later with an error that named something
    else (negative_prompt_embeds' shape, negative_prompt's count, the latents' batch) or, with
    no token and guidance off, made an image from an empty text context without a word."""
    with pytest.raises(ValueError, match=r"^prompt_embeds is empty"):
        sd(prompt_embeds=torch.zeros(shape), guidance_scale=guidance_scale, **FAST)


@pytest.mark.parametrize(
    "name,value",
    [("negative_prompt", "a blue dog"), ("negative_prompt_embeds", torch.randn(1, 16, 32))],
)
def test_an_embedded_guidance_unet_refuses_negative_inputs(lcm, name, value):
    """A guidance-distilled U-Net (time_cond_proj_dim) runs no classifier-free guidance, so it
    has no unconditional input: a negative prompt was dropped without a word (diffusers'
    LatentConsistencyModelPipeline takes no negative prompt at all; guidance_rescale is already
    refused here for the same reason)."""
    with pytest.raises(ValueError, match=f"{name}.*time_cond_proj_dim"):
        lcm("a red cat", guidance_scale=8.0, **{name: value}, **FAST)
