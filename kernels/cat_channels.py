"""Concatenation of two channels-last maps along channels: the U-Net up blocks' skip
connections, ``torch.cat([x, skip], dim=1)`` on (B, C, H, W) tensors laid out as (B, H, W, C).

In that layout every pixel is a row: the output row is ``a``'s row followed by ``b``'s. Each
program copies a block of rows of one channel block of one input (programs never straddle the
boundary between the two), so the loads and stores are whole vectors along a row wherever the
row lengths allow (16 bytes for fp16 rows of a multiple of 8 channels, as Triton specialises
integer arguments divisible by 16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import COMPILE_OPTIONS, cdiv, launch, next_power_of_2


@triton.jit
def cat_channels_kernel(
    a_ptr,  # (rows, channels_a), row-major
    b_ptr,  # (rows, channels_b), row-major
    out_ptr,  # (rows, channels_a + channels_b), row-major
    rows,
    channels_a,
    channels_b,
    blocks_a,  # channel blocks of a; the programs after them copy b
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    block = tl.program_id(1)
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row = offs_r.to(tl.int64)[:, None]
    width = channels_a + channels_b
    if block < blocks_a:
        offs_c = block * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (offs_r < rows)[:, None] & (offs_c < channels_a)[None, :]
        values = tl.load(a_ptr + row * channels_a + offs_c[None, :], mask=mask)
        tl.store(out_ptr + row * width + offs_c[None, :], values, mask=mask)
    else:
        offs_c = (block - blocks_a) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (offs_r < rows)[:, None] & (offs_c < channels_b)[None, :]
        values = tl.load(b_ptr + row * channels_b + offs_c[None, :], mask=mask)
        tl.store(out_ptr + row * width + channels_a + offs_c[None, :], values, mask=mask)


def block_sizes(channels_a: int, channels_b: int, rows: int, itemsize: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C): a channel block of at most 128 elements and 16 KB a program (sm_90,
    4 warps: 64 registers a thread in every dtype), fewer rows where the map is small."""
    block_c = max(8, min(128, next_power_of_2(max(channels_a, channels_b))))
    block_r = max(1, min(16384 // (itemsize * block_c), next_power_of_2(max(rows, 1))))
    return block_r, block_c


def cat_channels_forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.cat([a, b], dim=1)`` for channels-last (B, C, H, W) ``a`` and ``b`` of one dtype,
    device, batch and map size; the output channels-last."""
    batch, channels_a, height, width = a.shape
    channels_b = b.shape[1]
    out = torch.empty(
        (batch, channels_a + channels_b, height, width),
        dtype=a.dtype,
        device=a.device,
        memory_format=torch.channels_last,
    )
    rows = batch * height * width
    if out.numel() == 0:
        return out
    block_r, block_c = block_sizes(channels_a, channels_b, rows, a.element_size())
    blocks_a = cdiv(channels_a, block_c)
    grid = (cdiv(rows, block_r), blocks_a + cdiv(channels_b, block_c))
    launch(
        cat_channels_kernel,
        grid,
        a,
        b,
        out,
        rows,
        channels_a,
        channels_b,
        blocks_a,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        outputs=(out,),
        **COMPILE_OPTIONS,
    )
    return out
