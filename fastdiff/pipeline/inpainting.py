"""Inpainting with an inpainting U-Net (SD 1.x/2.x and SDXL inpainting checkpoints), as diffusers'
StableDiffusionInpaintPipeline / StableDiffusionXLInpaintPipeline run it: the U-Net takes, besides
the latents, the mask at latent resolution and the latents of the image with the masked region
blanked out, stacked along the channels (4 + 1 + 4 = 9 in SD). Those two do not change from step to
step: they travel in the condition dict as ``inpaint_latents`` and the U-Net call stacks them onto
each step's latents (``Pipeline.unet_forward``), so the eager loop, classifier-free guidance (the
same for both halves) and the runtime's graphs carry them like the text embeddings.

A plain U-Net (4 latent channels) given a mask inpaints as diffusers' inpainting pipelines run
one: it never sees the mask; after every step the region the mask keeps is set back to the image's
latents noised to the next step's level (``fastdiff.sampling.known_region``).

The mask is white (>= 0.5) where the image is repainted, black where it is kept, binarized as
diffusers' mask processor does; diffusers downsizes it to latent resolution with nearest-neighbour
interpolation, and so does this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fastdiff.models.vae import posterior_noise
from fastdiff.pipeline import images as image_utils
from fastdiff.sampling import KnownRegion

INPAINT_KEY = "inpaint_latents"


def mask_to_tensor(
    mask: Image.Image | Sequence[Image.Image] | torch.Tensor | np.ndarray,
    height: int,
    width: int,
) -> torch.Tensor:
    """A mask -> float32 (B, 1, height, width) of zeros and ones (1: repaint).

    Accepts a PIL image or a list of them (any mode; resized with Lanczos, then made grayscale,
    as diffusers' mask processor does), or a tensor / numpy array (H, W), (B, H, W) or
    (B, 1, H, W) (numpy also (H, W, 1), (B, H, W, 1)) at the image's size: float values in
    [0, 1], and integer or bool masks repaint where non-zero (diffusers binarizes their raw
    values at 0.5)."""
    if isinstance(mask, Image.Image) or (
        isinstance(mask, (list, tuple)) and mask and isinstance(mask[0], Image.Image)
    ):
        masks = [mask] if isinstance(mask, Image.Image) else list(mask)
        if not all(isinstance(item, Image.Image) for item in masks):
            raise ValueError("a list of masks must hold PIL images only")
        arrays = []
        for item in masks:
            item = image_utils.eight_bit_gray(item)  # a 16-bit mask scaled, not clipped
            if item.size != (width, height):
                item = item.resize((width, height), resample=Image.Resampling.LANCZOS)
            arrays.append(np.asarray(item.convert("L"), dtype=np.float32) / 255.0)
        tensor = torch.from_numpy(np.stack(arrays))[:, None]
    elif isinstance(mask, (torch.Tensor, np.ndarray)):
        tensor = mask_array(mask)
        if tuple(tensor.shape[2:]) != (height, width):
            raise ValueError(
                f"mask is {tensor.shape[2]}x{tensor.shape[3]} but the image is {height}x{width}: "
                "pass a mask of the image's size"
            )
    else:
        raise ValueError(
            "mask_image must be a PIL image, a list of PIL images, or a tensor or numpy array "
            f"(H, W), (B, H, W) or (B, 1, H, W); got {type(mask).__name__}"
        )
    return (tensor >= 0.5).float()


def mask_array(mask: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A tensor or array mask as float32 (B, 1, H, W): float values checked to lie in [0, 1],
    integer and bool ones 1 where non-zero."""
    shape = tuple(mask.shape)
    if isinstance(mask, np.ndarray):
        if mask.ndim in (3, 4) and mask.shape[-1] == 1:  # channels last, as diffusers takes it
            mask = mask[..., 0]
        if not (np.issubdtype(mask.dtype, np.number) or mask.dtype == np.bool_):
            raise ValueError(f"a numpy mask must be a number or bool array, got {mask.dtype}")
        mask = torch.from_numpy(np.ascontiguousarray(mask))
    if mask.is_complex():
        raise ValueError(f"a mask must hold real values, got {mask.dtype}")
    if not mask.is_floating_point():
        if mask.dtype.is_signed and mask.numel() and mask.min() < 0:
            # refused as negative float masks are: read as "non-zero repaints", a mask of
            # -1 (keep) and 1 (repaint) would repaint everything
            raise ValueError(
                f"an integer mask must hold values >= 0 (non-zero: repaint), got {mask.dtype} "
                "values below 0"
            )
        mask = (mask != 0).float()  # diffusers binarizes the raw values: any non-zero repaints
    tensor = mask.detach().float().cpu()
    if tensor.ndim == 2:
        tensor = tensor[None, None]
    elif tensor.ndim == 3:
        tensor = tensor[:, None]
    if tensor.ndim != 4 or tensor.shape[1] != 1:
        raise ValueError(f"mask must have shape (H, W), (B, H, W) or (B, 1, H, W), got {shape}")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError("mask contains NaN or inf")
    if tensor.numel() and (tensor.min() < 0 or tensor.max() > 1):
        raise ValueError("mask values must lie in [0, 1] (1: repaint)")
    return tensor


def masked_pixels(pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The image ([-1, 1], (B, 3, H, W)) with the repainted region set to 0 (mid-gray), as
    diffusers blanks it before encoding; one mask for all images or one per image."""
    if mask.shape[0] not in (1, pixels.shape[0]) and pixels.shape[0] != 1:
        raise ValueError(
            f"got {mask.shape[0]} masks for {pixels.shape[0]} images: pass one or one per image"
        )
    return pixels * (mask.to(pixels.device) < 0.5)


def check_mask_count(mask: torch.Tensor, batch: int, num_images: int) -> None:
    """Refuse a number of masks that does not pair with the batch (prompts x ``num_images``):
    one mask, one per prompt or one per sample, as ``images.fit_batch`` pairs them."""
    if mask.shape[0] not in (1, batch // num_images, batch):
        raise ValueError(
            f"got {mask.shape[0]} masks (mask_image) for {batch // num_images} prompt(s) x "
            f"{num_images} image(s): pass one mask, one per prompt or one per image"
        )


def latent_mask(mask: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """The mask at latent resolution (nearest-neighbour, as diffusers' F.interpolate default)."""
    return F.interpolate(mask, size=latent_size)


UNET = "unet"  # an inpainting U-Net reads the mask and the masked image's latents
BLEND = "blend"  # a plain U-Net; the kept region is blended back after each step


def check_inputs(
    pipe: Any, image, mask_image, latents, denoising: tuple[float | None, float | None]
) -> str | None:
    """How a ``Pipeline`` call inpaints: ``UNET`` with an inpainting U-Net (which needs
    ``image`` and ``mask_image``), ``BLEND`` with another U-Net given a mask (the kept region
    blended back after each step, ``fastdiff.sampling.known_region``), None without a mask."""
    latent_channels = pipe.vae.config["latent_channels"]
    denoising_start, denoising_end = denoising
    if not pipe.is_inpainting and mask_image is None:
        return None
    if image is None or mask_image is None:
        if pipe.is_inpainting:
            raise ValueError("this is an inpainting U-Net: pass image= and mask_image=")
        raise ValueError("mask_image needs image=, the image to inpaint")
    if latents is not None or denoising_start is not None:
        raise ValueError(
            "inpainting starts from the image: latents= and denoising_start are not supported "
            "with it"
        )
    if image_utils.latents_of(image, latent_channels) is not None:
        raise ValueError("inpainting needs the image's pixels (to blank the masked region)")
    if pipe.is_inpainting:
        return UNET
    if pipe.unet.config["in_channels"] != latent_channels:
        raise ValueError(
            f"mask_image needs a U-Net of {latent_channels} input channels (blended, as "
            f"diffusers inpaints with them) or {2 * latent_channels + 1} (an inpainting U-Net); "
            f"this one takes {pipe.unet.config['in_channels']}"
        )
    if denoising_end is not None:
        # diffusers blends the clean image in at the last step it runs, also when that step
        # leaves the rest still noisy: refused rather than returning such latents.
        raise ValueError(
            "denoising_end is not supported when inpainting with a plain (non-inpainting) U-Net"
        )
    return BLEND


def stacked_latents(
    pipe: Any, pixels: torch.Tensor, mask_image, shape: tuple, generator, num_images: int
) -> torch.Tensor:
    """The mask at latent size and the masked image's latents (encoded with ``generator``, as
    diffusers encodes them after drawing the noise), stacked along the channels, one per sample
    of the (prompts x ``num_images``) batch of latent ``shape``."""
    mask = mask_to_tensor(mask_image, pixels.shape[2], pixels.shape[3])
    masked = masked_pixels(pixels, mask)  # (refuses counts of masks and images that do not pair)
    check_mask_count(mask, shape[0], num_images)
    masked_latents = pipe.encode_image(masked, generator).to(pipe.dtype)
    small = latent_mask(mask, tuple(shape[2:])).to(pipe.device, pipe.dtype)
    parts = (small, masked_latents)
    return torch.cat([image_utils.fit_batch(p, shape[0], num_images) for p in parts], dim=1)


def known_region(
    pipe: Any,
    pixels: torch.Tensor,
    mask_image,
    image_latents: torch.Tensor,
    noise: torch.Tensor,
    generator: torch.Generator | None,
    num_images: int,
) -> KnownRegion:
    """What a plain U-Net inpaints around: the image's latents (already encoded, fitted to the
    batch), the mask at latent size and the run's unit ``noise``. diffusers also encodes the
    masked image here, which such a U-Net never reads: its only effect is the normals the
    encoder's sampling takes from the generator, so the same draw is made, without the pass."""
    mask = mask_to_tensor(mask_image, pixels.shape[2], pixels.shape[3])
    shape = tuple(noise.shape)
    # The masked images diffusers encodes (also refusing counts of masks and images that
    # do not pair), of which only the batch matters here.
    masked = masked_pixels(pixels, mask)
    check_mask_count(mask, shape[0], num_images)
    if not getattr(pipe.vae, "deterministic", False):  # (TAESD's encoder draws nothing)
        encoded = (masked.shape[0], shape[1], *shape[2:])
        vae_dtype = next(pipe.vae.parameters()).dtype
        posterior_noise(encoded, vae_dtype, pipe.device, generator)
    small = latent_mask(mask, tuple(shape[2:])).to(pipe.device, pipe.dtype)
    return KnownRegion(
        latents=image_latents,
        mask=image_utils.fit_batch(small, shape[0], num_images),
        noise=noise,
    )
