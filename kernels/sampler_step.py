"""Fused classifier-free guidance + sampler step (see fastdiff/sampling/plan.py): one elementwise
pass that reads x, the [uncond; cond] model output, x0_prev, noise and, for plans that reach
further back, the x0 estimates two to four rows back (x0_older, stacked), and writes x_next and
x0.

The plan row is read on the device (from the coefficient table at a step index held in a device
tensor), and so may the guidance scale: a CUDA graph captured once stays correct when replayed for
every step, because nothing step-dependent is baked into the capture.

    m      = u + w (c - u)                      (Ho & Salimans 2022; m = model output without CFG)
    x0     = c1 (c0 x) + c2 m
    x_next = c3 x + c4 x0 + c5 x0_prev + c6 z + sum_k c(7+k) x0_older[k]
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import COMPILE_OPTIONS, cdiv, launch

BLOCK = 1024  # 8 fp16 values (128 bits) per thread at 4 warps


@triton.jit
def sampler_step_kernel(
    x_ptr,  # state x, numel elements
    model_ptr,  # model output: [uncond; cond] (2 * numel) with CFG, else numel elements
    coefficients_ptr,  # plan coefficients: a [S, 10] table (with step_ptr) or one [10] row
    step_ptr,  # int64 scalar: the row index into the table (read only when HAS_STEP)
    x0_prev_ptr,  # previous step's x0 (read only when HAS_PREV)
    guidance_ptr,  # scalar guidance scale (read only when GUIDANCE_FROM_PTR)
    noise_ptr,  # Gaussian noise z (read only when HAS_NOISE)
    x0_older_ptr,  # [NUM_OLDER, numel]: the x0 of two, three ... rows back
    x_next_ptr,  # out: next state
    x0_ptr,  # out: this step's x0 estimate
    guidance_value,  # guidance scale as a float (when not GUIDANCE_FROM_PTR)
    numel,
    row_stride,
    BLOCK: tl.constexpr,
    HAS_STEP: tl.constexpr,
    CFG: tl.constexpr,
    GUIDANCE_FROM_PTR: tl.constexpr,
    HAS_PREV: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    NUM_OLDER: tl.constexpr,  # 0..3
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    row = coefficients_ptr
    if HAS_STEP:
        row = coefficients_ptr + tl.load(step_ptr) * row_stride
    c0 = tl.load(row + 0).to(tl.float32)
    c1 = tl.load(row + 1).to(tl.float32)
    c2 = tl.load(row + 2).to(tl.float32)
    c3 = tl.load(row + 3).to(tl.float32)
    c4 = tl.load(row + 4).to(tl.float32)
    c5 = tl.load(row + 5).to(tl.float32)
    c6 = tl.load(row + 6).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if CFG:
        uncond = tl.load(model_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        cond = tl.load(model_ptr + numel + offs, mask=mask, other=0.0).to(tl.float32)
        if GUIDANCE_FROM_PTR:
            guidance = tl.load(guidance_ptr).to(tl.float32)
        else:
            guidance = guidance_value
        model = uncond + guidance * (cond - uncond)
    else:
        model = tl.load(model_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x0 = c1 * (c0 * x) + c2 * model
    x_next = c3 * x + c4 * x0
    if HAS_PREV:
        x_next += c5 * tl.load(x0_prev_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_NOISE:
        x_next += c6 * tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    for k in tl.static_range(NUM_OLDER):
        weight = tl.load(row + 7 + k).to(tl.float32)
        older = tl.load(x0_older_ptr + k * numel + offs, mask=mask, other=0.0)
        x_next += weight * older.to(tl.float32)
    tl.store(x_next_ptr + offs, x_next.to(x_next_ptr.dtype.element_ty), mask=mask)
    tl.store(x0_ptr + offs, x0.to(x0_ptr.dtype.element_ty), mask=mask)


def sampler_step_forward(
    x: torch.Tensor,
    model_output: torch.Tensor,
    coefficients: torch.Tensor,
    step: torch.Tensor | None,
    x0_prev: torch.Tensor | None,
    guidance: torch.Tensor | None,
    guidance_value: float,
    noise: torch.Tensor | None,
    x0_older: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch one fused step. All sample-shaped tensors share x's dense layout (the op checks);
    ``coefficients`` is [S, 10] with ``step`` an int64 scalar tensor, or one [10] row;
    ``x0_older`` [K, *x.shape] with its K slices numel apart."""
    x_next = torch.empty_like(x)
    x0 = torch.empty_like(x)
    numel = x.numel()
    if numel == 0:
        return x_next, x0
    launch(
        sampler_step_kernel,
        (cdiv(numel, BLOCK),),
        x,
        model_output,
        coefficients,
        step if step is not None else coefficients,
        x0_prev if x0_prev is not None else x,
        guidance if guidance is not None else coefficients,
        noise if noise is not None else x,
        x0_older if x0_older is not None else x,
        x_next,
        x0,
        float(guidance_value),
        numel,
        coefficients.stride(0) if coefficients.dim() == 2 else 0,
        BLOCK=BLOCK,
        HAS_STEP=step is not None,
        CFG=model_output.numel() == 2 * numel,
        GUIDANCE_FROM_PTR=guidance is not None,
        HAS_PREV=x0_prev is not None,
        HAS_NOISE=noise is not None,
        NUM_OLDER=0 if x0_older is None else x0_older.shape[0],
        num_warps=4,
        outputs=(x_next, x0),
        **COMPILE_OPTIONS,
    )
    return x_next, x0
