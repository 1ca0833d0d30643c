"""GroupNorm (+ optional SiLU) for large groups: a split reduction in three launches.

The input is seen as (N, C, S) through strides (see ``kernels.group_norm``).

1. ``group_norm_partial_stats_kernel``: many programs per group. Each reads one (channel block,
   spatial range) tile and writes per-channel sums of ``x - shift`` and ``(x - shift)^2``, the
   shift being the channel's first element: shifted sums keep fp32 accurate when |mean| >> std.
2. ``group_norm_finalize_kernel``: one program per (sample, group) adds the partial sums, merges
   the per-channel moments into the group's mean and variance (Chan et al. 1979) and writes the
   mean, rstd * weight and bias per (sample, channel). With an offset (added to x before the
   normalization) the channel means move by it, the shifted partial sums do not; the mean written
   is the group's less the channel's offset, so step 3 reads x alone.
3. ``group_norm_apply_kernel``: y = (x - mean) * scale + bias, then SiLU if asked; one read and
   one write.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import COMPILE_OPTIONS, cdiv, launch, next_power_of_2


@triton.jit
def channel_offsets(
    offset_ptr,
    sample,
    chan,
    mask,
    stride_n,
    stride_c,
    BLOCK: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
):
    """The fp32 offsets of channels ``chan`` of ``sample`` (added to x before normalizing), or
    zeros without an offset."""
    if HAS_OFFSET:
        ptrs = offset_ptr + sample * stride_n + chan * stride_c
        add = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    else:
        add = tl.zeros([BLOCK], dtype=tl.float32)
    return add


@triton.jit
def group_norm_partial_stats_kernel(
    x_ptr,  # input, element (n, c, s) at n * stride_n + c * stride_c + s * stride_s
    partial_ptr,  # fp32 [2, N, splits, C]: shifted sums, then shifted sums of squares
    num_samples,
    channels,
    spatial,
    stride_n,
    stride_c,
    stride_s,
    splits,
    tiles_per_split,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    split = tl.program_id(0)
    channel_block = tl.program_id(1)
    sample = tl.program_id(2)
    offs_c = channel_block * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < channels
    base = x_ptr + sample.to(tl.int64) * stride_n
    # The channel's first element is the shift: a sample of the data, so close to its mean.
    shift = tl.load(base + offs_c * stride_c, mask=mask_c, other=0.0).to(tl.float32)
    acc_sum = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    acc_sq = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    s_begin = split * tiles_per_split * BLOCK_S
    for tile in range(0, tiles_per_split):
        offs_s = s_begin + tile * BLOCK_S + tl.arange(0, BLOCK_S)
        mask = mask_c[:, None] & (offs_s < spatial)[None, :]
        ptrs = base + offs_c[:, None] * stride_c + offs_s[None, :] * stride_s
        values = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        centred = tl.where(mask, values - shift[:, None], 0.0)
        acc_sum += centred
        acc_sq += centred * centred
    out = (sample * splits + split) * channels + offs_c
    tl.store(partial_ptr + out, tl.sum(acc_sum, axis=1), mask=mask_c)
    second = num_samples * splits * channels
    tl.store(partial_ptr + second + out, tl.sum(acc_sq, axis=1), mask=mask_c)


@triton.jit
def group_norm_finalize_kernel(
    x_ptr,  # input (only each channel's first element, the shift used by the partial sums)
    partial_ptr,  # fp32 [2, N, splits, C] from group_norm_partial_stats_kernel
    weight_ptr,  # [C] affine weight (read only when HAS_WEIGHT)
    bias_ptr,  # [C] affine bias (read only when HAS_BIAS)
    offset_ptr,  # (N, C) through strides, added to x before normalizing (read when HAS_OFFSET)
    folded_ptr,  # fp32 [3, N, C] out: group mean, rstd * weight, bias (per sample and channel)
    num_samples,
    channels,
    spatial,
    num_groups,
    stride_n,
    stride_c,
    offset_stride_n,
    offset_stride_c,
    splits,
    eps,
    CHANNELS_PER_GROUP: tl.constexpr,
    BLOCK_CG: tl.constexpr,
    BLOCK_SPLIT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
):
    pid = tl.program_id(0)
    sample = pid // num_groups
    group = pid % num_groups
    offs_cg = tl.arange(0, BLOCK_CG)
    mask_cg = offs_cg < CHANNELS_PER_GROUP
    chan = group * CHANNELS_PER_GROUP + offs_cg
    offs_split = tl.arange(0, BLOCK_SPLIT)
    sum1 = tl.zeros([BLOCK_CG], dtype=tl.float32)
    sum2 = tl.zeros([BLOCK_CG], dtype=tl.float32)
    second = num_samples * splits * channels
    for split0 in range(0, splits, BLOCK_SPLIT):
        split = split0 + offs_split
        mask = (split < splits)[:, None] & mask_cg[None, :]
        idx = (sample * splits + split)[:, None] * channels + chan[None, :]
        sum1 += tl.sum(tl.load(partial_ptr + idx, mask=mask, other=0.0), axis=0)
        sum2 += tl.sum(tl.load(partial_ptr + second + idx, mask=mask, other=0.0), axis=0)
    base = x_ptr + sample.to(tl.int64) * stride_n
    first = tl.load(base + chan * stride_c, mask=mask_cg, other=0.0).to(tl.float32)
    add = channel_offsets(
        offset_ptr, sample, chan, mask_cg, offset_stride_n, offset_stride_c, BLOCK_CG, HAS_OFFSET
    )
    count = spatial * 1.0  # int arg (a constexpr when it equals 1)
    chan_mean = first + add + sum1 / count
    chan_m2 = sum2 - sum1 * sum1 / count
    # Merge the channels' (mean, M2) into the group's: M2 = sum M2_c + S * sum (mean_c - mean)^2.
    mean = tl.sum(tl.where(mask_cg, chan_mean, 0.0), axis=0) / CHANNELS_PER_GROUP
    dev = tl.where(mask_cg, chan_mean - mean, 0.0)
    m2 = tl.sum(tl.where(mask_cg, chan_m2, 0.0), axis=0) + count * tl.sum(dev * dev, axis=0)
    # NaN-propagating: a group holding an inf normalizes to NaN, as the reference does.
    var = tl.maximum(m2 / (count * CHANNELS_PER_GROUP), 0.0, tl.PropagateNan.ALL)
    rstd = 1.0 / tl.sqrt(var + eps)
    if HAS_WEIGHT:
        weight = tl.load(weight_ptr + chan, mask=mask_cg, other=1.0).to(tl.float32)
    else:
        weight = tl.full([BLOCK_CG], 1.0, dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + chan, mask=mask_cg, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BLOCK_CG], dtype=tl.float32)
    out = sample * channels + chan
    plane = num_samples * channels
    # Normalizing x + offset around the group mean is normalizing x around mean - offset.
    tl.store(folded_ptr + out, mean - add, mask=mask_cg)
    tl.store(folded_ptr + plane + out, rstd * weight, mask=mask_cg)
    tl.store(folded_ptr + 2 * plane + out, bias, mask=mask_cg)


@triton.jit
def group_norm_apply_kernel(
    x_ptr,  # input (N, C, S) through strides
    y_ptr,  # output (N, C, S) through its own strides (same memory format as the input)
    folded_ptr,  # fp32 [3, N, C]: group mean, rstd * weight, bias
    num_samples,
    channels,
    spatial,
    stride_n,
    stride_c,
    stride_s,
    out_stride_n,
    out_stride_c,
    out_stride_s,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    SILU: tl.constexpr,
):
    spatial_block = tl.program_id(0)
    channel_block = tl.program_id(1)
    sample = tl.program_id(2)
    offs_c = channel_block * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_s = spatial_block * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_c = offs_c < channels
    mask = mask_c[:, None] & (offs_s < spatial)[None, :]
    row = folded_ptr + sample * channels + offs_c
    plane = num_samples * channels
    mean = tl.load(row, mask=mask_c, other=0.0)
    scale = tl.load(row + plane, mask=mask_c, other=0.0)
    bias = tl.load(row + 2 * plane, mask=mask_c, other=0.0)
    x_ptrs = x_ptr + sample.to(tl.int64) * stride_n + offs_c[:, None] * stride_c
    values = tl.load(x_ptrs + offs_s[None, :] * stride_s, mask=mask, other=0.0).to(tl.float32)
    # (x - mean) * scale + bias rather than x * scale + folded shift: no cancellation when
    # |mean| >> std, for the price of one subtraction in a memory-bound kernel.
    y = (values - mean[:, None]) * scale[:, None] + bias[:, None]
    if SILU:
        y = y / (1.0 + tl.exp(-y))
    y_ptrs = y_ptr + sample.to(tl.int64) * out_stride_n + offs_c[:, None] * out_stride_c
    tl.store(y_ptrs + offs_s[None, :] * out_stride_s, y.to(y_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=8)
def multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def tile_shape(channels: int, spatial: int, channel_contiguous: bool) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_S) of about 4096 elements, long along the contiguous axis."""
    if channel_contiguous:
        block_c = min(next_power_of_2(channels), 128)
        divides = channels & -channels  # largest power of two dividing the channel count
        if channels % block_c and divides >= 32:
            block_c = divides  # e.g. 320 channels: 5 blocks of 64 rather than 3 of 128
        block_s = max(2, min(4096 // block_c, next_power_of_2(spatial)))
    else:
        block_s = max(2, min(next_power_of_2(spatial), 1024))
        block_c = max(2, min(4096 // block_s, next_power_of_2(channels)))
    return block_c, block_s


def split_reduction(
    x: torch.Tensor,
    y: torch.Tensor,
    strides: tuple[int, int, int],
    out_strides: tuple[int, int, int],
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    silu: bool,
    offset: torch.Tensor | None = None,
    offset_strides: tuple[int, int] = (0, 0),
) -> None:
    """Normalize ``x`` (N, C, S through ``strides``) plus ``offset`` (per sample and channel,
    through ``offset_strides``) into ``y`` with the three kernels."""
    num_samples, channels = x.shape[0], x.shape[1]
    spatial = x.numel() // max(1, num_samples * channels)
    per_group = channels // num_groups
    channel_contiguous = strides[1] == 1 and strides[2] != 1
    block_c, block_s = tile_shape(channels, spatial, channel_contiguous)
    channel_blocks = cdiv(channels, block_c)
    spatial_tiles = cdiv(spatial, block_s)
    # Enough programs to fill every multiprocessor a few times over, whatever N * C is.
    wanted_splits = cdiv(4 * multiprocessors(x.device), num_samples * channel_blocks)
    tiles_per_split = max(1, cdiv(spatial_tiles, wanted_splits))
    splits = cdiv(spatial_tiles, tiles_per_split)

    partial = torch.empty(2 * num_samples * splits * channels, dtype=torch.float32, device=x.device)
    launch(
        group_norm_partial_stats_kernel,
        (splits, channel_blocks, num_samples),
        x,
        partial,
        num_samples,
        channels,
        spatial,
        *strides,
        splits,
        tiles_per_split,
        BLOCK_C=block_c,
        BLOCK_S=block_s,
        # Two fp32 accumulators of a 4096-element tile: at 4 warps (64 values per thread) the NCHW
        # fp16 variant spilled 8 bytes with sm_90's ptxas (benchmarks/triton_sm90.py).
        num_warps=8,
        outputs=(partial,),
        **COMPILE_OPTIONS,
    )
    block_cg = max(2, next_power_of_2(per_group))
    block_split = max(2, min(next_power_of_2(splits), max(2, 4096 // block_cg)))
    folded = torch.empty(3 * num_samples * channels, dtype=torch.float32, device=x.device)
    launch(
        group_norm_finalize_kernel,
        (num_samples * num_groups,),
        x,
        partial,
        weight if weight is not None else folded,
        bias if bias is not None else folded,
        offset if offset is not None else folded,
        folded,
        num_samples,
        channels,
        spatial,
        num_groups,
        strides[0],
        strides[1],
        *offset_strides,
        splits,
        float(eps),
        CHANNELS_PER_GROUP=per_group,
        BLOCK_CG=block_cg,
        BLOCK_SPLIT=block_split,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        HAS_OFFSET=offset is not None,
        outputs=(folded,),
        **COMPILE_OPTIONS,
    )
    launch(
        group_norm_apply_kernel,
        (spatial_tiles, channel_blocks, num_samples),
        x,
        y,
        folded,
        num_samples,
        channels,
        spatial,
        *strides,
        *out_strides,
        BLOCK_C=block_c,
        BLOCK_S=block_s,
        SILU=bool(silu),
        outputs=(y,),
        **COMPILE_OPTIONS,
    )
