"""3x3 convolution (stride 1, zero padding 1) of a channels-last input as an implicit GEMM whose
reduction is split over programs: for the U-Net's smallest feature maps.

At SD1.5's 8x8 level a ResNet convolution is a (B*H*W = 128) x (K = 9 * 1280) x (N = 1280) GEMM:
one or ten 128 x 128 output tiles, too few to fill an H200's 132 SMs, and cuDNN ran these at
160 TFLOP/s (23 µs a call, 11 calls a step; benchmarks/NOTES.md). Here the K range (nine taps
times the channel blocks) is split into SPLITS parts, each program summing one part of one
output tile into fp32 partials; a second kernel adds the parts and the bias and writes the
output. With one part the first kernel writes the output itself.

Row m of the GEMM is output pixel (b, y, x); column block k of tap (ky, kx) reads input pixel
(b, y + ky - 1, x + kx - 1), zero outside the image, channels [c0, c0 + BLOCK_K), which are
contiguous in a channels-last input.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import COMPILE_OPTIONS, cdiv, launch

MAX_ROWS = 2048  # B*H*W up to which this kernel is offered (the small maps it is for)


class Config(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


HALF_CONFIG = Config(128, 128, 64, 8, 3)
SMALL_HALF_CONFIG = Config(64, 128, 64, 4, 3)  # 64 rows or fewer (a batch-1 8x8 map)
FP32_CONFIG = Config(64, 32, 32, 4, 2)  # ieee dots on the FMA units: small tiles, no spills
INTERPRETER_PROGRAMS = 4  # the CPU interpreter's stand-in for the SM count (split-K is tested)


@triton.jit
def conv3x3_kernel(
    x_ptr,  # input (B, C, H, W), channels-last: (b, c, y, x) at b*sxb + c*sxc + y*sxy + x*sxx
    w_ptr,  # weight (N, C, 3, 3): (n, c, ky, kx) at n*swn + c*swc + ky*swy + kx*swx
    bias_ptr,  # [N] (read when HAS_BIAS and the output is final)
    out_ptr,  # FINAL: the output rows (M, N) contiguous; else fp32 partials (SPLITS, M, N)
    height,
    width,
    rows,
    channels,
    out_channels,
    blocks_per_split,  # column blocks (tap, channel block) per part of the reduction
    sxb,
    sxc,
    sxy,
    sxx,
    swn,
    swc,
    swy,
    swx,
    HAS_BIAS: tl.constexpr,
    FINAL: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee" for fp32 inputs
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    part = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < rows
    mask_n = offs_n < out_channels
    pixels = height * width
    image = offs_m // pixels
    y = (offs_m % pixels) // width
    x = offs_m % width
    image_offsets = image.to(tl.int64) * sxb
    n_offsets = offs_n.to(tl.int64)[:, None] * swn

    channel_blocks = tl.cdiv(channels, BLOCK_K)
    first = part * blocks_per_split
    last = tl.minimum(first + blocks_per_split, 9 * channel_blocks)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for block in range(first, last):
        tap = block // channel_blocks
        ky = tap // 3
        kx = tap % 3
        c = (block % channel_blocks) * BLOCK_K + offs_k
        mask_c = c < channels
        iy = y + ky - 1
        ix = x + kx - 1
        inside = mask_m & (iy >= 0) & (iy < height) & (ix >= 0) & (ix < width)
        pixel_offsets = image_offsets + iy.to(tl.int64) * sxy + ix.to(tl.int64) * sxx
        a = tl.load(
            x_ptr + pixel_offsets[:, None] + c[None, :].to(tl.int64) * sxc,
            mask=inside[:, None] & mask_c[None, :],
            other=0.0,
        )
        w = tl.load(
            w_ptr + n_offsets + c[None, :].to(tl.int64) * swc + ky * swy + kx * swx,
            mask=mask_n[:, None] & mask_c[None, :],
            other=0.0,
        )
        acc = tl.dot(a, tl.trans(w), acc, input_precision=PRECISION)

    out_mask = mask_m[:, None] & mask_n[None, :]
    offsets = offs_m.to(tl.int64)[:, None] * out_channels + offs_n[None, :]
    if FINAL:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        part_offset = part.to(tl.int64) * rows * out_channels
        tl.store(out_ptr + part_offset + offsets, acc, mask=out_mask)


@triton.jit
def conv3x3_sum_kernel(
    parts_ptr,  # fp32 partial sums (SPLITS, M, N), contiguous
    bias_ptr,  # [N] (read when HAS_BIAS)
    out_ptr,  # output rows (M, N), contiguous
    count,  # M * N
    out_channels,
    SPLITS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < count
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for part in tl.static_range(SPLITS):  # a fixed order: the same sum on every run
        total += tl.load(parts_ptr + part * count + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        total += tl.load(bias_ptr + offs % out_channels, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=mask)


def choose_config(dtype: torch.dtype, rows: int) -> Config:
    if dtype == torch.float32:
        return FP32_CONFIG
    return SMALL_HALF_CONFIG if rows <= 64 else HALF_CONFIG


def programs_available(device: torch.device) -> int:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _multiprocessors(index)
    return INTERPRETER_PROGRAMS


@functools.cache
def _multiprocessors(index: int) -> int:
    """The SM count of CUDA device ``index``, asked once per process (not at every launch)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def split_count(tiles: int, blocks: int, programs: int) -> int:
    """Parts of the reduction so that tiles x parts fills the programs once, each part at least
    one column block; then no part is empty (parts = ceil(blocks / ceil(blocks / parts)))."""
    wanted = max(1, min(blocks, programs // max(tiles, 1)))
    per_split = cdiv(blocks, wanted)
    return cdiv(blocks, per_split)


def conv3x3_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x (B, C, H, W) channels-last, weight (N, C, 3, 3) (any strides), bias (N,) contiguous or
    None, one dtype and device; B*H*W <= MAX_ROWS. Returns (B, N, H, W), channels-last."""
    batch, channels, height, width = x.shape
    out_channels = weight.shape[0]
    rows = batch * height * width
    out = torch.empty(
        (batch, out_channels, height, width),
        dtype=x.dtype,
        device=x.device,
        memory_format=torch.channels_last,
    )
    if out.numel() == 0:
        return out
    config = choose_config(x.dtype, rows)
    tiles_m = cdiv(rows, config.block_m)
    tiles_n = cdiv(out_channels, config.block_n)
    blocks = 9 * cdiv(channels, config.block_k)
    splits = split_count(tiles_m * tiles_n, blocks, programs_available(x.device))
    per_split = cdiv(blocks, splits)
    final = splits == 1
    target = out if final else torch.empty((splits, rows, out_channels), device=x.device)
    launch(
        conv3x3_kernel,
        (tiles_m, tiles_n, splits),
        x,
        weight,
        bias if bias is not None else weight,
        target,
        height,
        width,
        rows,
        channels,
        out_channels,
        per_split,
        *x.stride(),
        *weight.stride(),
        HAS_BIAS=bias is not None,
        FINAL=final,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        outputs=(target,),
        **COMPILE_OPTIONS,
    )
    if not final:
        count = rows * out_channels
        block = 1024
        launch(
            conv3x3_sum_kernel,
            (cdiv(count, block),),
            target,
            bias if bias is not None else target,
            out,
            count,
            out_channels,
            SPLITS=splits,
            HAS_BIAS=bias is not None,
            BLOCK=block,
            num_warps=4,
            outputs=(out,),
            **COMPILE_OPTIONS,
        )
    return out
