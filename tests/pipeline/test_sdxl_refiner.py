"""SDXL-refiner-like folders (requires_aesthetics_score: only the second text encoder, and a U-Net
conditioned on original size, crop and an aesthetic score instead of the target size) against
diffusers' StableDiffusionXLImg2ImgPipeline."""

from __future__ import annotations

import contextlib
import json
import shutil

import pytest
import torch

from fastdiff.pipeline import Pipeline
from tests.pipeline.folders import UNetCallCounter

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


@pytest.fixture(scope="module")
def base(sdxl_folder):
    return Pipeline.from_pretrained(sdxl_folder)


@pytest.fixture(scope="module")
def base_reference(sdxl_folder):
    reference = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    reference.set_progress_bar_config(disable=True)
    return reference


SPLITS = [(10, 0.8), (7, 0.65)]
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",  # no previous x0 at the hand-over: first order
    "euler_ancestral": "EulerAncestralDiscreteScheduler",  # step noise from the generator
    "tcd": "TCDScheduler",  # LCM's timesteps, cut as the others
    "heun": "HeunDiscreteScheduler",  # two rows a step: the cut-offs count rows, as diffusers
    "kdpm2": "KDPM2DiscreteScheduler",  # likewise, the midpoints' fractional timesteps too
    "kdpm2_ancestral": "KDPM2AncestralDiscreteScheduler",  # midpoint timesteps = the steps'
    "unipc": "UniPCMultistepScheduler",  # the base's last step keeps its order; the refiner
    # starts its history afresh
}


@pytest.mark.parametrize(
    "sampler, steps, split",
    [
        *((sampler, steps, split) for sampler in SCHEDULERS for steps, split in SPLITS),
        # the cutoff round(1000 - 199) = 801 is DDIM's second timestep: which side takes it
        ("ddim", 10, 0.199),
    ],
)
def test_base_then_refiner_hand_over_equals_diffusers(
    base, base_reference, pipe, reference, sampler, steps, split
):
    """denoising_end on the base returns the still noisy latents of the steps at or above the
    cutoff; denoising_start on the refiner runs the rest from them, unnoised: both as diffusers'
    StableDiffusionXLPipeline and StableDiffusionXLImg2ImgPipeline cut the steps."""
    scheduler_class = getattr(diffusers, SCHEDULERS[sampler])
    with scheduler(base_reference, scheduler_class), scheduler(reference, scheduler_class):
        hand_over(base, base_reference, pipe, reference, sampler, steps, split)


@contextlib.contextmanager
def scheduler(reference, scheduler_class):
    """The reference pipeline with another scheduler class for one test (module-scoped)."""
    original = reference.scheduler
    reference.scheduler = scheduler_class.from_config(original.config)
    try:
        yield
    finally:
        reference.scheduler = original


def hand_over(base, base_reference, pipe, reference, sampler, steps, split):
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    common = dict(prompt="a red cat", num_inference_steps=steps, guidance_scale=6.0)
    first = dict(common, latents=latents, denoising_end=split, height=16, width=16)
    ours = base(**first, sampler=sampler, seed=3, output_type="latent", progress=False)
    generator = torch.Generator().manual_seed(3)
    theirs = base_reference(**first, generator=generator, output_type="latent").images
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    second = dict(common, denoising_start=split)
    refined = pipe(**second, image=ours, sampler=sampler, seed=2, output_type="tensor")
    generator = torch.Generator().manual_seed(2)
    expected = reference(**second, image=theirs, generator=generator, output_type="pt").images
    torch.testing.assert_close(refined, expected, atol=1e-4, rtol=0)


def test_latents_as_the_img2img_image_equal_diffusers(pipe, reference):
    """Latents given as the image skip the VAE; without denoising_start they are noised to the
    strength's step like an encoded image."""
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    kwargs = dict(prompt="a red cat", image=latents, strength=0.6, num_inference_steps=10)
    ours = pipe(**kwargs, num_images=2, seed=4, output_type="tensor", progress=False)
    theirs = reference(
        **kwargs,
        num_images_per_prompt=2,
        generator=torch.Generator().manual_seed(4),
        output_type="pt",
    ).images
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(denoising_start=0.5), "denoising_start needs image="),
        (dict(image="latents", denoising_start=0.5, strength=0.3), "strength or denoising_start"),
        (dict(denoising_end=1.0), "denoising_end must be a number strictly between 0 and 1"),
        (dict(denoising_end=0), "denoising_end must be a number strictly between 0 and 1"),
        (dict(denoising_end=True), "denoising_end must be a number strictly between 0 and 1"),
        (dict(image="latents", denoising_start="0.5"), "denoising_start must be a number"),
        (
            dict(image="latents", denoising_start=0.6, denoising_end=0.5),
            "denoising_start 0.6 must be below denoising_end 0.5",
        ),
        (dict(denoising_end=0.01), "leave none of the 4 steps to run"),
        (dict(image="latents", strength=0.5, denoising_end=0.5), "at or after denoising_end"),
        (dict(image="latents", height=24), "are a 16x16 image, but height=24"),
        (dict(image="nan-latents"), "image latents contain NaN or inf"),
    ],
)
def test_bad_denoising_ranges_and_latents_are_refused(pipe, kwargs, message):
    latents = torch.randn(1, 4, 8, 8)
    if kwargs.get("image") == "latents":
        kwargs = dict(kwargs, image=latents)
    elif kwargs.get("image") == "nan-latents":
        kwargs = dict(kwargs, image=latents.clone().fill_(float("nan")))
    with pytest.raises(ValueError, match=message):
        pipe("a cat", num_inference_steps=4, progress=False, **kwargs)


@pytest.mark.parametrize("sampler", ["euler", "euler_karras"])
def test_the_cut_is_made_on_eulers_fractional_timesteps(sdxl_folder, tmp_path, sampler):
    """Euler with linspace spacing (and Karras levels) steps through fractional timesteps:
    diffusers compares those with the cutoff (499.5 < 500 at 7 steps), not rounded ones, so
    the split runs as many steps on each side as diffusers' does, and both halves equal
    diffusers' (the U-Net called at the same fractional timesteps)."""
    folder = tmp_path / "linspace"
    shutil.copytree(sdxl_folder, folder)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text()) | {"timestep_spacing": "linspace"}
    config["use_karras_sigmas"] = sampler == "euler_karras"
    config_path.write_text(json.dumps(config))
    scheduler = diffusers.EulerDiscreteScheduler.from_config(config)
    scheduler.set_timesteps(7)
    cutoff = 1000 - 0.5 * 1000
    theirs = [int((scheduler.timesteps >= cutoff).sum()), int((scheduler.timesteps < cutoff).sum())]
    base = Pipeline.from_pretrained(folder)
    counter = UNetCallCounter(base)
    kwargs = dict(num_inference_steps=7, guidance_scale=4.0, height=16, width=16)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    first_half = dict(kwargs, latents=latents, denoising_end=0.5, output_type="latent")
    ours = base("a cat", **first_half, sampler=sampler, progress=False)
    first = len(counter.batches)
    refined = base(
        "a cat", **kwargs, sampler=sampler, denoising_start=0.5, image=ours, output_type="tensor"
    )
    assert [first, len(counter.batches) - first] == theirs

    reference = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, scheduler=scheduler)
    reference.set_progress_bar_config(disable=True)
    # diffusers starts linspace Euler at sigma_max * latents, fastdiff at sqrt(sigma_max^2 + 1)
    # times them (README: Euler's start scale): the same start state.
    sigma_max = float(scheduler.sigmas.max())
    first_half["latents"] = latents * (sigma_max**2 + 1) ** 0.5 / sigma_max
    expected = reference("a cat", **first_half).images
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
    img2img = diffusers.StableDiffusionXLImg2ImgPipeline(**reference.components)
    img2img.set_progress_bar_config(disable=True)
    expected = img2img(
        "a cat", **kwargs, denoising_start=0.5, image=expected, output_type="pt"
    ).images
    torch.testing.assert_close(refined, expected, atol=1e-4, rtol=0)
