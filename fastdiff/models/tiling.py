"""Tiled decoding and encoding: run the VAE on overlapping tiles and blend the seams.

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


def tiled_apply(
    function: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    tile_size: int,
    overlap: int,
    up: int = 1,
    down: int = 1,
) -> torch.Tensor:
    """``function`` on overlapping tiles of ``inputs`` (B, C, H, W), blended: ``function`` maps a
    (B, C, t, t) tile to (B, C', t*up/down, t*up/down). ``tile_size`` and ``overlap`` are in input
    pixels, multiples of ``down`` (as must H and W be), so every tile lands on whole output
    pixels; the blend ramps over the overlap, measured in output pixels."""
    if tile_size < 1 or not 0 <= overlap < tile_size:
        raise ValueError(
            f"tiling needs tile_size >= 1 and 0 <= overlap < tile_size, got "
            f"tile_size={tile_size} overlap={overlap}"
        )
    _, _, height, width = inputs.shape
    if any(value % down for value in (tile_size, overlap, height, width)):
        raise ValueError(
            f"tile_size {tile_size}, overlap {overlap} and the input's {height}x{width} must be "
            f"multiples of {down}"
        )
    stride = tile_size - overlap
    rows = tile_starts(height, tile_size, stride)
    cols = tile_starts(width, tile_size, stride)
    output = total_weight = None
    out_dtype = inputs.dtype
    ramp = overlap * up // down
    for top in rows:
        for left in cols:
            result = function(inputs[:, :, top : top + tile_size, left : left + tile_size])
            out_dtype = result.dtype
            if output is None:
                shape = (inputs.shape[0], result.shape[1], height * up // down, width * up // down)
                output = torch.zeros(shape, device=result.device, dtype=torch.float32)
                total_weight = torch.zeros(shape[2:], device=result.device, dtype=torch.float32)
            tile_h, tile_w = result.shape[-2:]
            weight_h = blend_ramp(tile_h, ramp, top == rows[0], top == rows[-1], result.device)
            weight_w = blend_ramp(tile_w, ramp, left == cols[0], left == cols[-1], result.device)
            weight = weight_h[:, None] * weight_w[None, :]
            y, x = top * up // down, left * up // down
            output[:, :, y : y + tile_h, x : x + tile_w] += result.float() * weight
            total_weight[y : y + tile_h, x : x + tile_w] += weight
    return (output / total_weight).to(out_dtype)


def tiled_decode(
    decode: Callable[[torch.Tensor], torch.Tensor],
    latent: torch.Tensor,
    tile_size: int,
    overlap: int,
    scale: int,
) -> torch.Tensor:
    """Decode ``latent`` (B, C, h, w) tile by tile; ``decode`` maps a (B, C, t, t) latent tile to a
    (B, C_out, t*scale, t*scale) image tile. ``tile_size`` and ``overlap`` are in latent pixels."""
    return tiled_apply(decode, latent, tile_size, overlap, up=scale)


def tiled_encode(
    encode: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    tile_size: int,
    overlap: int,
    scale: int,
) -> torch.Tensor:
    """Encode ``image`` (B, C, H, W) tile by tile into the encoder's moments; ``encode`` maps a
    (B, C, T, T) image tile to (B, M, T/scale, T/scale). ``tile_size`` and ``overlap`` are in
    image pixels, multiples of ``scale``. The moments (mean and log-variance) are blended as the
    decoded pixels are."""
    return tiled_apply(encode, image, tile_size, overlap, down=scale)
