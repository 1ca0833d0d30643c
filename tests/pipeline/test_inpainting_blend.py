"""Inpainting with a plain (4-channel) U-Net: the kept region blended back after each step, against
diffusers' StableDiffusionInpaintPipeline and StableDiffusionXLInpaintPipeline loaded from the same
plain folders, and the inputs it refuses."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fastdiff.pipeline import Pipeline
from fastdiff.sampling import KnownRegion, NoiseSchedule, known_region_rows, make_plan
from tests.pipeline.test_inpainting import image_and_mask

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

SCHEDULERS = {
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    # diffusers' corrector starts from its own copy of the state, not the blended one: the same
    # image, since the blend and every sampler update act elementwise
    "unipc": "UniPCMultistepScheduler",
    "heun": "HeunDiscreteScheduler",  # its correction, too, starts from its own copy
    "kdpm2": "KDPM2DiscreteScheduler",  # and KDPM2's second call from the step's first state
    "kdpm2_ancestral": "KDPM2AncestralDiscreteScheduler",
    "dpmpp_3m": "DPMSolverMultistepScheduler",  # (with solver_order 3, below)
    "pndm": "PNDMScheduler",  # (with skip_prk_steps, below)
    "lms": "LMSDiscreteScheduler",
}


@pytest.fixture(scope="module")
def pipe(sd_folder):
    return Pipeline.from_pretrained(sd_folder)


@pytest.fixture(scope="module")
def reference(sd_folder):
    reference = diffusers.StableDiffusionInpaintPipeline.from_pretrained(
        sd_folder, safety_checker=None
    )
    reference.set_progress_bar_config(disable=True)
    return reference


def diffusers_images(reference, kwargs: dict, seed: int) -> torch.Tensor:
    """The reference pipeline's images for fastdiff's call arguments (its scheduler swapped for
    the sampler's for this call)."""
    kwargs = dict(kwargs)
    if "num_images" in kwargs:
        kwargs["num_images_per_prompt"] = kwargs.pop("num_images")
    scheduler = reference.scheduler
    sampler = kwargs.pop("sampler", None)
    if sampler is not None:
        cls = getattr(diffusers, SCHEDULERS[sampler])
        order = {"dpmpp_3m": {"solver_order": 3}, "pndm": {"skip_prk_steps": True}}.get(sampler, {})
        reference.scheduler = cls.from_config(scheduler.config, **order)
    try:
        generator = torch.Generator().manual_seed(seed)
        return reference(**kwargs, generator=generator, output_type="pt").images
    finally:
        reference.scheduler = scheduler


CASES = {
    "defaults": {},  # strength 1.0: from pure noise, the image only through the blending
    "strength": dict(strength=0.6),  # the image also noised to the strength's first step
    "negative-num-images": dict(negative_prompt="blue dog", num_images=2),
    "unguided": dict(guidance_scale=1.0),
    "euler": dict(sampler="euler"),  # the kept part noised in Euler's scale (x0 + sigma z)
    "euler-ancestral": dict(sampler="euler_ancestral", strength=0.7),  # step noise too
    "dpmpp-2m": dict(sampler="dpmpp_2m"),
    "dpmpp-3m": dict(sampler="dpmpp_3m"),
    "unipc": dict(sampler="unipc"),
    "heun": dict(sampler="heun", strength=0.7),  # the blend after each of the two calls
    "kdpm2": dict(sampler="kdpm2", strength=0.7),  # likewise, at the midpoint's level
    "kdpm2-ancestral": dict(sampler="kdpm2_ancestral", strength=0.7),  # and step noise
    "pndm": dict(sampler="pndm"),
    "lms": dict(sampler="lms", strength=0.8),
}


@pytest.mark.parametrize("extra", CASES.values(), ids=CASES.keys())
def test_plain_unet_inpainting_equals_diffusers(pipe, reference, extra):
    assert not pipe.is_inpainting and pipe.unet.config["in_channels"] == 4
    image, mask = image_and_mask()
    kwargs = dict(prompt="a red cat", image=image, mask_image=mask, num_inference_steps=10)
    kwargs |= dict(guidance_scale=6.0, height=16, width=16) | extra
    theirs = diffusers_images(reference, kwargs, seed=4)
    saved = pipe.schedule
    if extra.get("sampler") == "pndm":  # the folder's DDIM config, read with PLMS steps only
        pipe.schedule = dataclasses.replace(saved, skip_prk_steps=True)
    try:
        ours = pipe(**kwargs, seed=4, output_type="tensor", progress=False)
    finally:
        pipe.schedule = saved
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_the_mask_and_the_blend_matter(pipe):
    """Another mask gives another image, and the U-Net never sees the mask (4 channels in)."""
    image, mask = image_and_mask()
    channels = []
    forward = pipe.unet.forward
    pipe.unet.forward = lambda sample, *a, **k: (
        channels.append(sample.shape[1]) or forward(sample, *a, **k)
    )
    kwargs = dict(image=image, num_inference_steps=4, seed=1, output_type="tensor")
    try:
        ours = pipe("a cat", **kwargs, mask_image=mask, progress=False)
    finally:
        del pipe.unet.forward
    assert channels == [4] * 4
    shifted = torch.roll(mask, 4, dims=-1)
    other = pipe("a cat", **kwargs, mask_image=shifted, progress=False)
    assert (other - ours).abs().max() > 1e-3
    plain_img2img = pipe("a cat", **kwargs, strength=1.0, progress=False)
    assert (plain_img2img - ours).abs().max() > 1e-3


def test_the_kept_region_ends_at_the_image_latents(pipe):
    """After the last step the state is the clean sample: where the mask keeps the image the
    latents are the image's own (encoded with the same seed), exactly."""
    image, mask = image_and_mask()
    kwargs = dict(image=image, num_inference_steps=3, output_type="latent", progress=False)
    ours = pipe("a cat", **kwargs, mask_image=mask, seed=2)
    generator = torch.Generator().manual_seed(2)
    encoded = pipe.encode_image(image * 2 - 1, generator)
    kept = mask[:, :, ::2, ::2] == 0  # the mask at latent size (nearest, 16 -> 8)
    kept = kept.expand_as(ours)
    assert torch.equal(ours[kept], encoded[kept])
    assert not torch.equal(ours[~kept], encoded[~kept])


@pytest.mark.parametrize("strength", [None, 1.0, 0.5], ids=["default-0.9999", "1.0", "0.5"])
def test_sdxl_plain_unet_inpainting_equals_diffusers(sdxl_folder, strength):
    """An SDXL base folder inpaints as StableDiffusionXLInpaintPipeline loaded from it, with its
    default strength 0.9999 (the first step skipped)."""
    pipe = Pipeline.from_pretrained(sdxl_folder)
    assert pipe.defaults.inpaint_strength == 0.9999
    reference = diffusers.StableDiffusionXLInpaintPipeline.from_pretrained(sdxl_folder)
    reference.set_progress_bar_config(disable=True)
    image, mask = image_and_mask()
    kwargs = dict(prompt="a red cat", image=image, mask_image=mask, num_inference_steps=10)
    kwargs |= dict(height=16, width=16)
    if strength is not None:  # (else the defaults: strength 0.9999, guidance 7.5, not 5.0)
        kwargs |= dict(strength=strength, guidance_scale=6.0)
    theirs = diffusers_images(reference, kwargs, seed=3)
    ours = pipe(**kwargs, seed=3, output_type="tensor", progress=False)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mask_image=torch.ones(1, 1, 16, 16)), "mask_image needs image="),
        (
            dict(image="image", mask_image="mask", denoising_end=0.5),
            "denoising_end is not supported when inpainting with a plain",
        ),
        (
            dict(image="image", mask_image="mask", latents=torch.randn(1, 4, 8, 8)),
            "latents= and denoising_start are not supported",
        ),
        (
            dict(image=torch.randn(1, 4, 8, 8), mask_image="mask"),
            "needs the image's pixels",
        ),
    ],
)
def test_plain_unet_inpainting_refuses(pipe, kwargs, message):
    image, mask = image_and_mask()
    kwargs = {
        key: image if value == "image" else mask if value == "mask" else value
        for key, value in kwargs.items()
    }
    with pytest.raises(ValueError, match=message):
        pipe("a cat", **kwargs, num_inference_steps=2, progress=False)


def test_masks_that_do_not_pair_with_the_images_are_refused(pipe):
    """2 prompts x 2 images each, 2 init images and 4 masks: diffusers fails on the shapes."""
    image, _ = image_and_mask(2)
    _, masks = image_and_mask(4)
    with pytest.raises(ValueError, match="got 4 masks for 2 images"):
        pipe(["a cat", "a dog"], image=image, mask_image=masks, num_images=2, progress=False,
             num_inference_steps=1, height=16, width=16)  # fmt: skip


def test_known_region_rows_are_each_schedulers_add_noise():
    """Row i noises the image to step i + 1's level in the sampler's own scale: DDIM's VP mix at
    the next timestep, Euler's x0 + sigma z; the last row keeps the clean image."""
    schedule = NoiseSchedule(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    ddim = make_plan(schedule, "ddim", 5)
    rows = known_region_rows(ddim)
    next_levels = schedule.alphas_cumprod[ddim.timesteps[1:]]
    torch.testing.assert_close(rows[:-1, 0], next_levels.sqrt(), rtol=1e-12, atol=0)
    torch.testing.assert_close(rows[:-1, 1], (1 - next_levels).sqrt(), rtol=1e-12, atol=0)
    assert rows[-1].tolist() == [1.0, 0.0]
    euler = known_region_rows(make_plan(schedule, "euler", 5))
    reference = diffusers.EulerDiscreteScheduler.from_config(schedule.to_config())
    reference.set_timesteps(5)
    torch.testing.assert_close(euler[:-1, 0], torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(euler[:-1, 1], reference.sigmas[1:-1].double(), rtol=1e-6, atol=0)


def test_a_known_region_that_does_not_fit_is_refused():
    state = torch.zeros(2, 4, 8, 8)
    good = dict(latents=state, mask=torch.ones(1, 1, 8, 8), noise=state)
    KnownRegion(**good).check(state)
    with pytest.raises(ValueError, match=r"latents shape \(1, 4, 8, 8\) != state shape"):
        KnownRegion(**good | dict(latents=state[:1])).check(state)
    with pytest.raises(ValueError, match=r"mask shape \(2, 4, 8, 8\) must be"):
        KnownRegion(**good | dict(mask=state)).check(state)
    with pytest.raises(ValueError, match=r"mask shape \(1, 1, 4, 4\) != state size"):
        KnownRegion(**good | dict(mask=torch.ones(1, 1, 4, 4))).check(state)


def test_plain_unet_inpainting_through_the_runtime_equals_eager(sd_folder):
    """The kept region's latents, mask and noise are per-generation inputs of the graphs: two
    masks replay the same graph and equal the eager loop."""
    import fastdiff.runtime as runtime
    from tests.runtime.fake_graph import RecordingGraphBackend

    pipe = Pipeline.from_pretrained(sd_folder)
    pipe.unet.fold_conv_biases(True)  # as optimize() leaves it, so eager does the same sums
    image, mask = image_and_mask()
    other = torch.flip(mask, dims=(-1,))
    kwargs = dict(prompt="a cat", image=image, num_inference_steps=6, seed=2, progress=False)
    kwargs |= dict(strength=0.8, sampler="euler")
    wanted = [pipe(**kwargs, mask_image=m, output_type="tensor") for m in (mask, other)]
    rt = runtime.optimize(pipe, backend=RecordingGraphBackend(), verbose=False)
    for m, want in zip((mask, other), wanted, strict=True):
        got = pipe(**kwargs, mask_image=m, output_type="tensor")
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    denoise_graphs = [key for key in rt.cache.entries if key.kind in ("loop", "step")]
    assert len(denoise_graphs) == 1 and not rt.denoiser.eager_fallbacks


@pytest.mark.parametrize("sampler", ["ddim", "euler_karras"])
def test_the_sdxl_inpainting_default_strength_skips_the_first_step(sdxl_folder, sampler):
    """0.9999 of 10 steps is int(9.999) = 9: the run starts at the second timestep, noised,
    as diffusers' StableDiffusionXLInpaintPipeline does (test above: equal images)."""
    pipe = Pipeline.from_pretrained(sdxl_folder)
    calls = []
    forward = pipe.unet.forward
    pipe.unet.forward = lambda sample, t, *a, **k: (
        calls.append(float(t[0])) or forward(sample, t, *a, **k)
    )
    image, mask = image_and_mask()
    try:
        pipe(
            "a cat",
            image=image,
            mask_image=mask,
            sampler=sampler,
            num_inference_steps=10,
            guidance_scale=1.0,
            height=16,
            width=16,
            progress=False,
        )
    finally:
        del pipe.unet.forward
    timesteps = make_plan(pipe.schedule, sampler, 10).timesteps.tolist()
    assert calls == timesteps[1:]
