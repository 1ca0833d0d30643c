"""Image conversions at the pipeline's edges: VAE output to [0, 1] tensors and PIL images, PIL or
tensor inputs to the VAE's [-1, 1] range, image grids, and atomic PNG writes."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastdiff.files import atomic_write, check_output_path


def vae_output_to_unit_range(decoded: torch.Tensor) -> torch.Tensor:
    """Map a VAE decoder output (nominally in [-1, 1]) to float32 images in [0, 1]."""
    return (decoded.float() / 2 + 0.5).clamp(0, 1)


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) float images in [0, 1] -> list of RGB PIL images (rounded to 8 bits)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"expected images of shape (B, 3, H, W) or (B, 1, H, W), got {tuple(images.shape)}"
        )
    array = (images.detach().float().cpu().permute(0, 2, 3, 1).numpy() * 255).round()
    array = array.clip(0, 255).astype(np.uint8)
    if array.shape[-1] == 1:
        return [Image.fromarray(item[..., 0], mode="L").convert("RGB") for item in array]
    return [Image.fromarray(item) for item in array]


# 16-bit grayscale (PNG, TIFF). Pillow's convert("RGB") clips these to 0..255 instead of scaling,
# which turns almost every pixel white.
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def sixteen_bit_unit_values(image: Image.Image) -> np.ndarray | None:
    """A 16-bit grayscale image's pixels as float32 (H, W) in [0, 1]; None for other modes."""
    # Mode "I" (32-bit int) is both how older Pillow opens a 16-bit PNG and what L.convert("I")
    # gives: values above 255 can only be 16-bit data; 0..255 keep the 8-bit reading.
    wide = image.mode == "I" and image.getextrema()[1] > 255
    if image.mode not in HIGH_BIT_DEPTH_MODES and not wide:
        return None
    values = np.asarray(image).astype(np.float32)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ValueError(
            f"image of mode {image.mode!r} has values outside the 16-bit range "
            f"0..65535 (min {values.min():g}, max {values.max():g})"
        )
    return values / 65535.0


def eight_bit_gray(image: Image.Image) -> Image.Image:
    """A 16-bit grayscale image as mode "L", scaled; any other image as it is. For masks, which
    are read through convert("L"): Pillow clips every 16-bit value above 255 to white there (a
    dark-gray "keep" region would become "repaint"). Scaled, a 16-bit value v lands on the same
    side of the 0.5 threshold as v / 65535 does, as 16-bit init images are read
    (``pil_to_unit_rgb``)."""
    unit = sixteen_bit_unit_values(image)
    if unit is None:
        return image
    return Image.fromarray((unit * 255.0).round().astype(np.uint8))  # 2-D uint8: mode "L"


def pil_to_unit_rgb(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """A PIL image of any common mode -> float32 (H, W, 3) in [0, 1] at ``size`` (width, height)."""
    if image.mode == "F":
        raise ValueError(
            "float images (PIL mode 'F') have no fixed value range: convert the init image to "
            "8-bit RGB first"
        )
    unit = sixteen_bit_unit_values(image)
    if unit is not None:
        gray = Image.fromarray(unit)  # mode "F"
        if gray.size != size:
            gray = gray.resize(size, resample=Image.Resampling.LANCZOS)
        return np.repeat(np.asarray(gray, dtype=np.float32).clip(0, 1)[..., None], 3, axis=-1)
    rgb = image.convert("RGB")
    if rgb.size != size:
        rgb = rgb.resize(size, resample=Image.Resampling.LANCZOS)
    return np.asarray(rgb, dtype=np.float32) / 255.0


def image_to_tensor(
    image: Image.Image | Sequence[Image.Image] | torch.Tensor,
    height: int | None = None,
    width: int | None = None,
) -> torch.Tensor:
    """An init image for img2img -> float32 (B, 3, H, W) tensor in [-1, 1] (the VAE's input range).

    Accepts one PIL image, a list of PIL images (resized to ``width`` x ``height`` when given), a
    float tensor (3, H, W) / (B, 3, H, W) with values in [0, 1], or numpy arrays as diffusers takes
    them: (H, W, 3) / (B, H, W, 3) or a list of (H, W, 3), float in [0, 1] (uint8: 0 to 255).
    """
    if isinstance(image, np.ndarray) or (
        isinstance(image, (list, tuple)) and image and isinstance(image[0], np.ndarray)
    ):
        image = numpy_to_tensor(image)
    if isinstance(image, torch.Tensor):
        tensor = image.detach().float()
        if tensor.ndim == 3:
            tensor = tensor.unsqueeze(0)
        if tensor.ndim != 4 or tensor.shape[1] != 3:
            raise ValueError(
                f"image tensor must have shape (3, H, W) or (B, 3, H, W), got {tuple(image.shape)}"
            )
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError("image tensor contains NaN or inf")
        if tensor.numel() and (tensor.min() < 0 or tensor.max() > 1):
            raise ValueError("image tensor values must lie in [0, 1]")
        if (height is not None and tensor.shape[2] != height) or (
            width is not None and tensor.shape[3] != width
        ):
            raise ValueError(
                f"image tensor is {tensor.shape[2]}x{tensor.shape[3]} but height x width "
                f"{height}x{width} was requested; resize it first or leave height/width unset"
            )
        return tensor * 2 - 1
    images = [image] if isinstance(image, Image.Image) else list(image)
    if not images or not all(isinstance(item, Image.Image) for item in images):
        raise ValueError("image must be a PIL image, a list of PIL images or a float tensor")
    size = (width or images[0].width, height or images[0].height)
    arrays = [pil_to_unit_rgb(item, size) for item in images]
    tensor = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return tensor * 2 - 1


def numpy_to_tensor(image: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
    """(H, W, 3) / (B, H, W, 3) arrays, or a list of either -> a (B, 3, H, W) float
    tensor in [0, 1]; uint8 is read as 0 to 255, a float dtype as [0, 1] (checked later)."""
    arrays = [image] if isinstance(image, np.ndarray) else list(image)
    if not all(isinstance(item, np.ndarray) for item in arrays):
        raise ValueError("a list of init images must hold numpy arrays only, or PIL images only")
    if len({(item.shape, item.dtype) for item in arrays}) != 1:
        raise ValueError("numpy init images must all have one shape and dtype")
    if not isinstance(image, (list, tuple)):
        stacked = arrays[0]
    elif arrays[0].ndim == 4:  # a list of batches (1, H, W, 3), as diffusers concatenates them
        stacked = np.concatenate(arrays)
    else:
        stacked = np.stack(arrays)
    if stacked.ndim not in (3, 4) or stacked.shape[-1] != 3:
        given = arrays[0].shape if len(arrays) == 1 else f"{len(arrays)} x {arrays[0].shape}"
        raise ValueError(
            f"numpy init image must have shape (H, W, 3) or (B, H, W, 3), channels last, "
            f"got {given}"
        )
    if stacked.ndim == 3:
        stacked = stacked[None]
    if stacked.dtype == np.uint8:
        stacked = stacked.astype(np.float32) / 255.0
    elif not np.issubdtype(stacked.dtype, np.floating):
        raise ValueError(f"numpy init image must be uint8 or float, got {stacked.dtype}")
    elif not np.isfinite(stacked).all():
        raise ValueError("numpy init image contains NaN or inf")
    elif stacked.size and (stacked.min() < 0 or stacked.max() > 1):
        raise ValueError(
            f"numpy float init image values must lie in [0, 1], got [{stacked.min():g}, "
            f"{stacked.max():g}] (a uint8 array is read as 0 to 255)"
        )
    return torch.from_numpy(np.ascontiguousarray(stacked, dtype=np.float32)).permute(0, 3, 1, 2)


def make_grid(images: Sequence[Image.Image], columns: int | None = None) -> Image.Image:
    """Tile equally sized images row by row; ``columns`` defaults to a near-square layout."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    width, height = images[0].size
    if any(item.size != (width, height) for item in images):
        raise ValueError("all images of a grid must have the same size")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * width, rows * height))
    for index, item in enumerate(images):
        grid.paste(item, ((index % columns) * width, (index // columns) * height))
    return grid


def image_format(path: str | os.PathLike, option: str = "--out") -> str:
    """The image format (Pillow's name) that ``path``'s suffix names, if Pillow can write it."""
    name = str(path)
    found = Image.registered_extensions().get(Path(path).suffix.lower())
    if found is None:
        raise ValueError(f"cannot tell the image format from the file name {name!r}")
    if found not in Image.SAVE:  # formats Pillow only reads: PSD, XPM, FITS, ...
        raise ValueError(
            f"{option}: Pillow reads but cannot write {found} images ({name!r}); name a file in a "
            "format it writes, e.g. .png, .jpg or .webp"
        )
    return found


def check_image_path(
    path: str | os.PathLike, *, overwrite: bool = True, option: str = "--out"
) -> str:
    """The image format (Pillow's name) that a file at ``path`` would be written in; raises when
    its folder does not exist or is not writable, the path is a folder, the suffix names no image
    format that an RGB image can be written in, or (``overwrite=False``) a file is there
    already."""
    target = check_output_path(path, overwrite=overwrite, option=option)
    found = image_format(target, option)
    # Some writable formats take no RGB image (XBM, MSP: 1-bit) or have no writer installed
    # (BUFR, GRIB, HDF5, WMF): try a tiny one now rather than fail after the images are made.
    try:
        Image.new("RGB", (8, 8)).save(io.BytesIO(), format=found)
    except Exception as error:
        raise ValueError(
            f"{option}: cannot write an RGB image as {found} ({str(target)!r}: {error}); name a "
            "file in another format, e.g. .png, .jpg or .webp"
        ) from None
    return found


def save_image_atomic(
    image: Image.Image, path: str | os.PathLike, *, overwrite: bool = True, option: str = "--out"
) -> Path:
    """Write ``image`` to ``path`` so that a reader never sees a partial file (``atomic_write``).
    On failure an existing file at ``path`` is left untouched; with ``overwrite=False`` it is
    never replaced (``FileExistsError``). ``option`` names the command-line option in errors.
    Commands run ``check_image_path`` on the path before any work."""
    target = check_output_path(path, overwrite=overwrite, option=option)
    found = image_format(target, option)
    return atomic_write(
        target, lambda temporary: image.save(temporary, format=found), overwrite=overwrite
    )


def latents_of(image, latent_channels: int) -> torch.Tensor | None:
    """``image`` as (B, C, h, w) latents when it is latents rather than pixels, told apart as
    diffusers' img2img pipelines tell them: a tensor (C, h, w) or (B, C, h, w) with the VAE's
    latent channel count (4 in SD) in place of 3. None for anything else (an image)."""
    if not isinstance(image, torch.Tensor) or image.ndim not in (3, 4) or latent_channels == 3:
        return None
    if image.shape[-3] != latent_channels:
        return None
    latents = image.detach() if image.ndim == 4 else image.detach().unsqueeze(0)
    if not latents.is_floating_point():
        raise ValueError(f"image latents must be a float tensor, got {latents.dtype}")
    if not bool(torch.isfinite(latents).all()):
        raise ValueError("image latents contain NaN or inf")
    return latents


def latent_image_size(
    latents: torch.Tensor, height: int | None, width: int | None, factor: int
) -> tuple[int, int]:
    """The (height, width) of the image ``latents`` stand for; a requested one must match."""
    size = (latents.shape[2] * factor, latents.shape[3] * factor)
    for name, asked, got in (("height", height, size[0]), ("width", width, size[1])):
        if asked is not None and asked != got:
            raise ValueError(
                f"image latents of {latents.shape[2]}x{latents.shape[3]} are a {size[0]}x"
                f"{size[1]} image, but {name}={asked} was requested"
            )
    return size


def check_size(height: int, width: int, factor: int) -> None:
    """Image height and width: positive ints, multiples of the VAE's downsampling ``factor``."""
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
        if value % factor:
            raise ValueError(
                f"{name}={value} is not a multiple of the VAE downsampling factor {factor}"
            )


def fit_batch(latents: torch.Tensor, batch: int, num_images: int) -> torch.Tensor:
    """Per-image inputs for a batch of ``batch`` samples (prompts x ``num_images``): as they
    are when there is one per sample, else ``match_batch``'s pairing with the prompts."""
    if latents.shape[0] == batch:
        return latents
    return match_batch(latents, batch // num_images, num_images)


def match_batch(latents: torch.Tensor, prompts: int, num_images: int) -> torch.Tensor:
    """One init image for every prompt, or one per prompt; then ``num_images`` copies each."""
    if latents.shape[0] == 1:
        return latents.expand(prompts * num_images, -1, -1, -1).contiguous()
    if latents.shape[0] != prompts:
        raise ValueError(
            f"got {latents.shape[0]} init images for {prompts} prompts/labels: pass one image "
            "or one per prompt"
        )
    return latents.repeat_interleave(num_images, dim=0)
