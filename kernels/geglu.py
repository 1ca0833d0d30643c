"""GEGLU (Shazeer 2020): out = value * gelu(gate) for x = [value | gate] on the last dimension,
with the exact erf GELU, in one elementwise pass (reads 2D, writes D values per row)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import COMPILE_OPTIONS, cdiv, gelu, launch, next_power_of_2


@triton.jit
def geglu_kernel(
    x_ptr,  # input rows (R, 2D): element (r, c) at r * stride_row + c
    y_ptr,  # output rows, contiguous (R, D)
    rows,
    width,
    stride_row,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    POLYNOMIAL_ERF: tl.constexpr,  # the erf of kernels/gelu.py: half-precision outputs only
):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (offs_r < rows)[:, None] & (offs_d < width)[None, :]
    row_offsets = offs_r.to(tl.int64)[:, None]
    value_ptrs = x_ptr + row_offsets * stride_row + offs_d[None, :]
    value = tl.load(value_ptrs, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(value_ptrs + width, mask=mask, other=0.0).to(tl.float32)
    activated = value * gelu.gelu_erf(gate, POLYNOMIAL_ERF)
    out = y_ptr + row_offsets * width + offs_d[None, :]
    tl.store(out, activated.to(y_ptr.dtype.element_ty), mask=mask)


def geglu_forward(x: torch.Tensor) -> torch.Tensor:
    """x (..., 2D) whose rows can be viewed as (R, 2D) with unit column stride; out (..., D)."""
    width = x.shape[-1] // 2
    rows = x.numel() // max(2 * width, 1)
    x2d = x.reshape(rows, 2 * width)
    y = torch.empty((*x.shape[:-1], width), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    block_d = max(2, min(next_power_of_2(width), 1024))
    block_r = max(1, min(4096 // block_d, next_power_of_2(rows)))
    grid = (cdiv(rows, block_r), cdiv(width, block_d))
    launch(
        geglu_kernel,
        grid,
        x2d,
        y,
        rows,
        width,
        x2d.stride(0),
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        POLYNOMIAL_ERF=gelu.POLYNOMIAL_ERF and x.dtype != torch.float32,
        outputs=(y,),
        **COMPILE_OPTIONS,
    )
    return y
