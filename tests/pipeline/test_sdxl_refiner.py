"""SDXL-refiner-like folders (requires_aesthetics_score: only the second text encoder, and a U-Net
conditioned on original size, crop and an aesthetic score instead of the target size) against
diffusers' StableDiffusionXLImg2ImgPipeline."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fastdiff.pipeline import Pipeline

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pipe(sdxl_refiner_folder):
    return Pipeline.from_pretrained(sdxl_refiner_folder)


@pytest.fixture(scope="module")
def reference(sdxl_refiner_folder):
    reference = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(sdxl_refiner_folder)
    reference.set_progress_bar_config(disable=True)
    return reference


CASES = {
    "defaults": {},  # scores 6.0 and 2.5, "" encoded as the negative prompt, strength 0.3
    "scores-sizes-negative": dict(
        aesthetic_score=3.0,
        negative_aesthetic_score=1.0,
        negative_prompt="blue dog",
        original_size=(32, 24),
        crops_coords_top_left=(2, 4),
    ),
    "negative-sizes": dict(negative_original_size=(8, 8), negative_crops_coords_top_left=(1, 1)),
    "unguided": dict(guidance_scale=1.0, aesthetic_score=9.0),
    "strength": dict(strength=0.7, num_images=2),
}


@pytest.mark.parametrize("extra", CASES.values(), ids=CASES.keys())
def test_refiner_img2img_equals_diffusers(pipe, reference, extra):
    assert pipe.requires_aesthetics_score and len(pipe.prompt_encoder.encoders) == 1
    assert not pipe.force_zeros_for_empty_prompt and pipe.defaults.strength == 0.3
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    kwargs = dict(prompt="a red cat", image=image, num_inference_steps=10, guidance_scale=6.0)
    kwargs |= extra
    theirs_kwargs = dict(kwargs)
    if "num_images" in theirs_kwargs:
        theirs_kwargs["num_images_per_prompt"] = theirs_kwargs.pop("num_images")
    ours = pipe(**kwargs, seed=4, output_type="tensor", progress=False)
    theirs = reference(
        **theirs_kwargs, generator=torch.Generator().manual_seed(4), output_type="pt"
    ).images
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_the_aesthetic_score_changes_the_image(pipe):
    kwargs = dict(prompt="a red cat", num_inference_steps=3, seed=1, output_type="tensor")
    kwargs |= dict(height=16, width=16, progress=False)  # text-to-image from noise works too
    default = pipe(**kwargs)
    torch.testing.assert_close(pipe(**kwargs, aesthetic_score=6.0), default)
    assert (pipe(**kwargs, aesthetic_score=1.0) - default).abs().max() > 1e-3
    assert (pipe(**kwargs, negative_aesthetic_score=9.0) - default).abs().max() > 1e-3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(target_size=(16, 16)), "target_size: an SDXL refiner"),
        (dict(negative_target_size=(8, 8)), "negative_target_size: an SDXL refiner"),
        (dict(aesthetic_score=float("nan")), "aesthetic_score must be a finite number"),
        (dict(negative_aesthetic_score=True), "negative_aesthetic_score must be a finite"),
        (dict(aesthetic_score="6"), "aesthetic_score must be a finite number"),
        (dict(prompt_2="a dog"), "prompt_2 is what a second text encoder"),
    ],
)
def test_refiner_refuses_what_it_would_ignore(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe("a cat", height=16, width=16, num_inference_steps=1, progress=False, **kwargs)


def test_scores_are_refused_without_a_refiner(sdxl_folder):
    base = Pipeline.from_pretrained(sdxl_folder)
    assert not base.requires_aesthetics_score
    for name in ("aesthetic_score", "negative_aesthetic_score"):
        with pytest.raises(ValueError, match=f"{name}: aesthetic-score conditioning is for SDXL"):
            base("a cat", num_inference_steps=1, progress=False, **{name: 5.0})


def with_index(folder, tmp_path, **changes):
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    index = json.loads((copy / "model_index.json").read_text())
    (copy / "model_index.json").write_text(json.dumps({**index, **changes}))
    return copy


def test_a_flag_that_does_not_match_the_unet_is_named(sdxl_refiner_folder, sdxl_folder, tmp_path):
    """A refiner U-Net without the flag, or a base U-Net with it: the added-condition widths do
    not add up, and the error says which setting would make them, at load (the text encoder
    gives the pooled width) or at the call (embeddings given, no encoder)."""
    unflagged = with_index(sdxl_refiner_folder, tmp_path / "a", requires_aesthetics_score=False)
    with pytest.raises(ValueError, match="aesthetic score.*is false: set it to true"):
        Pipeline.from_pretrained(unflagged)
    flagged = with_index(sdxl_folder, tmp_path / "b", requires_aesthetics_score=True)
    with pytest.raises(ValueError, match="the sizes.*is true: set it to false"):
        Pipeline.from_pretrained(flagged)
    refiner = Pipeline.from_pretrained(sdxl_refiner_folder)
    unet = refiner.unet
    embeddings = Pipeline(unet, refiner.vae, refiner.schedule)  # no encoder, flag left false
    kwargs = dict(prompt_embeds=torch.randn(1, 16, 32), pooled_prompt_embeds=torch.randn(1, 32))
    with pytest.raises(ValueError, match="5 with requires_aesthetics_score"):
        embeddings(**kwargs, guidance_scale=1.0, num_inference_steps=1, progress=False)


def test_bad_flags_are_refused_at_load(sd_folder, tmp_path):
    with pytest.raises(ValueError, match="requires_aesthetics_score must be true or false"):
        Pipeline.from_pretrained(with_index(sd_folder, tmp_path / "a", requires_aesthetics_score=1))
    with pytest.raises(ValueError, match="has no addition_embed_type 'text_time'"):
        Pipeline.from_pretrained(
            with_index(sd_folder, tmp_path / "b", requires_aesthetics_score=True)
        )
