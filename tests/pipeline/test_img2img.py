"""img2img (SDEdit through the forward process) against diffusers' StableDiffusionImg2ImgPipeline,
for a single-step sampler (DDIM), a sigma-scale one (Euler) and a multistep solver (DPM-Solver++
2M, whose first step after a mid-schedule start must be first order; with Karras noise levels the
image is noised to the Karras level of that step, not to alphā at its rounded timestep)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff.pipeline import Pipeline
from fastdiff.pipeline.denoising import img2img_start_step
from tests.pipeline.folders import UNetCallCounter

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

# sampler -> (diffusers scheduler class, config overrides)
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),  # the step noise from the seed
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpmpp_2m_sde_karras": (
        "DPMSolverMultistepScheduler",
        {"use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++"},
    ),
    "lcm": ("LCMScheduler", {}),  # fresh noise after each step, the last one excepted
    "unipc": ("UniPCMultistepScheduler", {}),  # no corrector at the first step run
    "dpmpp_3m": ("DPMSolverMultistepScheduler", {"solver_order": 3}),  # second order second
    "heun": ("HeunDiscreteScheduler", {}),  # two rows a step: starts at row 2 x start step
    "kdpm2": ("KDPM2DiscreteScheduler", {}),  # the same, its second row at the midpoint
    "kdpm2_ancestral": ("KDPM2AncestralDiscreteScheduler", {}),  # step noise from the seed
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),  # its calls from the start step on
    "lms": ("LMSDiscreteScheduler", {}),  # the whole run's order, the derivatives since
}


@pytest.fixture(scope="module")
def pipe(sd_folder):
    return Pipeline.from_pretrained(sd_folder)


@pytest.fixture(scope="module")
def init_image():
    ramp = np.broadcast_to(np.linspace(0, 255, 16)[:, None], (16, 16))
    array = np.stack([ramp, ramp.T, 255 - ramp], axis=-1)
    return Image.fromarray(array.astype(np.uint8))


@pytest.mark.parametrize("sampler", sorted(SCHEDULERS))
def test_img2img_equals_diffusers(sd_folder, pipe, init_image, sampler):
    reference = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(
        sd_folder, safety_checker=None
    )
    class_name, overrides = SCHEDULERS[sampler]
    scheduler_class = getattr(diffusers, class_name)
    reference.scheduler = scheduler_class.from_config(reference.scheduler.config, **overrides)
    reference.set_progress_bar_config(disable=True)
    kwargs = dict(
        prompt="a photo of a cat", num_inference_steps=5, strength=0.6, guidance_scale=4.0
    )
    saved = pipe.schedule
    if sampler == "pndm":  # the folder's DDIM config, read with PLMS steps only (as overridden)
        pipe.schedule = dataclasses.replace(saved, skip_prk_steps=True)
    try:
        ours = pipe(
            **kwargs,
            image=init_image,
            sampler=sampler,
            seed=7,
            output_type="tensor",
            progress=False,
        )
    finally:
        pipe.schedule = saved
    theirs = reference(
        **kwargs, image=init_image, output_type="pt", generator=torch.Generator().manual_seed(7)
    ).images
    assert ours.shape == (1, 3, 16, 16)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("strength,expected_steps", [(1.0, 5), (0.6, 3), (0.2, 1)])
def test_strength_sets_the_number_of_steps(pipe, init_image, strength, expected_steps):
    assert img2img_start_step(5, strength) == 5 - expected_steps
    counter = UNetCallCounter(pipe)
    try:
        images = pipe(
            ["a cat", "a dog"],
            image=[init_image, init_image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)],
            strength=strength,
            num_images=1,
            num_inference_steps=5,
            seed=0,
            output_type="tensor",
            progress=False,
        )
    finally:
        pipe.unet.forward = counter.original
    assert images.shape == (2, 3, 16, 16)
    assert counter.batches == [4] * expected_steps  # [uncond; cond] for 2 images


def test_lower_strength_stays_closer_to_the_init_image(pipe, init_image):
    """At strength s only the last s fraction of the schedule runs, so the init latents keep
    more weight: x_t = sqrt(alpha_bar) x0 + ... with alpha_bar near 1 for small s."""
    init = pipe.encode_image(
        torch.from_numpy(np.array(init_image)).permute(2, 0, 1)[None].float() / 127.5 - 1, None
    )
    distances = []
    for strength in (0.2, 1.0):
        latents = pipe(
            prompt="a cat",
            image=init_image,
            strength=strength,
            num_inference_steps=10,
            guidance_scale=1.0,
            seed=0,
            output_type="latent",
            progress=False,
        )
        distances.append(float((latents - init).pow(2).mean()))
    assert distances[0] < 0.5 * distances[1]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(strength=0.0), r"strength must lie in \(0, 1\]"),
        (dict(strength=1.5), r"strength must lie in \(0, 1\]"),
        # A string passed float() and then repeated itself: "invalid literal ... '0.50.50.50.5'".
        (dict(strength="0.5"), r"strength must be a number in \(0, 1\], got '0.5'"),
        (dict(strength=[0.5]), "strength must be a number"),  # (None: the pipeline's default)
        (dict(strength=0.1, num_inference_steps=5), "leaves no step to run"),
        (dict(latents=torch.zeros(1, 4, 8, 8)), "image .img2img. or latents, not both"),
        # the size read from the image: named as the image's, not as height=/width= arguments
        (dict(image=Image.new("RGB", (15, 16))), r"the init image is 15x16 \(width x height\)"),
        (dict(image=[Image.new("RGB", (16, 16))] * 3), "got 3 init images for 1 prompts"),
        (dict(image=np.zeros((16, 16, 4), np.uint8)), r"shape \(H, W, 3\) or \(B, H, W, 3\)"),
        (dict(image=np.zeros((16, 16, 3), np.int64)), "must be uint8 or float, got int64"),
        (dict(image=np.full((16, 16, 3), 2.0)), r"values must lie in \[0, 1\]"),
        (dict(image=[np.zeros((16, 16, 3)), np.zeros((8, 8, 3))]), "one shape and dtype"),
    ],
)
def test_img2img_bad_inputs(pipe, init_image, kwargs, message):
    kwargs = {"image": init_image, "num_inference_steps": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        pipe("a cat", progress=False, **kwargs)


def test_numpy_init_images_equal_diffusers_and_pil(sd_folder, pipe, init_image):
    """numpy init images as diffusers takes them (float HWC in [0, 1]); uint8 arrays (what
    np.asarray(pil_image) gives) read as 0 to 255, i.e. as the PIL image itself."""
    reference = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(
        sd_folder, safety_checker=None
    )
    reference.set_progress_bar_config(disable=True)
    array = np.asarray(init_image).astype(np.float32) / 255.0
    kwargs = dict(prompt="a photo of a cat", num_inference_steps=4, strength=0.7)
    theirs = reference(
        **kwargs, image=array, output_type="pt", generator=torch.Generator().manual_seed(2)
    ).images
    ours = pipe(**kwargs, image=array, seed=2, output_type="tensor", progress=False)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    as_uint8 = pipe(
        **kwargs, image=np.asarray(init_image), seed=2, output_type="tensor", progress=False
    )
    as_pil = pipe(**kwargs, image=init_image, seed=2, output_type="tensor", progress=False)
    torch.testing.assert_close(as_uint8, as_pil, atol=1e-5, rtol=0)  # (/255 rounding)
    batched = pipe(
        ["a cat", "a dog"], image=[array, array[::-1].copy()], num_inference_steps=2, seed=2,
        output_type="tensor", progress=False,
    )  # fmt: skip
    assert batched.shape == (2, 3, 16, 16)
    as_batches = pipe(  # a list of (1, H, W, 3) batches is concatenated, as diffusers does
        ["a cat", "a dog"], image=[array[None], array[::-1].copy()[None]], num_inference_steps=2,
        seed=2, output_type="tensor", progress=False,
    )  # fmt: skip
    torch.testing.assert_close(as_batches, batched, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 1.0)])
def test_cpu_generator_drives_stochastic_samplers_on_cuda(sd_folder, init_image, sampler, eta):
    """A CPU generator (diffusers' reproducibility idiom) with CUDA latents: the eager loop draws
    the step noise on the generator's device, for text-to-image and for img2img alike."""
    pipe = Pipeline.from_pretrained(sd_folder, device="cuda")
    for image in (None, init_image):
        outputs = [
            pipe(
                prompt="a red cat",
                image=image,
                num_inference_steps=4,
                sampler=sampler,
                eta=eta,
                generator=torch.Generator().manual_seed(seed),
                output_type="latent",
                progress=False,
            )
            for seed in (0, 0, 1)
        ]
        assert outputs[0].device.type == "cuda"
        torch.testing.assert_close(outputs[0], outputs[1], atol=0, rtol=0)
        assert not torch.equal(outputs[0], outputs[2])


@pytest.mark.parametrize(
    "strength", [np.float32(0.6), torch.tensor(0.6), torch.tensor(0.6).double()]
)
def test_strength_accepts_numpy_scalars_and_0d_tensors(strength):
    # 0-d tensors worked before strength was type-checked (guidance_scale still accepts them).
    assert img2img_start_step(5, strength) == 2


def test_a_resized_init_image_equals_diffusers(sd_folder, pipe, init_image):
    """Init images of several sizes are resized to the first one's with Lanczos, as diffusers'
    VaeImageProcessor does."""
    reference = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(
        sd_folder, safety_checker=None
    )
    reference.set_progress_bar_config(disable=True)
    larger = init_image.resize((40, 24), resample=Image.Resampling.NEAREST)
    larger = larger.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    kwargs = dict(prompt=["a cat", "a dog"], num_inference_steps=3, strength=1.0)
    images = [init_image, larger]
    ours = pipe(**kwargs, image=images, seed=2, output_type="tensor", progress=False)
    theirs = reference(
        **kwargs, image=images, output_type="pt", generator=torch.Generator().manual_seed(2)
    ).images
    assert ours.shape == (2, 3, 16, 16)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_each_prompts_image_and_copies_stay_together():
    """Init latents for two prompts with num_images=2 are ordered [image 0, image 0, image 1,
    image 1], as the prompts' copies are (diffusers' num_images_per_prompt order)."""
    from fastdiff.pipeline.images import match_batch

    latents = torch.stack([torch.full((4, 2, 2), 0.0), torch.full((4, 2, 2), 1.0)])
    paired = match_batch(latents, prompts=2, num_images=2)
    assert paired[:, 0, 0, 0].tolist() == [0.0, 0.0, 1.0, 1.0]
    shared = match_batch(latents[:1], prompts=3, num_images=2)
    assert shared.shape[0] == 6 and shared.is_contiguous()
    with pytest.raises(ValueError, match="got 2 init images for 3 prompts"):
        match_batch(latents, prompts=3, num_images=1)


def test_an_image_per_prompt_with_several_images_each(pipe, init_image):
    """Two prompts, an image each, two images per prompt: four outputs, from the right images
    (match_batch's order is tested above; here the pipeline hands it the prompt count)."""
    other = Image.new("RGB", init_image.size, (0, 0, 0))
    out = pipe(["a cat", "a dog"], image=[init_image, other], num_images=2, num_inference_steps=2,
               strength=0.5, seed=0, output_type="latent", progress=False)  # fmt: skip
    assert out.shape[0] == 4
