"""LayerNorm over the last dimension: one tile of BLOCK_R rows x BLOCK_D columns per program, the
whole row in registers, so mean and variance are two exact passes over registers (no E[x^2]
cancellation) and x is read once.

With a residual, the kernel first adds it (in fp32) and writes the sum as a second output: the
transformer block's ``x = attention(...) + x`` followed by the next LayerNorm, in one pass. A
``sum_bias`` is added to the written sum only (not to what is normalized): the bias of a linear
layer whose product is then accumulated into the sum in place. An ``x_bias`` is added to x
before anything else: the bias of the linear layer that produced x, left out of its GEMM."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import COMPILE_OPTIONS, cdiv, launch, next_power_of_2

MAX_ROW = 8192  # one row must fit a program's registers


@triton.jit
def layer_norm_kernel(
    x_ptr,  # input rows: element (r, d) at r * stride_row + d
    y_ptr,  # output rows, contiguous (R, D)
    weight_ptr,  # [D] affine weight (read only when HAS_WEIGHT)
    bias_ptr,  # [D] affine bias (read only when HAS_BIAS)
    residual_ptr,  # rows added to x first: (r, d) at r * stride_residual_row + d (HAS_RESIDUAL)
    sum_ptr,  # out: x + residual (+ sum_bias), contiguous (R, D) (written when HAS_RESIDUAL)
    sum_bias_ptr,  # [D] added to the written sum only (read when HAS_SUM_BIAS)
    x_bias_ptr,  # [D] added to x before anything else (read when HAS_X_BIAS)
    rows,
    width,
    stride_row,
    stride_residual_row,
    eps,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_SUM_BIAS: tl.constexpr,
    HAS_X_BIAS: tl.constexpr,
):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < width
    mask = (offs_r < rows)[:, None] & mask_d[None, :]
    row_offsets = offs_r.to(tl.int64)[:, None]
    x = tl.load(x_ptr + row_offsets * stride_row + offs_d[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    if HAS_X_BIAS:
        x += tl.load(x_bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        residual_ptrs = residual_ptr + row_offsets * stride_residual_row + offs_d[None, :]
        x += tl.load(residual_ptrs, mask=mask, other=0.0).to(tl.float32)
        sum_ptrs = sum_ptr + row_offsets * width + offs_d[None, :]
        if HAS_SUM_BIAS:
            sum_bias = tl.load(sum_bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            tl.store(sum_ptrs, (x + sum_bias[None, :]).to(sum_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(sum_ptrs, x.to(sum_ptr.dtype.element_ty), mask=mask)
    mean = tl.sum(x, axis=1) / width
    centred = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(centred * centred, axis=1) / width
    y = centred * (1.0 / tl.sqrt(var + eps))[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(weight_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    out = y_ptr + row_offsets * width + offs_d[None, :]
    tl.store(out, y.to(y_ptr.dtype.element_ty), mask=mask)


def layer_norm_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
    sum_bias: torch.Tensor | None = None,
    x_bias: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x (..., D) whose rows can be viewed as (R, D) with unit column stride; contiguous output.

    With ``residual`` (x's shape, rows viewable the same way): returns (x + residual, the
    LayerNorm of that sum), both contiguous; the sum is normalized before it is rounded.
    ``sum_bias`` ((D,), with a residual) is added to the returned sum, not to the normalized one.
    ``x_bias`` ((D,), with a residual) is added to x first: to both."""
    width = x.shape[-1]
    rows = x.numel() // max(width, 1)
    x2d = x.reshape(rows, width)  # a view for the inputs the op sends here
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    total = None
    if residual is not None:
        residual = residual.reshape(rows, width)
        total = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.numel() == 0:
        return y if residual is None else (total, y)
    block_d = max(2, next_power_of_2(width))
    block_r = max(1, min(4096 // block_d, next_power_of_2(rows)))
    launch(
        layer_norm_kernel,
        (cdiv(rows, block_r),),
        x2d,
        y,
        weight if weight is not None else y,
        bias if bias is not None else y,
        residual if residual is not None else y,
        total if total is not None else y,
        sum_bias if sum_bias is not None else y,
        x_bias if x_bias is not None else y,
        rows,
        width,
        x2d.stride(0),
        residual.stride(0) if residual is not None else 0,
        float(eps),
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None,
        HAS_SUM_BIAS=residual is not None and sum_bias is not None,
        HAS_X_BIAS=residual is not None and x_bias is not None,
        num_warps=4 if block_d <= 1024 else 8,
        outputs=(y,) if total is None else (y, total),
        **COMPILE_OPTIONS,
    )
    return y if residual is None else (total, y)
