"""Labelled sample grids (PIL): one row per class, unguided samples left, guided samples right."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from fastdiff.files import atomic_write
from fastdiff.training.shapes import to_uint8

SCALE = 2  # 32-pixel samples are shown at 64 pixels
LABEL_WIDTH = 104
HEADER_HEIGHT = 22
GAP = 12
PAD = 2
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)


def grid_image(
    left: torch.Tensor,
    right: torch.Tensor,
    row_names: list[str],
    per_row: int,
    left_title: str,
    right_title: str,
) -> Image.Image:
    """``left``/``right``: [rows * per_row, 3, H, W] in [-1, 1], grouped by row."""
    rows = len(row_names)
    for name, images in (("left", left), ("right", right)):
        if images.shape[0] != rows * per_row:
            raise ValueError(
                f"{name} has {images.shape[0]} images, expected {rows} rows x {per_row}"
            )
    cell = left.shape[-1] * SCALE + PAD
    half_width = per_row * cell
    width = LABEL_WIDTH + 2 * half_width + GAP
    height = HEADER_HEIGHT + rows * cell
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    draw.text((LABEL_WIDTH + 2, 5), left_title, fill=TEXT, font=font)
    draw.text((LABEL_WIDTH + half_width + GAP + 2, 5), right_title, fill=TEXT, font=font)
    for side, images in enumerate((left, right)):
        pixels = to_uint8(images).numpy()
        x0 = LABEL_WIDTH + side * (half_width + GAP)
        for index, array in enumerate(pixels):
            row, column = divmod(index, per_row)
            tile = Image.fromarray(array).resize(
                (array.shape[1] * SCALE, array.shape[0] * SCALE), Image.NEAREST
            )
            canvas.paste(tile, (x0 + column * cell, HEADER_HEIGHT + row * cell))
    for row, name in enumerate(row_names):
        draw.text((4, HEADER_HEIGHT + row * cell + cell // 2 - 6), name, fill=TEXT, font=font)
    return canvas


def save_grid(
    path: Path,
    left: torch.Tensor,
    right: torch.Tensor,
    row_names: list[str],
    per_row: int,
    left_title: str,
    right_title: str,
    overwrite: bool = True,
) -> None:
    """Render the grid and write it to ``path`` as PNG atomically (never replacing a file there
    when ``overwrite`` is False)."""
    image = grid_image(left, right, row_names, per_row, left_title, right_title)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()), overwrite=overwrite)
