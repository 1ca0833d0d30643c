"""GroupNorm (+ optional SiLU): a single-pass kernel for small groups; large groups take the split
reduction of ``kernels.group_norm_split`` (partial statistics, finalize, normalize).

The input is seen as (N, C, S) through strides, S being the flattened spatial dims, so NCHW
(stride_s == 1) and channels-last (stride_c == 1) run the same kernels; Triton specialises the
stride equal to 1 and vectorises along that axis.

Small groups (the U-Net's low resolutions) take ``group_norm_single_pass_kernel``: one program
per (sample, group) that accumulates shifted sums (around the group's first element, so fp32 stays
accurate when |mean| >> std), then normalizes the tile it still holds in registers (or, for a few
tiles, re-reads them from L2), in a single launch.

Both paths take an optional per-(sample, channel) ``offset`` that is added to the input before it
is normalized, without the sum ever being written: the ResNet block's time embedding (and its
convolution's bias) enters the GroupNorm that follows it this way (``fold_biases``).
"""

from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl

from . import COMPILE_OPTIONS, compiling_ahead, group_norm_two_launch, launch, next_power_of_2
from .group_norm_split import channel_offsets, split_reduction

# Largest group (channels per group x spatial size) for the single-program-per-group kernel: a
# few of its 8192-element tiles at most, whose loads wait on each other (no software pipelining).
# Measured on an H200 (fp16, 32 groups, results/nvidia-h200.csv, 2026-11-27 20:47): single-pass
# wins at 20480-element groups (2x640x32x32: 0.0069 against 0.0078 ms NCHW, 0.0121 against
# 0.0161 NHWC) and loses at 40960 (2x320x64x64: 0.0177 against 0.0106 NCHW, 0.0377 against
# 0.0149 NHWC), so the threshold sits between the two.
SINGLE_PASS_MAX_GROUP = 32768
# Launches for the large groups: 3 (``group_norm_split``: partial sums, finalize, normalize) or 2
# (``group_norm_two_launch``: the normalizing programs finalize). Two save a launch, about 2 µs
# inside a CUDA graph on an H200, but are not yet timed: bench_group_norm's fastdiff-split2
# rows against fastdiff-split decide the default (benchmarks/NOTES.md).
SPLIT_LAUNCHES = 3
# "untried" -> "works" after its first launch, or "failed" (with a warning) if that launch raised.
_single_pass_state = "untried"


@triton.jit
def group_norm_single_pass_kernel(
    x_ptr,  # input (N, C, S) through strides
    y_ptr,  # output (N, C, S) through its own strides
    weight_ptr,  # [C] affine weight (read only when HAS_WEIGHT)
    bias_ptr,  # [C] affine bias (read only when HAS_BIAS)
    offset_ptr,  # (N, C) through strides, added to x before normalizing (read when HAS_OFFSET)
    spatial,
    num_groups,
    stride_n,
    stride_c,
    stride_s,
    out_stride_n,
    out_stride_c,
    out_stride_s,
    offset_stride_n,
    offset_stride_c,
    eps,
    CHANNELS_PER_GROUP: tl.constexpr,
    BLOCK_CG: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
    SILU: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
):
    pid = tl.program_id(0)
    sample = pid // num_groups
    group = pid % num_groups
    offs_cg = tl.arange(0, BLOCK_CG)
    mask_c = offs_cg < CHANNELS_PER_GROUP
    chan = group * CHANNELS_PER_GROUP + offs_cg
    base = x_ptr + sample.to(tl.int64) * stride_n + chan[:, None] * stride_c
    # Shifted sums around the group's first element keep the one-pass variance accurate.
    shift = tl.load(x_ptr + sample.to(tl.int64) * stride_n + group * CHANNELS_PER_GROUP * stride_c)
    shift = shift.to(tl.float32)
    add = channel_offsets(
        offset_ptr, sample, chan, mask_c, offset_stride_n, offset_stride_c, BLOCK_CG, HAS_OFFSET
    )
    if HAS_OFFSET:  # the statistics are those of x + offset: shift by x0 + offset0 instead
        shift += tl.sum(tl.where(offs_cg == 0, add, 0.0), axis=0)
    # x + offset - shift as x - pivot: one subtraction per element, offset or not.
    pivot = (shift - add)[:, None]
    if SINGLE_TILE:  # the whole group fits one tile: read it once, keep it in registers
        offs_s = tl.arange(0, BLOCK_S)
        mask = mask_c[:, None] & (offs_s < spatial)[None, :]
        values = tl.load(base + offs_s[None, :] * stride_s, mask=mask, other=0.0).to(tl.float32)
        acc_sum = tl.where(mask, values - pivot, 0.0)
        acc_sq = acc_sum * acc_sum
    else:
        acc_sum = tl.zeros([BLOCK_CG, BLOCK_S], dtype=tl.float32)
        acc_sq = tl.zeros([BLOCK_CG, BLOCK_S], dtype=tl.float32)
        for s0 in range(0, spatial, BLOCK_S):
            offs = s0 + tl.arange(0, BLOCK_S)
            tile_mask = mask_c[:, None] & (offs < spatial)[None, :]
            tile = tl.load(base + offs[None, :] * stride_s, mask=tile_mask, other=0.0)
            centred = tl.where(tile_mask, tile.to(tl.float32) - pivot, 0.0)
            acc_sum += centred
            acc_sq += centred * centred
    count = spatial * CHANNELS_PER_GROUP * 1.0
    mean_shifted = tl.sum(tl.sum(acc_sum, axis=1), axis=0) / count
    mean_square = tl.sum(tl.sum(acc_sq, axis=1), axis=0) / count
    # NaN-propagating max: a group holding an inf has a NaN variance and normalizes to NaN, as
    # the reference does (the default max drops the NaN and leaves a variance of 0 and infs).
    var = tl.maximum(mean_square - mean_shifted * mean_shifted, 0.0, tl.PropagateNan.ALL)
    # Normalizing x + offset around the group mean is normalizing x around mean - offset.
    mean = (shift + mean_shifted - add)[:, None]
    rstd = 1.0 / tl.sqrt(var + eps)
    if HAS_WEIGHT:
        scale = tl.load(weight_ptr + chan, mask=mask_c, other=0.0).to(tl.float32) * rstd
    else:
        scale = tl.zeros([BLOCK_CG], dtype=tl.float32) + rstd
    if HAS_BIAS:
        bias = tl.load(bias_ptr + chan, mask=mask_c, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BLOCK_CG], dtype=tl.float32)
    out_base = y_ptr + sample.to(tl.int64) * out_stride_n + chan[:, None] * out_stride_c
    if SINGLE_TILE:
        _normalize_store(
            values, mean, scale, bias, out_base + offs_s[None, :] * out_stride_s, mask, SILU
        )
    else:
        for s0 in range(0, spatial, BLOCK_S):  # second read: the group is mostly still in L2
            offs = s0 + tl.arange(0, BLOCK_S)
            tile_mask = mask_c[:, None] & (offs < spatial)[None, :]
            tile = tl.load(base + offs[None, :] * stride_s, mask=tile_mask, other=0.0)
            _normalize_store(
                tile.to(tl.float32),
                mean,
                scale,
                bias,
                out_base + offs[None, :] * out_stride_s,
                tile_mask,
                SILU,
            )


@triton.jit
def _normalize_store(values, mean, scale, bias, out_ptrs, mask, SILU: tl.constexpr):
    y = (values - mean) * scale[:, None] + bias[:, None]
    if SILU:
        y = y / (1.0 + tl.exp(-y))
    tl.store(out_ptrs, y.to(out_ptrs.dtype.element_ty), mask=mask)


def flat_strides(x: torch.Tensor) -> tuple[int, int, int] | None:
    """(stride_n, stride_c, stride_s) of ``x`` seen as (N, C, S), or None when the spatial dims
    cannot be flattened into one stride (a permuted or sliced spatial layout)."""
    shape, stride = x.shape, x.stride()
    inner_stride = None  # of the innermost spatial dim of size > 1
    expected = 0  # the stride the next outer such dim needs to flatten with it
    for d in range(len(shape) - 1, 1, -1):
        if shape[d] == 1:
            continue
        if inner_stride is None:
            inner_stride = stride[d]
        elif stride[d] != expected:
            return None
        expected = stride[d] * shape[d]
    return stride[0], stride[1], 1 if inner_stride is None else inner_stride


def offset_strides_of(offset: torch.Tensor | None) -> tuple[int, int]:
    """(sample, channel) strides of an (N, C) or (C,) offset; a (C,) one repeats for every
    sample (sample stride 0)."""
    if offset is None:
        return 0, 0
    if offset.dim() == 1:
        return 0, offset.stride(0)
    return (offset.stride(0) if offset.shape[0] > 1 else 0), offset.stride(1)


def group_norm_forward(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    silu: bool,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the kernels; the output keeps the input's memory format (NCHW or NHWC).

    ``offset`` ((N, C) or (C,), any strides) is added to ``x`` per sample and channel before the
    normalization, inside the kernels.

    Groups of at most SINGLE_PASS_MAX_GROUP elements take the one-launch single-pass kernel (a
    few 8192-element tiles at most, so its unpipelined loop stays short),
    larger ones the split reduction (many programs per group) in three launches, or in two
    with ``SPLIT_LAUNCHES = 2`` where ``group_norm_two_launch.supports`` the group size."""
    strides = flat_strides(x)
    if strides is None:
        raise ValueError(f"group_norm kernel: spatial dims of stride {x.stride()} do not flatten")
    num_samples, channels = x.shape[0], x.shape[1]
    spatial = x.numel() // max(1, num_samples * channels)
    y = torch.empty_like(x)
    out_strides = strides if y.stride() == x.stride() else flat_strides(y)
    if out_strides is None:  # empty_like of a non-dense input: fall back to a contiguous output
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        out_strides = flat_strides(y)
    if x.numel() == 0:
        return y
    per_group = channels // num_groups
    offset_strides = offset_strides_of(offset)
    global _single_pass_state
    small = per_group * spatial <= SINGLE_PASS_MAX_GROUP and per_group <= 512
    if small and _single_pass_state != "failed":
        # Small groups: one program per group, one launch (the three-kernel path is launch-bound
        # there).
        block_cg = max(2, next_power_of_2(per_group))
        block_s = max(2, min(next_power_of_2(spatial), max(16, 8192 // block_cg)))
        try:
            launch(
                group_norm_single_pass_kernel,
                (num_samples * num_groups,),
                x,
                y,
                weight if weight is not None else y,
                bias if bias is not None else y,
                offset if offset is not None else y,
                spatial,
                num_groups,
                *strides,
                *out_strides,
                *offset_strides,
                float(eps),
                CHANNELS_PER_GROUP=per_group,
                BLOCK_CG=block_cg,
                BLOCK_S=block_s,
                HAS_WEIGHT=weight is not None,
                HAS_BIAS=bias is not None,
                HAS_OFFSET=offset is not None,
                SILU=bool(silu),
                SINGLE_TILE=block_s >= spatial,
                num_warps=8,
                outputs=(y,),
                **COMPILE_OPTIONS,
            )
            if not compiling_ahead():  # compiled ahead, it has not been run yet
                _single_pass_state = "works"
            return y
        except Exception as error:
            if _single_pass_state == "works":
                raise  # it compiled and ran before: a real error, not a compiler refusal
            _single_pass_state = "failed"
            warnings.warn(
                f"group_norm: the single-pass kernel failed on first use ({type(error).__name__}: "
                f"{str(error)[:200]}); using the split-reduction kernels from now on",
                RuntimeWarning,
                stacklevel=2,
            )
    reduction = split_reduction
    if SPLIT_LAUNCHES == 2 and group_norm_two_launch.supports(channels, num_groups):
        reduction = group_norm_two_launch.two_launch_reduction
    reduction(
        x, y, strides, out_strides, num_groups, weight, bias, eps, silu, offset, offset_strides
    )
    return y
