"""Review findings in inpainting, mask cropping, textual inversion, SDXL micro-conditioning, latent
scaling and VAE tiling: each test failed before its fix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastdiff.pipeline import Pipeline
from fastdiff.pipeline.inpainting import mask_to_tensor
from fastdiff.pipeline.textual_inversion import expand_prompt

pytest.importorskip("diffusers")
pytest.importorskip("transformers")


def embedding(rows: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("vectors", [1, 3])
def test_a_token_named_as_a_vector_of_a_loaded_token_is_refused(sd, vectors):
    """Loading ``<toy>_1`` (or ``<toy>_3`` beside a 3-vector ``<toy>``) was accepted, after which
    every prompt with ``<toy>`` was expanded to ``<toy> <toy>_1`` and silently took the second
    embedding too. Such a name is now refused, and the prompt keeps its meaning."""
    pipe = sd
    width = pipe.prompt_encoder.encoders[0][1].get_input_embeddings().weight.shape[1]
    pipe.load_textual_inversion({"<toy>": embedding(vectors, width)})
    try:
        tokenizer = pipe.prompt_encoder.encoders[0][0]
        before = expand_prompt(tokenizer, "a <toy> cat")
        with pytest.raises(ValueError, match=rf"'<toy>_{vectors}' reads as vector {vectors}"):
            pipe.load_textual_inversion({f"<toy>_{vectors}": embedding(1, width, seed=1)})
        assert pipe.textual_inversions.loaded.keys() == {"<toy>"}
        assert expand_prompt(pipe.prompt_encoder.encoders[0][0], "a <toy> cat") == before
        # A name that only looks alike is still taken.
        pipe.load_textual_inversion({"<toy>_x": embedding(1, width, seed=2)})
    finally:
        pipe.unload_textual_inversion()


def test_sdxl_vector_tokens_of_the_second_encoder_are_checked(sdxl_folder):
    """An SDXL file whose clip_g holds more vectors than its clip_l was checked against the
    first encoder's count only: its extra vector token (``<toy>_2``) could be one the second
    tokenizer already had (another inversion's), whose embedding row was then overwritten."""
    pipe = Pipeline.from_pretrained(sdxl_folder)
    widths = [
        encoder.get_input_embeddings().weight.shape[1]
        for _, encoder in pipe.prompt_encoder.encoders
    ]
    other = {"clip_l": embedding(1, widths[0], 5), "clip_g": embedding(1, widths[1], 6)}
    pipe.load_textual_inversion(other, token="<toy>_2")
    tokenizer, encoder = pipe.prompt_encoder.encoders[1]
    row = tokenizer.convert_tokens_to_ids("<toy>_2")
    kept = encoder.get_input_embeddings().weight[row].clone()
    state = {"clip_l": embedding(1, widths[0]), "clip_g": embedding(3, widths[1], seed=1)}
    with pytest.raises(ValueError, match="'<toy>_2' is in the tokenizer's vocabulary"):
        pipe.load_textual_inversion(state, token="<toy>")
    tokenizer, encoder = pipe.prompt_encoder.encoders[1]
    torch.testing.assert_close(encoder.get_input_embeddings().weight[row], kept)
    assert pipe.textual_inversions.loaded.keys() == {"<toy>_2"}


@pytest.mark.parametrize("inpainting", [False, True], ids=["plain-unet", "inpainting-unet"])
@pytest.mark.parametrize("extra", [{}, dict(num_images=2)], ids=["one", "num-images-2"])
def test_masks_that_do_not_pair_with_the_prompts_are_named(
    sd_folder, sd_inpaint_folder, inpainting, extra
):
    """One image and three masks for one prompt was refused as "got 3 init images for 1
    prompts", naming images the caller did not pass; the error now names the masks."""
    pipe = Pipeline.from_pretrained(sd_inpaint_folder if inpainting else sd_folder)
    masks = torch.zeros(3, 1, 16, 16)
    masks[:, :, 4:12] = 1.0
    call = dict(image=torch.rand(1, 3, 16, 16), mask_image=masks, height=16, width=16)
    with pytest.raises(ValueError, match=r"got 3 masks \(mask_image\) for 1 prompt\(s\)"):
        pipe("a cat", **call, **extra, num_inference_steps=1, progress=False)


@pytest.mark.parametrize(
    "mask",
    [
        pytest.param(np.eye(16, dtype=np.int8) * 2 - 1, id="numpy-int8"),
        pytest.param(torch.eye(16, dtype=torch.int64)[None] * 2 - 1, id="tensor-int64"),
        pytest.param(np.eye(16).astype(np.complex64), id="numpy-complex"),
    ],
)
def test_negative_integer_and_complex_masks_are_refused(mask):
    """Integer masks repaint where non-zero, so a (-1: keep, 1: repaint) mask was read as
    repaint-everything (and a complex one was taken too), while a float mask below 0 is
    refused; both are now refused, naming the values."""
    with pytest.raises(ValueError, match="values >= 0|real values"):
        mask_to_tensor(mask, 16, 16)
    unsigned = mask_to_tensor(np.eye(16, dtype=np.uint16) * 65535, 16, 16)  # still taken
    torch.testing.assert_close(unsigned[0, 0], torch.eye(16))


@pytest.mark.parametrize("crop", [None, 4], ids=["whole", "padding-mask-crop"])
def test_a_sixteen_bit_pil_mask_inpaints_as_its_eight_bit_twin(sd, crop):
    """The pipeline read PIL masks through convert("L"), which clips 16-bit values above 255 to
    white: a dark-gray (keep) region of a 16-bit mask was repainted, and padding_mask_crop's box
    and overlay took it in. 16-bit masks are scaled to 8 bits, as 16-bit init images are."""
    from PIL import Image

    mask8 = np.zeros((16, 16), dtype=np.uint8)
    mask8[:, 8:] = 100  # 0.39: kept
    mask8[4:12, 10:14] = 230  # 0.9: repainted
    mask16 = Image.fromarray(mask8.astype(np.uint16) * 257)
    assert mask16.mode.startswith("I")
    pixels = np.random.RandomState(0).rand(16, 16, 3) * 255
    image = Image.fromarray(pixels.astype(np.uint8))  # PIL: padding_mask_crop pastes into it
    kwargs = dict(image=image, num_inference_steps=2, progress=False)
    if crop is not None:
        kwargs["padding_mask_crop"] = crop
    outputs = [
        np.asarray(sd("a cat", mask_image=mask, seed=3, **kwargs)[0])
        for mask in (Image.fromarray(mask8), mask16)
    ]
    np.testing.assert_array_equal(outputs[1], outputs[0])
