"""The feed-forward's first half in one kernel: out = value * gelu(gate), where [value | gate] =
x @ Wᵀ + b is the GEGLU projection (Shazeer 2020), with the exact erf GELU.

Unfused, the projection writes its (M, 2I) result and the GEGLU kernel reads it back: at SD1.5's
64×64 level, 42 MB each way per call. Here each program computes a BLOCK_M × BLOCK_N tile of the
value columns and the same tile of the gate columns (two fp32 accumulators over the whole K
loop), and writes only the (M, I) product.

The weight is read as ``nn.Linear`` stores it, (2I, K) with the value rows first, so the op
needs no copy of it. Tiles are visited in groups of GROUP_M row blocks, so the weight columns a
group shares stay in L2 while its row blocks pass.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import COMPILE_OPTIONS, cdiv, gelu, launch


class Config(NamedTuple):
    block_m: int
    block_n: int  # columns of the value (and as many of the gate) per program
    block_k: int
    num_warps: int
    num_stages: int


# fp16/bf16: wgmma tiles on sm_90. The first is the default; bench_linear_geglu's
# ``fastdiff-<name>`` rows time the others against it (no autotuning at run time: each new shape
# would cost seconds of warm-up).
CONFIGS = {
    "128x64": Config(128, 64, 64, 8, 3),
    "128x128": Config(128, 128, 64, 8, 3),
    "64x64": Config(64, 64, 64, 4, 4),
}
DEFAULT_CONFIG = "128x64"
# fp32 takes ieee dots on the FMA units: smaller tiles, so the accumulators do not spill.
FP32_CONFIG = Config(64, 32, 32, 4, 2)

# A config name from CONFIGS to use for every fp16/bf16 call instead of DEFAULT_CONFIG (the
# benchmark's variant rows set it), or None.
config_override: str | None = None


@triton.jit
def linear_geglu_kernel(
    x_ptr,  # input rows (M, K): element (m, k) at m * stride_x_row + k
    value_w_ptr,  # the weight's value rows (I, K): (n, k) at n * stride_w_row + k
    gate_w_ptr,  # its gate rows (I, K), the same strides
    b_ptr,  # bias (2I,), value then gate (read when HAS_BIAS)
    y_ptr,  # output (M, I), contiguous
    rows,
    inner,
    depth,
    stride_x_row,
    stride_w_row,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (not TF32, as eager fp32 computes)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    POLYNOMIAL_ERF: tl.constexpr,  # the erf of kernels/gelu.py: half-precision outputs only
):
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(rows, BLOCK_M)
    blocks_n = tl.cdiv(inner, BLOCK_N)
    per_group = GROUP_M * blocks_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < rows
    mask_n = offs_n < inner
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_x_row + offs_k[None, :]
    # (BLOCK_N, BLOCK_K) tiles of the value and gate rows; the dot takes their transposes.
    w_offsets = offs_n.to(tl.int64)[:, None] * stride_w_row + offs_k[None, :]
    value_ptrs = value_w_ptr + w_offsets
    gate_ptrs = gate_w_ptr + w_offsets

    value = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, depth, BLOCK_K):
        mask_k = offs_k < depth - start
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w_mask = mask_n[:, None] & mask_k[None, :]
        w_value = tl.load(value_ptrs, mask=w_mask, other=0.0)
        w_gate = tl.load(gate_ptrs, mask=w_mask, other=0.0)
        value = tl.dot(x, tl.trans(w_value), value, input_precision=PRECISION)
        gate = tl.dot(x, tl.trans(w_gate), gate, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        value_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K

    if HAS_BIAS:
        value += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        gate += tl.load(b_ptr + inner + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    activated = value * gelu.gelu_erf(gate, POLYNOMIAL_ERF)
    out = y_ptr + offs_m.to(tl.int64)[:, None] * inner + offs_n[None, :]
    tl.store(out, activated.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def choose_config(dtype: torch.dtype) -> Config:
    if dtype == torch.float32:
        return FP32_CONFIG
    return CONFIGS[config_override or DEFAULT_CONFIG]


def linear_geglu_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x (..., K), K >= 1, whose rows can be viewed as (M, K) with unit column stride; weight
    (2I, K) with unit column stride; bias (2I,) contiguous or None; all one dtype and device.
    Returns (..., I), contiguous."""
    depth = x.shape[-1]
    inner = weight.shape[0] // 2
    rows = x.numel() // max(depth, 1)
    y = torch.empty((*x.shape[:-1], inner), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    x2d = x.reshape(rows, depth)  # a view for the inputs the op sends here
    config = choose_config(x.dtype)
    grid = (cdiv(rows, config.block_m) * cdiv(inner, config.block_n),)
    launch(
        linear_geglu_kernel,
        grid,
        x2d,
        weight[:inner],
        weight[inner:],
        bias if bias is not None else weight,
        y,
        rows,
        inner,
        depth,
        x2d.stride(0),
        weight.stride(0),
        HAS_BIAS=bias is not None,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        GROUP_M=8,
        POLYNOMIAL_ERF=gelu.POLYNOMIAL_ERF and x.dtype != torch.float32,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        outputs=(y,),
        **COMPILE_OPTIONS,
    )
    return y
