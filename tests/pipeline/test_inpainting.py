"""Inpainting U-Nets (9 input channels: latents, mask, masked-image latents) against diffusers'
StableDiffusionInpaintPipeline, and the inputs inpainting refuses."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff.pipeline import Pipeline
from fastdiff.pipeline.inpainting import INPAINT_KEY, mask_to_tensor

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pipe(sd_inpaint_folder):
    return Pipeline.from_pretrained(sd_inpaint_folder)


@pytest.fixture(scope="module")
def reference(sd_inpaint_folder):
    reference = diffusers.StableDiffusionInpaintPipeline.from_pretrained(sd_inpaint_folder)
    reference.set_progress_bar_config(disable=True)
    return reference


def image_and_mask(batch: int = 1):
    image = torch.rand(batch, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(batch, 1, 16, 16)
    mask[..., 4:12, 2:10] = 1.0
    return image, mask


CASES = {
    "defaults": {},  # strength 1.0: from pure noise, the image only through the masked latents
    "strength": dict(strength=0.6),  # the image encoded, noised to the strength's step
    "negative-num-images": dict(negative_prompt="blue dog", num_images=2),
    "unguided": dict(guidance_scale=1.0),
    "euler": dict(sampler="euler"),
}


@pytest.mark.parametrize("extra", CASES.values(), ids=CASES.keys())
def test_inpainting_equals_diffusers(pipe, reference, extra):
    assert pipe.is_inpainting and pipe.defaults.inpaint_strength == 1.0
    image, mask = image_and_mask()
    kwargs = dict(prompt="a red cat", image=image, mask_image=mask, num_inference_steps=10)
    kwargs |= dict(guidance_scale=6.0, height=16, width=16) | extra
    theirs_kwargs = dict(kwargs)
    if "num_images" in theirs_kwargs:
        theirs_kwargs["num_images_per_prompt"] = theirs_kwargs.pop("num_images")
    scheduler = reference.scheduler
    if theirs_kwargs.pop("sampler", None) == "euler":
        reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(scheduler.config)
    try:
        generator = torch.Generator().manual_seed(4)
        theirs = reference(**theirs_kwargs, generator=generator, output_type="pt").images
    finally:
        reference.scheduler = scheduler
    ours = pipe(**kwargs, seed=4, output_type="tensor", progress=False)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("strength", [None, 1.0, 0.5], ids=["default-0.9999", "1.0", "0.5"])
def test_sdxl_inpainting_equals_diffusers(tmp_path_factory, strength):
    """An SDXL inpainting folder: the same U-Net inputs beside SDXL's added conditions, and
    StableDiffusionXLInpaintPipeline's default strength 0.9999 (the first step skipped)."""
    from tests.pipeline.folders import make_sdxl_folder

    folder = make_sdxl_folder(tmp_path_factory.mktemp("sdxl-inpaint") / "pipe", inpainting=True)
    pipe = Pipeline.from_pretrained(folder)
    assert pipe.defaults.inpaint_strength == 0.9999 and pipe.defaults.guidance_scale == 7.5
    reference = diffusers.StableDiffusionXLInpaintPipeline.from_pretrained(folder)
    reference.set_progress_bar_config(disable=True)
    image, mask = image_and_mask()
    kwargs = dict(prompt="a red cat", image=image, mask_image=mask, num_inference_steps=10)
    kwargs |= dict(guidance_scale=6.0, height=16, width=16)
    if strength is not None:
        kwargs["strength"] = strength
    ours = pipe(**kwargs, seed=4, output_type="tensor", progress=False)
    generator = torch.Generator().manual_seed(4)
    theirs = reference(**kwargs, generator=generator, output_type="pt").images
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_pil_image_and_mask_take_the_default_size_as_in_diffusers(pipe, reference):
    """PIL inputs of another size are resized to the folder's default size (16x16 here), the
    mask with Lanczos then made grayscale and binarized, as diffusers' mask processor does."""
    rng = np.random.RandomState(0)
    image = Image.fromarray((rng.rand(20, 24, 3) * 255).astype(np.uint8))
    mask = Image.fromarray(((rng.rand(20, 24) > 0.5) * 255).astype(np.uint8)).convert("RGB")
    kwargs = dict(prompt="a red cat", image=image, mask_image=mask, num_inference_steps=5)
    ours = pipe(**kwargs, seed=4, output_type="tensor", progress=False)
    generator = torch.Generator().manual_seed(4)
    theirs = reference(**kwargs, generator=generator, output_type="pt").images
    assert ours.shape == (1, 3, 16, 16)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_the_mask_decides_what_changes(pipe):
    """The masked latents carry the kept region: another image in the masked-off part changes
    the result, a mask covering everything makes the image irrelevant."""
    image, mask = image_and_mask()
    kwargs = dict(num_inference_steps=4, seed=1, output_type="tensor", progress=False)
    base = pipe("a cat", image=image, mask_image=mask, **kwargs)
    other = image.clone()
    other[..., :4, :] = 1.0 - other[..., :4, :]  # rows the mask keeps
    assert (pipe("a cat", image=other, mask_image=mask, **kwargs) - base).abs().max() > 1e-4
    full = torch.ones_like(mask)
    torch.testing.assert_close(
        pipe("a cat", image=image, mask_image=full, **kwargs),
        pipe("a cat", image=other, mask_image=full, **kwargs),
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(image=None), "pass image= and mask_image="),
        (dict(mask_image=None), "pass image= and mask_image="),
        (dict(latents=torch.randn(1, 4, 2, 2)), "latents= and denoising_start are not supported"),
        (dict(image=torch.randn(1, 4, 2, 2)), "needs the image's pixels"),
        (dict(mask_image=torch.zeros(1, 1, 8, 8)), "mask is 8x8 but the image is 16x16"),
        (dict(mask_image=torch.full((16, 16), 2.0)), r"mask values must lie in \[0, 1\]"),
        (dict(mask_image=torch.zeros(1, 3, 16, 16)), r"mask must have shape \(H, W\)"),
        (dict(mask_image="mask.png"), "mask_image must be a PIL image"),
        (
            dict(image=torch.rand(2, 3, 16, 16), mask_image=torch.zeros(3, 1, 16, 16)),
            "got 3 masks for 2 images",
        ),
    ],
)
def test_bad_inpainting_inputs_are_refused(pipe, kwargs, message):
    image, mask = image_and_mask()
    arguments = dict(image=image, mask_image=mask) | kwargs
    with pytest.raises(ValueError, match=message):
        pipe("a cat", num_inference_steps=2, progress=False, **arguments)


def test_a_mask_needs_a_unet_that_inpaints(sd_folder, monkeypatch):
    """A mask needs an inpainting U-Net (9 channels in) or a plain one (4, blended: see
    test_inpainting_blend.py); another width is named."""
    plain = Pipeline.from_pretrained(sd_folder)
    image, mask = image_and_mask()
    wider = dataclasses.replace(plain.unet.config, in_channels=8)
    monkeypatch.setattr(plain.unet, "config", wider)
    with pytest.raises(ValueError, match=r"U-Net of 4 input channels .* or 9 .*takes 8"):
        plain("a cat", image=image, mask_image=mask, num_inference_steps=1, progress=False)


@pytest.mark.parametrize(
    "mask",
    [
        pytest.param(np.eye(16, dtype=np.uint8) * 255, id="numpy-uint8"),
        pytest.param(np.eye(16, dtype=np.uint8), id="numpy-uint8-ones"),
        pytest.param(torch.eye(16, dtype=torch.uint8)[None, None] * 255, id="tensor-uint8"),
        pytest.param(np.eye(16, dtype=bool), id="numpy-bool"),
        pytest.param(torch.eye(16)[None] * 0.7, id="tensor-BHW"),
        pytest.param([Image.fromarray(np.eye(16, dtype=np.uint8) * 255)] * 2, id="pil-list"),
    ],
)
def test_mask_formats(mask):
    tensor = mask_to_tensor(mask, 16, 16)
    assert tensor.shape[1:] == (1, 16, 16) and set(tensor.unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(tensor[0, 0], torch.eye(16))


def test_inpainting_through_the_runtime_equals_eager(sd_inpaint_folder):
    """The mask and masked latents travel in the condition: graphs replay them per generation."""
    import fastdiff.runtime as runtime
    from tests.runtime.fake_graph import RecordingGraphBackend

    pipe = Pipeline.from_pretrained(sd_inpaint_folder)
    pipe.unet.fold_conv_biases(True)  # as optimize() leaves it, so eager does the same sums
    image, mask = image_and_mask()
    other = torch.flip(mask, dims=(-1,))
    kwargs = dict(prompt="a cat", image=image, num_inference_steps=6, seed=2, progress=False)
    wanted = [pipe(**kwargs, mask_image=m, output_type="tensor") for m in (mask, other)]
    runtime.optimize(pipe, backend=RecordingGraphBackend(), verbose=False)
    for m, want in zip((mask, other), wanted, strict=True):
        got = pipe(**kwargs, mask_image=m, output_type="tensor")
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert INPAINT_KEY == "inpaint_latents"


@pytest.mark.parametrize(
    "class_name", ["StableDiffusionInpaintPipeline", "StableDiffusionXLInpaintPipeline"]
)
def test_inpainting_strength_default_is_the_diffusers_default(class_name):
    import inspect

    from fastdiff.pipeline.call_arguments import CallDefaults

    defaults = CallDefaults.for_folder({"_class_name": class_name}, {})
    parameters = inspect.signature(getattr(diffusers, class_name).__call__).parameters
    assert parameters["strength"].default == defaults.inpaint_strength


def test_integer_masks_repaint_where_non_zero_as_diffusers_binarizes_them(pipe, reference):
    """diffusers binarizes a numpy or tensor mask's raw values at 0.5: a 0/1 uint8 mask (what
    ``(segmentation > 0).astype(np.uint8)`` gives) repaints where it is 1."""
    image, mask = image_and_mask()
    ones = mask[0, 0].numpy().astype(np.uint8)  # 0/1
    kwargs = dict(prompt="a red cat", image=image, num_inference_steps=4, height=16, width=16)
    ours = pipe(**kwargs, mask_image=ones, seed=4, output_type="tensor", progress=False)
    generator = torch.Generator().manual_seed(4)
    theirs = reference(**kwargs, mask_image=ones, generator=generator, output_type="pt").images
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    as_float = pipe(**kwargs, mask_image=mask, seed=4, output_type="tensor", progress=False)
    torch.testing.assert_close(ours, as_float)
    channels_last = mask_to_tensor(ones[:, :, None], 16, 16)  # (H, W, 1), as diffusers takes it
    torch.testing.assert_close(channels_last[0, 0], mask[0, 0])


def test_a_tensor_image_of_another_size_is_refused_not_resized(pipe):
    """diffusers resizes a tensor image to the default size when none is given: fastdiff asks."""
    image = torch.rand(1, 3, 32, 32)
    mask = torch.zeros(1, 1, 32, 32)
    with pytest.raises(ValueError, match="image is 32x32 but the folder's default size is 16x16"):
        pipe("a cat", image=image, mask_image=mask, num_inference_steps=1, progress=False)
    out = pipe("a cat", image=image, mask_image=mask, height=32, width=32, num_inference_steps=1)
    assert out[0].size == (32, 32)
