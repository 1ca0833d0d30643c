"""Argument combinations of a Pipeline call against diffusers' pipelines on the same tiny folders:
text inputs given both as text and as embeddings, and SDXL's second-encoder prompts left empty."""

from __future__ import annotations

import pytest
import torch

from fastdiff.pipeline import Pipeline

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def sdxl(sdxl_folder):
    reference = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    reference.set_progress_bar_config(disable=True)
    return Pipeline.from_pretrained(sdxl_folder), reference


def assert_equals_diffusers(pair, kwargs: dict) -> None:
    ours, theirs = pair
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    common = dict(kwargs, latents=latents, num_inference_steps=3, guidance_scale=5.0)
    got = ours(**common, output_type="tensor", progress=False)
    want = theirs(**common, output_type="pt").images
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def pooled(seed: int) -> torch.Tensor:
    return torch.randn(1, 32, generator=torch.Generator().manual_seed(seed))


CASES = {
    # diffusers encodes the prompt's tokens but keeps the pooled embedding it is given (prompt
    # weighting tools pass one); it used to be replaced by the encoded one without a word.
    "pooled": dict(pooled_prompt_embeds=pooled(0)),
    "negative-pooled": dict(negative_prompt="blue", negative_pooled_prompt_embeds=pooled(1)),
    # diffusers reads an empty second prompt as none given (prompt_2 or prompt): the second
    # encoder reads the prompt, not "", as when prompt_2 is left out.
    "empty-prompt_2": dict(prompt_2=""),
    "empty-negative_prompt_2": dict(negative_prompt="blue", negative_prompt_2=""),
}


@pytest.mark.parametrize("extra", CASES.values(), ids=CASES.keys())
def test_sdxl_text_inputs_given_two_ways_equal_diffusers(sdxl, extra):
    assert_equals_diffusers(sdxl, dict(prompt="a red cat") | extra)


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0], ids=["guided", "unguided"])
def test_a_negative_prompt_and_its_embeddings_together_are_refused(sd_folder, guidance_scale):
    """As prompt with prompt_embeds (and as diffusers refuses both): one of the two would be
    ignored. The negative prompt used to be dropped silently."""
    pipe = Pipeline.from_pretrained(sd_folder)
    with pytest.raises(ValueError, match="negative_prompt or negative_prompt_embeds, not both"):
        pipe(
            "a cat",
            negative_prompt="a dog",
            negative_prompt_embeds=torch.randn(1, 16, 32),
            guidance_scale=guidance_scale,
            num_inference_steps=1,
            progress=False,
        )
