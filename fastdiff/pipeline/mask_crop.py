"""Inpainting a small region of a large image at the model's resolution (diffusers'
``padding_mask_crop``): the box around the mask's non-zero pixels, widened by the padding and then
to the aspect ratio of the size the model runs at, is cut out of the image and the mask and
resized to that size; the model inpaints it; the result is resized back into the box, pasted into
the original image, and the original pixels are laid over it wherever the mask keeps them.

Each step follows diffusers' ``VaeImageProcessor`` (``get_crop_region``, resize modes "fill"
and "crop", ``apply_overlay``) operation for operation, with the same PIL calls and Lanczos
resampling, so the images equal diffusers' bit for bit.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

LANCZOS = Image.Resampling.LANCZOS


def check_inputs(padding, image, mask_image, output_type: str) -> int:
    """``padding_mask_crop`` as a number >= 0 (pixels; diffusers also takes fractions), for
    single PIL images and PIL output only."""
    if (
        isinstance(padding, bool)
        or not isinstance(padding, (int, float, np.integer, np.floating))
        or not 0 <= padding < float("inf")
    ):
        raise ValueError(f"padding_mask_crop must be a number >= 0, got {padding!r}")
    if not isinstance(image, Image.Image) or not isinstance(mask_image, Image.Image):
        raise ValueError(
            "padding_mask_crop needs image and mask_image as single PIL images (the result is "
            f"pasted back into the image), got {type(image).__name__} and "
            f"{type(mask_image).__name__}"
        )
    if output_type != "pil":
        raise ValueError(
            f"padding_mask_crop returns the images pasted back (output_type='pil'), got "
            f"output_type={output_type!r}"
        )
    if image.size != mask_image.size:
        raise ValueError(
            f"padding_mask_crop: the mask is {mask_image.size[0]}x{mask_image.size[1]} but the "
            f"image is {image.size[0]}x{image.size[1]}"
        )
    return padding


def _widen(low: int, high: int, wanted: float, limit: int) -> tuple[int, int]:
    """Grow [low, high) by ``int(wanted - (high - low))`` (half each side, the odd pixel after)
    and shift it back inside [0, limit)."""
    grow = int(wanted - (high - low))
    low -= grow // 2
    high += grow - grow // 2
    if high >= limit:
        low -= high - limit
        high = limit
    if low < 0:
        high -= low
        low = 0
    return low, min(high, limit)


def crop_region(mask: Image.Image, width: int, height: int, pad: float) -> tuple[int, ...]:
    """(x1, y1, x2, y2): the box around the mask's non-zero pixels, widened by ``pad`` (inside
    the image), then to the aspect ratio ``width / height``."""
    values = np.array(mask.convert("L"))
    rows, columns = values.shape
    used_columns = np.flatnonzero((values != 0).any(axis=0))
    used_rows = np.flatnonzero((values != 0).any(axis=1))
    if used_columns.size == 0:  # diffusers' box would be empty or inverted
        raise ValueError("padding_mask_crop: the mask has no pixel to repaint (all black)")
    x1, x2 = int(used_columns[0]), int(used_columns[-1]) + 1
    y1, y2 = int(used_rows[0]), int(used_rows[-1]) + 1
    x1, y1 = int(max(x1 - pad, 0)), int(max(y1 - pad, 0))
    x2, y2 = int(min(x2 + pad, columns)), int(min(y2 + pad, rows))
    if (x2 - x1) / (y2 - y1) > width / height:
        y1, y2 = _widen(y1, y2, (x2 - x1) / (width / height), mask.height)
    else:
        x1, x2 = _widen(x1, x2, (y2 - y1) * (width / height), mask.width)
    return x1, y1, x2, y2


def fill_resize(image: Image.Image, width: int, height: int) -> Image.Image:
    """Resize into width x height keeping the aspect ratio, centred, the margins filled by
    stretching the image's edge rows or columns (diffusers' resize_mode "fill")."""
    ratio, source = width / height, image.width / image.height
    fit_width = width if ratio < source else image.width * height // image.height
    fit_height = height if ratio >= source else image.height * width // image.width
    resized = image.resize((fit_width, fit_height), resample=LANCZOS)
    result = Image.new("RGB", (width, height))
    result.paste(resized, box=(width // 2 - fit_width // 2, height // 2 - fit_height // 2))
    if ratio < source:
        margin = height // 2 - fit_height // 2
        if margin > 0:
            top = resized.resize((width, margin), box=(0, 0, width, 0))
            bottom = resized.resize((width, margin), box=(0, resized.height, width, resized.height))
            result.paste(top, box=(0, 0))
            result.paste(bottom, box=(0, margin + fit_height))
    elif ratio > source:
        margin = width // 2 - fit_width // 2
        if margin > 0:
            left = resized.resize((margin, height), box=(0, 0, 0, height))
            right = resized.resize((margin, height), box=(resized.width, 0, resized.width, height))
            result.paste(left, box=(0, 0))
            result.paste(right, box=(margin + fit_width, 0))
    return result


def crop_resize(image: Image.Image, width: int, height: int) -> Image.Image:
    """Resize to cover width x height keeping the aspect ratio, centred, the excess cut
    (diffusers' resize_mode "crop")."""
    ratio, source = width / height, image.width / image.height
    fit_width = width if ratio > source else image.width * height // image.height
    fit_height = height if ratio <= source else image.height * width // image.width
    resized = image.resize((fit_width, fit_height), resample=LANCZOS)
    result = Image.new("RGB", (width, height))
    result.paste(resized, box=(width // 2 - fit_width // 2, height // 2 - fit_height // 2))
    return result


def cut(image: Image.Image, mask: Image.Image, box: tuple[int, ...], width: int, height: int):
    """The image and the mask cut to ``box`` and fill-resized to width x height."""
    return fill_resize(image.crop(box), width, height), fill_resize(mask.crop(box), width, height)


def paste_back(
    generated: Image.Image, image: Image.Image, mask: Image.Image, box: tuple[int, ...]
) -> Image.Image:
    """``generated`` resized into ``box`` of ``image``, with the original pixels laid over it
    where the mask keeps them (diffusers' apply_overlay)."""
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    kept = kept.convert("RGBA")
    x1, y1, x2, y2 = box
    base = Image.new("RGBA", image.size)
    base.paste(crop_resize(generated, x2 - x1, y2 - y1), (x1, y1))
    result = base.convert("RGB").convert("RGBA")
    result.alpha_composite(kept)
    return result.convert("RGB")
