"""diffusers' prompt options on fastdiff's pipeline, against diffusers on the same tiny folders:
clip_skip (SD and SDXL), SDXL's prompt_2 / negative_prompt_2 for the second text encoder, and
SDXL's size micro-conditioning (original_size, crops_coords_top_left, target_size, negative_*)."""

from __future__ import annotations

import pytest
import torch

from fastdiff.pipeline import Pipeline
from tests.pipeline.folders import make_sd_folder, make_sdxl_folder

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")


def pair(folder, reference_class):
    reference = reference_class.from_pretrained(folder)
    reference.set_progress_bar_config(disable=True)
    return Pipeline.from_pretrained(folder), reference


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    folder = make_sd_folder(tmp_path_factory.mktemp("sd") / "pipe")
    return pair(folder, diffusers.StableDiffusionPipeline)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    folder = make_sdxl_folder(tmp_path_factory.mktemp("sdxl") / "pipe")
    return pair(folder, diffusers.StableDiffusionXLPipeline)


def images(pipes, **kwargs):
    ours, theirs = pipes
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    common = dict(latents=latents, height=16, width=16, num_inference_steps=3, **kwargs)
    ours_image = ours(**common, output_type="tensor", progress=False)
    theirs_image = theirs(**common, output_type="pt").images
    return ours_image, theirs_image


def assert_equals_diffusers_and_differs(pipes, changed: dict, base: dict):
    """Equal to diffusers with the option, and different from the call without it (so the
    option was not ignored on both sides)."""
    ours, theirs = images(pipes, **base, **changed)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    without, _ = images(pipes, **base)
    assert (ours - without).abs().max() > 1e-4


@torch.no_grad()
def clip_skip_embeds(reference, prompt: str, clip_skip: int) -> torch.Tensor:
    """What diffusers' StableDiffusionPipeline.encode_prompt computes for clip_skip: the hidden
    state ``clip_skip`` layers before the last, through the final LayerNorm. (Its own call fails
    under transformers 5, which flattened CLIPTextModel's ``text_model``.)"""
    tokenizer, encoder = reference.tokenizer, reference.text_encoder
    ids = tokenizer(
        prompt,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    hidden = encoder(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
    return getattr(encoder, "text_model", encoder).final_layer_norm(hidden)


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_clip_skip_sd(sd, clip_skip):
    """The prompt's embeddings skip layers; the negative prompt's do not (as in diffusers)."""
    pipe, reference = sd
    prompt, base = "a photo of a red cat", dict(negative_prompt="blue", guidance_scale=5.0)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    common = dict(latents=latents, height=16, width=16, num_inference_steps=3, **base)
    ours = pipe(prompt, clip_skip=clip_skip, **common, output_type="tensor", progress=False)
    embeds = clip_skip_embeds(reference, prompt, clip_skip)
    theirs = reference(prompt_embeds=embeds, **common, output_type="pt").images
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    without = pipe(prompt, **common, output_type="tensor", progress=False)
    assert (ours - without).abs().max() > 1e-4


def test_clip_skip_zero_is_the_default(sd, sdxl):
    common = dict(num_inference_steps=2, seed=0, output_type="tensor", progress=False)
    for pipe, _ in (sd, sdxl):
        with_zero = pipe("a red cat", clip_skip=0, **common)
        torch.testing.assert_close(with_zero, pipe("a red cat", **common), atol=1e-6, rtol=0)


def test_clip_skip_sdxl(sdxl):
    base = dict(prompt="a photo of a red cat", negative_prompt="blue", guidance_scale=5.0)
    assert_equals_diffusers_and_differs(sdxl, {"clip_skip": 1}, base)


@pytest.mark.parametrize(
    "changed",
    [{"prompt_2": "a green square"}, {"negative_prompt_2": "a green square"}],
    ids=["prompt_2", "negative_prompt_2"],
)
def test_second_encoder_prompts_sdxl(sdxl, changed):
    base = dict(prompt="a photo of a red cat", negative_prompt="blue", guidance_scale=5.0)
    assert_equals_diffusers_and_differs(sdxl, changed, base)


def test_second_encoder_prompt_lists_sdxl(sdxl):
    ours, theirs = sdxl
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    common = dict(
        prompt=["a photo of a red cat", "a dog"],
        negative_prompt=["blue", "green"],
        prompt_2=["a green square", "a dog on grass"],
        negative_prompt_2=["red", "blue"],
        latents=latents,
        height=16,
        width=16,
        num_inference_steps=3,
        guidance_scale=5.0,
    )
    torch.testing.assert_close(
        ours(**common, output_type="tensor", progress=False),
        theirs(**common, output_type="pt").images,
        atol=1e-4,
        rtol=0,
    )


@pytest.mark.parametrize(
    "changed",
    [
        {"original_size": (64, 48)},
        {"crops_coords_top_left": (4, 8)},
        {"target_size": (32, 32)},
        {"negative_original_size": (8, 8), "negative_target_size": (24, 16)},
        {
            "negative_original_size": (8, 8),
            "negative_crops_coords_top_left": (2, 0),
            "negative_target_size": (16, 16),
        },
    ],
    ids=["original", "crops", "target", "negative", "negative-crops"],
)
def test_size_micro_conditioning_sdxl(sdxl, changed):
    base = dict(prompt="a photo of a red cat", negative_prompt="blue", guidance_scale=5.0)
    assert_equals_diffusers_and_differs(sdxl, changed, base)


@pytest.mark.parametrize(
    "which, kwargs, error, message",
    [
        ("sd", {"prompt_2": "x"}, ValueError, "prompt_2 is what a second text encoder"),
        ("sd", {"negative_prompt_2": "x"}, ValueError, "negative_prompt_2 is what a second"),
        ("sd", {"clip_skip": 3}, ValueError, r"clip_skip must be an int in \[0, 2\]"),
        ("sdxl", {"clip_skip": 2}, ValueError, r"clip_skip must be an int in \[0, 1\]"),
        ("sd", {"clip_skip": True}, ValueError, "clip_skip must be an int"),
        ("sd", {"original_size": (8, 8)}, ValueError, "original_size: size micro-conditioning"),
        ("sdxl", {"original_size": (8,)}, ValueError, r"original_size must be a \(height, width"),
        ("sdxl", {"target_size": (0, 8)}, ValueError, r"target_size must be .* ints >= 1"),
        ("sdxl", {"negative_original_size": (8, 8)}, ValueError, "needs both negative_original"),
        ("sdxl", {"prompt_2": ["a", "b", "c"]}, ValueError, "prompt_2 has 3 entries but there"),
        ("sdxl", {"orignal_size": (8, 8)}, TypeError, "orignal_size"),
    ],
)
def test_bad_text_options_are_named(sd, sdxl, which, kwargs, error, message):
    pipe = (sd if which == "sd" else sdxl)[0]
    with pytest.raises(error, match=message):
        pipe("a red cat", num_inference_steps=1, output_type="latent", progress=False, **kwargs)


def test_text_options_need_a_prompt(sdxl):
    pipe = sdxl[0]
    embeds = torch.zeros(1, 8, 64)
    pooled = torch.zeros(1, 32)
    common = dict(
        prompt_embeds=embeds,
        pooled_prompt_embeds=pooled,
        num_inference_steps=1,
        guidance_scale=1.0,
        output_type="latent",
        progress=False,
    )
    with pytest.raises(ValueError, match="clip_skip acts on the text encoder"):
        pipe(**common, clip_skip=1)
    with pytest.raises(ValueError, match="pass prompt_2 with prompt"):
        pipe(**common, prompt_2="x")
    guided = dict(common, guidance_scale=5.0, negative_prompt_embeds=embeds)
    guided["negative_pooled_prompt_embeds"] = pooled
    with pytest.raises(ValueError, match="negative_prompt_2 or negative_prompt_embeds, not both"):
        pipe(**guided, negative_prompt_2="x")


def test_a_long_prompt_2_warns_with_its_dropped_words(sdxl):
    """prompt_2 is truncated by the second tokenizer like the prompt by the first: the dropped
    words are named for each."""
    pipe = sdxl[0]
    limit = pipe.prompt_encoder.encoders[1][0].model_max_length
    long = " ".join(["cat"] * limit + ["zebra"])
    with pytest.warns(UserWarning, match=r"dropped: '.*zebra'"):
        pipe("a cat", prompt_2=long, num_inference_steps=1, output_type="latent", progress=False)


def test_options_through_the_optimized_runtime(tmp_path):
    """The size ids and the clip_skip embeddings are inputs of the captured graphs (copied into
    their static buffers per call): under graph-faithful replays each call equals the eager
    pipeline, also when only the options change between calls."""
    import fastdiff.runtime as runtime
    from tests.runtime.fake_graph import RecordingGraphBackend

    folder = make_sdxl_folder(tmp_path / "sdxl")
    eager, optimized = Pipeline.from_pretrained(folder), Pipeline.from_pretrained(folder)
    runtime.optimize(optimized, backend=RecordingGraphBackend(), verbose=False)
    eager.unet.fold_conv_biases(True)  # optimize()'s folds: the same fp32 arithmetic
    common = dict(prompt="a red cat", num_inference_steps=3, seed=0, output_type="latent")
    for options in (
        {},
        {"original_size": (64, 48), "crops_coords_top_left": (4, 8)},
        {"clip_skip": 1, "negative_original_size": (8, 8), "negative_target_size": (16, 16)},
    ):
        want = eager(**common, **options, progress=False)
        got = optimized(**common, **options, progress=False)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
