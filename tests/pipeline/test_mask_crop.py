"""``padding_mask_crop``: inpainting the box around the mask at the model's size and pasting it
back, against diffusers' image processor and inpainting pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff.pipeline import Pipeline, mask_crop

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")


def picture(width: int = 48, height: int = 32, seed: int = 0) -> Image.Image:
    values = np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(values)


def mask(width: int = 48, height: int = 32, box=(30, 6, 37, 11)) -> Image.Image:
    values = np.zeros((height, width), dtype=np.uint8)
    x1, y1, x2, y2 = box
    values[y1:y2, x1:x2] = 255
    return Image.fromarray(values)


@pytest.fixture(scope="module")
def processor():
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(vae_scale_factor=2)


BOXES = [(30, 6, 37, 11), (0, 0, 3, 30), (40, 20, 48, 32), (10, 10, 11, 11), (2, 15, 46, 17)]
TARGETS = [(16, 16), (32, 16), (16, 24)]


@pytest.mark.parametrize("box", BOXES)
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("pad", [0, 3, 40, 2.5])
def test_crop_region_equals_diffusers(processor, box, target, pad):
    width, height = target
    drawn = mask(box=box)
    assert mask_crop.crop_region(drawn, width, height, pad) == processor.get_crop_region(
        drawn, width, height, pad=pad
    )


@pytest.mark.parametrize("size", [(16, 16), (24, 8), (8, 24), (17, 9)])
def test_fill_and_crop_resizes_and_paste_back_equal_diffusers(processor, size):
    width, height = size
    image = picture(13, 21)
    theirs = processor.resize(image, height=height, width=width, resize_mode="fill")
    assert np.array_equal(
        np.asarray(mask_crop.fill_resize(image, width, height)), np.asarray(theirs)
    )
    theirs = processor.resize(image, height=height, width=width, resize_mode="crop")
    assert np.array_equal(
        np.asarray(mask_crop.crop_resize(image, width, height)), np.asarray(theirs)
    )
    original, drawn, generated = picture(), mask(), picture(16, 16, seed=1)
    box = mask_crop.crop_region(drawn, 16, 16, 2)
    theirs = processor.apply_overlay(drawn, original, generated, box)
    ours = mask_crop.paste_back(generated, original, drawn, box)
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))


@pytest.mark.parametrize("inpainting", [False, True], ids=["plain-unet", "inpainting-unet"])
def test_padding_mask_crop_equals_diffusers(sd_folder, sd_inpaint_folder, inpainting):
    folder = sd_inpaint_folder if inpainting else sd_folder
    pipe = Pipeline.from_pretrained(folder)
    reference = diffusers.StableDiffusionInpaintPipeline.from_pretrained(
        folder, safety_checker=None
    )
    reference.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a red cat", image=picture(), mask_image=mask(), num_inference_steps=4)
    kwargs |= dict(guidance_scale=5.0, height=16, width=16, padding_mask_crop=2)
    theirs = reference(**kwargs, generator=torch.Generator().manual_seed(1)).images[0]
    ours = pipe(**kwargs, seed=1, progress=False)[0]
    assert ours.size == theirs.size == (48, 32)
    difference = np.abs(np.asarray(ours, np.int16) - np.asarray(theirs, np.int16))
    assert difference.max() <= 1  # the same pixels up to 8-bit rounding of equal floats
    # Outside the mask the original pixels stay.
    kept = np.asarray(mask()) == 0
    assert np.array_equal(np.asarray(ours)[kept], np.asarray(picture())[kept])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(padding_mask_crop=-1), "must be a number >= 0"),
        (dict(padding_mask_crop=2, output_type="tensor"), "output_type='pil'"),
        (dict(padding_mask_crop=2, image=torch.rand(1, 3, 32, 48)), "single PIL images"),
        (dict(padding_mask_crop=2, mask_image=mask(16, 16)), "the mask is 16x16 but the image"),
        (dict(padding_mask_crop=2, mask_image=Image.new("L", (48, 32))), "no pixel to repaint"),
    ],
)
def test_padding_mask_crop_refuses(sd_folder, kwargs, message):
    pipe = Pipeline.from_pretrained(sd_folder)
    call = dict(prompt="a cat", image=picture(), mask_image=mask(), num_inference_steps=1)
    with pytest.raises(ValueError, match=message):
        pipe(**call | kwargs, height=16, width=16, progress=False)


def test_padding_mask_crop_needs_a_mask(sd_folder):
    pipe = Pipeline.from_pretrained(sd_folder)
    with pytest.raises(ValueError, match="padding_mask_crop needs mask_image"):
        pipe("a cat", image=picture(), padding_mask_crop=2, num_inference_steps=1, progress=False)
