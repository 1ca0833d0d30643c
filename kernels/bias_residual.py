"""A ResNet block's end on channels-last maps: ``x + h + bias`` with ``bias`` per channel, in one
pass (reads x and h, writes the sum) where PyTorch needs two: the convolution's bias added to
``h`` in place, then the residual addition.

Rows are pixels, columns channels; each program adds a block of rows of one channel block, in
float32, rounded once to the output's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import COMPILE_OPTIONS, cdiv, launch, next_power_of_2


@triton.jit
def bias_residual_kernel(
    x_ptr,  # (rows, channels), row-major
    h_ptr,  # (rows, channels), row-major
    bias_ptr,  # (channels,)
    out_ptr,  # (rows, channels), row-major
    rows,
    channels,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < channels
    mask = (offs_r < rows)[:, None] & mask_c[None, :]
    offsets = offs_r.to(tl.int64)[:, None] * channels + offs_c[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    h = tl.load(h_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    total = x + h + bias[None, :]
    tl.store(out_ptr + offsets, total.to(out_ptr.dtype.element_ty), mask=mask)


def bias_residual_forward(x: torch.Tensor, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``x + h + bias[None, :, None, None]`` for channels-last (B, C, H, W) ``x`` and ``h`` of one
    shape and dtype; the output channels-last in that dtype."""
    batch, channels, height, width = x.shape
    out = torch.empty_like(x, memory_format=torch.channels_last)
    rows = batch * height * width
    if out.numel() == 0:
        return out
    block_c = max(8, min(128, next_power_of_2(channels)))
    # 4096 elements a program: x and h in float32 take 64 registers a thread at 4 warps.
    block_r = max(1, min(4096 // block_c, next_power_of_2(rows)))
    grid = (cdiv(rows, block_r), cdiv(channels, block_c))
    launch(
        bias_residual_kernel,
        grid,
        x,
        h,
        bias,
        out,
        rows,
        channels,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        outputs=(out,),
        **COMPILE_OPTIONS,
    )
    return out
