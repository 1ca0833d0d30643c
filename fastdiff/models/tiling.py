"""Tiled decoding: decode a large latent in overlapping tiles and blend the seams.

Each tile is decoded on its own (bounded memory, any output size); where tiles overlap, their
outputs are averaged with weights that ramp linearly from the tile's edge, so every output pixel is
a convex combination of the tiles that cover it and no seam is visible.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles of length ``tile`` every ``stride`` covering ``[0, size)``.

    The last tile is moved back to end exactly at ``size`` so every tile has the full length.
    """
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)
    return starts


def blend_ramp(length: int, ramp: int, at_start: bool, at_end: bool, device) -> torch.Tensor:
    """1-D weights: 1 inside, rising linearly over ``ramp`` samples at edges shared with a tile."""
    weights = torch.ones(length, device=device, dtype=torch.float32)
    ramp = min(ramp, length // 2)
    if ramp > 0:
        rising = (torch.arange(ramp, device=device, dtype=torch.float32) + 0.5) / ramp
        if not at_start:
            weights[:ramp] = rising
        if not at_end:
            weights[length - ramp :] = rising.flip(0)
    return weights


def tiled_decode(
    decode: Callable[[torch.Tensor], torch.Tensor],
    latent: torch.Tensor,
    tile_size: int,
    overlap: int,
    scale: int,
) -> torch.Tensor:
    """Decode ``latent`` (B, C, h, w) tile by tile; ``decode`` maps a (B, C, t, t) latent tile to a
    (B, C_out, t*scale, t*scale) image tile. ``tile_size`` and ``overlap`` are in latent pixels."""
    if tile_size < 1 or not 0 <= overlap < tile_size:
        raise ValueError(
            f"tiled decoding needs tile_size >= 1 and 0 <= overlap < tile_size, got "
            f"tile_size={tile_size} overlap={overlap}"
        )
    _, _, height, width = latent.shape
    stride = tile_size - overlap
    rows = tile_starts(height, tile_size, stride)
    cols = tile_starts(width, tile_size, stride)
    output = None
    total_weight = None
    out_dtype = latent.dtype
    for top in rows:
        for left in cols:
            tile = latent[:, :, top : top + tile_size, left : left + tile_size]
            image = decode(tile)
            out_dtype = image.dtype
            if output is None:
                shape = (latent.shape[0], image.shape[1], height * scale, width * scale)
                output = torch.zeros(shape, device=image.device, dtype=torch.float32)
                total_weight = torch.zeros(shape[2:], device=image.device, dtype=torch.float32)
            tile_h, tile_w = image.shape[-2:]
            weight_h = blend_ramp(
                tile_h, overlap * scale, top == rows[0], top == rows[-1], image.device
            )
            weight_w = blend_ramp(
                tile_w, overlap * scale, left == cols[0], left == cols[-1], image.device
            )
            weight = weight_h[:, None] * weight_w[None, :]
            y, x = top * scale, left * scale
            output[:, :, y : y + tile_h, x : x + tile_w] += image.float() * weight
            total_weight[y : y + tile_h, x : x + tile_w] += weight
    return (output / total_weight).to(out_dtype)
