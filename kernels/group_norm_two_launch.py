"""GroupNorm (+ optional SiLU) for large groups in two launches instead of the split reduction's
three (``kernels.group_norm_split``): the finalize step moves into the normalizing programs.

The input is seen as (N, C, S) through strides (see ``kernels.group_norm``).

1. ``group_norm_group_stats_kernel``: many programs per group. Each program's channel block holds
   whole groups, so it writes per-*group* sums of ``x + offset - shift`` and their squares over
   its spatial range, the shift being the group's first element (plus its channel's offset), as
   in the single-pass kernel: shifted sums keep fp32 accurate when |mean| >> std.
2. ``group_norm_apply_group_stats_kernel``: y = (x + offset - mean) * rstd * weight + bias, then
   SiLU if asked. Each program first adds up the per-split sums of the few groups its channel
   block touches (a small gather from L2) and derives their mean and rstd itself.

Every normalizing program repeats a few hundred additions that the three-launch path's
finalize kernel does once, in exchange for one launch less: inside a CUDA graph on an H200 a
launch of these small kernels costs about 2 µs (``fastdiff-split`` against ``fastdiff-single``
at 2x1280x8x8, results/nvidia-h200.csv), against 10.6 µs for the whole 2x320x64x64 GroupNorm.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import COMPILE_OPTIONS, cdiv, launch, next_power_of_2
from . import group_norm_split as split_kernels
from .group_norm_split import channel_offsets

# A group must fit one program's channel block, and the normalizing programs pick each
# channel's statistics out of a (channels x groups touched) table: both stay small below these.
MAX_GROUP_CHANNELS = 128
MAX_LOOKUP = 4096
# Per-split partial sums each normalizing program adds up: more splits fill more SMs in step 1
# but make every program of step 2 read more.
MAX_SPLITS = 64


@triton.jit
def group_norm_group_stats_kernel(
    x_ptr,  # input, element (n, c, s) at n * stride_n + c * stride_c + s * stride_s
    partial_ptr,  # fp32 [2, N, splits, G] out: shifted sums, then shifted sums of squares
    offset_ptr,  # (N, C) through strides, added to x before normalizing (read when HAS_OFFSET)
    num_samples,
    channels,
    num_groups,
    spatial,
    stride_n,
    stride_c,
    stride_s,
    offset_stride_n,
    offset_stride_c,
    splits,
    tiles_per_split,
    CHANNELS_PER_GROUP: tl.constexpr,
    GROUPS_PER_BLOCK: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
):
    split = tl.program_id(0)
    group_block = tl.program_id(1)
    sample = tl.program_id(2)
    first_group = group_block * GROUPS_PER_BLOCK
    local = tl.arange(0, BLOCK_C)
    local_group = local // CHANNELS_PER_GROUP
    chan = first_group * CHANNELS_PER_GROUP + local
    # Bounds a constexpr and an argument can state, not local_group's: Triton then proves the
    # mask constant over 8 channels and loads channels-last rows 16 bytes at a time.
    mask_c = (local < GROUPS_PER_BLOCK * CHANNELS_PER_GROUP) & (chan < channels)
    lead = (first_group + local_group) * CHANNELS_PER_GROUP  # each channel's group's first
    base = x_ptr + sample.to(tl.int64) * stride_n
    shift = tl.load(base + lead * stride_c, mask=mask_c, other=0.0).to(tl.float32)
    add = channel_offsets(
        offset_ptr, sample, chan, mask_c, offset_stride_n, offset_stride_c, BLOCK_C, HAS_OFFSET
    )
    if HAS_OFFSET:  # the statistics are those of x + offset: shift by x0 + offset0
        shift += channel_offsets(
            offset_ptr, sample, lead, mask_c, offset_stride_n, offset_stride_c, BLOCK_C, True
        )
    pivot = (shift - add)[:, None]  # x + offset - shift as x - pivot
    acc_sum = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    acc_sq = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    s_begin = split * tiles_per_split * BLOCK_S
    for tile in range(0, tiles_per_split):
        offs_s = s_begin + tile * BLOCK_S + tl.arange(0, BLOCK_S)
        mask = mask_c[:, None] & (offs_s < spatial)[None, :]
        ptrs = base + chan[:, None] * stride_c + offs_s[None, :] * stride_s
        values = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        centred = tl.where(mask, values - pivot, 0.0)
        acc_sum += centred
        acc_sq += centred * centred
    # Channels to groups: all of a group's channels share its shift, so their sums just add.
    member = local_group[:, None] == tl.arange(0, BLOCK_G)[None, :]
    group_sum = tl.sum(tl.where(member, tl.sum(acc_sum, axis=1)[:, None], 0.0), axis=0)
    group_sq = tl.sum(tl.where(member, tl.sum(acc_sq, axis=1)[:, None], 0.0), axis=0)
    offs_g = tl.arange(0, BLOCK_G)
    mask_g = (offs_g < GROUPS_PER_BLOCK) & (first_group + offs_g < num_groups)
    out = (sample * splits + split) * num_groups + first_group + offs_g
    tl.store(partial_ptr + out, group_sum, mask=mask_g)
    second = num_samples * splits * num_groups
    tl.store(partial_ptr + second + out, group_sq, mask=mask_g)


@triton.jit
def group_norm_apply_group_stats_kernel(
    x_ptr,  # input (N, C, S) through strides
    y_ptr,  # output (N, C, S) through its own strides (same memory format as the input)
    partial_ptr,  # fp32 [2, N, splits, G] from group_norm_group_stats_kernel
    weight_ptr,  # [C] affine weight (read only when HAS_WEIGHT)
    bias_ptr,  # [C] affine bias (read only when HAS_BIAS)
    offset_ptr,  # (N, C) through strides, added to x before normalizing (read when HAS_OFFSET)
    num_samples,
    channels,
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
    splits,
    eps,
    CHANNELS_PER_GROUP: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_GT: tl.constexpr,
    BLOCK_SPLIT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
    SILU: tl.constexpr,
):
    spatial_block = tl.program_id(0)
    channel_block = tl.program_id(1)
    sample = tl.program_id(2)
    offs_c = channel_block * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < channels
    # The statistics of the (at most BLOCK_GT) groups this block's channels belong to.
    first_group = (channel_block * BLOCK_C) // CHANNELS_PER_GROUP
    offs_gt = tl.arange(0, BLOCK_GT)
    groups = first_group + offs_gt
    mask_g = groups < num_groups
    offs_split = tl.arange(0, BLOCK_SPLIT)
    sum1 = tl.zeros([BLOCK_GT], dtype=tl.float32)
    sum2 = tl.zeros([BLOCK_GT], dtype=tl.float32)
    second = num_samples * splits * num_groups
    for split0 in range(0, splits, BLOCK_SPLIT):
        split = split0 + offs_split
        mask = (split < splits)[:, None] & mask_g[None, :]
        idx = (sample * splits + split)[:, None] * num_groups + groups[None, :]
        sum1 += tl.sum(tl.load(partial_ptr + idx, mask=mask, other=0.0), axis=0)
        sum2 += tl.sum(tl.load(partial_ptr + second + idx, mask=mask, other=0.0), axis=0)
    count = spatial * 1.0 * CHANNELS_PER_GROUP  # float first: a group may pass 2**31 values
    mean_shifted = sum1 / count
    # NaN-propagating: a group holding an inf normalizes to NaN, as the reference does.
    var = tl.maximum(sum2 / count - mean_shifted * mean_shifted, 0.0, tl.PropagateNan.ALL)
    group_rstd = 1.0 / tl.sqrt(var + eps)
    lead = groups * CHANNELS_PER_GROUP
    x_base = x_ptr + sample.to(tl.int64) * stride_n
    group_mean = tl.load(x_base + lead * stride_c, mask=mask_g, other=0.0).to(tl.float32)
    group_mean += mean_shifted
    if HAS_OFFSET:
        group_mean += channel_offsets(
            offset_ptr, sample, lead, mask_g, offset_stride_n, offset_stride_c, BLOCK_GT, True
        )
    # Each channel picks its group's row of the table.
    member = (offs_c // CHANNELS_PER_GROUP - first_group)[:, None] == offs_gt[None, :]
    mean = tl.sum(tl.where(member, group_mean[None, :], 0.0), axis=1)
    rstd = tl.sum(tl.where(member, group_rstd[None, :], 0.0), axis=1)
    # Normalizing x + offset around the group mean is normalizing x around mean - offset.
    mean -= channel_offsets(
        offset_ptr, sample, offs_c, mask_c, offset_stride_n, offset_stride_c, BLOCK_C, HAS_OFFSET
    )
    if HAS_WEIGHT:
        scale = tl.load(weight_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32) * rstd
    else:
        scale = rstd
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BLOCK_C], dtype=tl.float32)
    offs_s = spatial_block * BLOCK_S + tl.arange(0, BLOCK_S)
    mask = mask_c[:, None] & (offs_s < spatial)[None, :]
    x_ptrs = x_base + offs_c[:, None] * stride_c + offs_s[None, :] * stride_s
    values = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    y = (values - mean[:, None]) * scale[:, None] + bias[:, None]
    if SILU:
        y = y / (1.0 + tl.exp(-y))
    y_ptrs = y_ptr + sample.to(tl.int64) * out_stride_n + offs_c[:, None] * out_stride_c
    tl.store(y_ptrs + offs_s[None, :] * out_stride_s, y.to(y_ptr.dtype.element_ty), mask=mask)


def group_block(per_group: int, num_groups: int, channel_contiguous: bool) -> tuple[int, int]:
    """(BLOCK_C, groups per block) for step 1: the power-of-two channel block, from one group's
    up to 128 channels, that whole groups fill best (10-channel groups: 3 in 32 channels rather
    than 1 in 16). Ties go to the longer block when channels are the contiguous axis (longer
    rows per pixel), else to the shorter (a longer spatial extent)."""
    best: tuple[float, int, int] | None = None
    block = next_power_of_2(per_group)
    while True:
        groups = min(block // per_group, num_groups)
        used = groups * per_group / block
        if best is None or used > best[0] or (used == best[0] and channel_contiguous):
            best = (used, block, groups)
        if block >= MAX_GROUP_CHANNELS:
            break
        block *= 2
    return best[1], best[2]


def lookup_width(block_c: int, per_group: int, num_groups: int) -> int:
    """BLOCK_GT: room for the most groups that ``block_c`` consecutive channels can touch."""
    touched = min((block_c + per_group - 2) // per_group + 1, num_groups)
    return max(2, next_power_of_2(touched))


def supports(channels: int, num_groups: int) -> bool:
    """Whether the two launches take groups of this size: each within one statistics block.
    Wider groups take the three launches."""
    return channels // num_groups <= MAX_GROUP_CHANNELS


def apply_tile(
    channels: int, spatial: int, channel_contiguous: bool, per_group: int, num_groups: int
) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_S, BLOCK_GT) of step 2: the three launches' normalizing tile, with fewer
    channels where its table of groups would grow past MAX_LOOKUP entries (many small groups
    at a small spatial size, where the tile is mostly channels)."""
    block_c, block_s = split_kernels.tile_shape(channels, spatial, channel_contiguous)
    while block_c > 2 and block_c * lookup_width(block_c, per_group, num_groups) > MAX_LOOKUP:
        block_c //= 2
    return block_c, block_s, lookup_width(block_c, per_group, num_groups)


def two_launch_reduction(
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
    through ``offset_strides``) into ``y`` with the two kernels (groups ``supports`` accepts)."""
    num_samples, channels = x.shape[0], x.shape[1]
    spatial = x.numel() // max(1, num_samples * channels)
    per_group = channels // num_groups
    channel_contiguous = strides[1] == 1 and strides[2] != 1

    stats_block_c, groups_per_block = group_block(per_group, num_groups, channel_contiguous)
    stats_block_s = max(2, min(4096 // stats_block_c, next_power_of_2(spatial)))
    group_blocks = cdiv(num_groups, groups_per_block)
    spatial_tiles = cdiv(spatial, stats_block_s)
    # Enough programs to fill every multiprocessor a few times over, as the three launches do.
    programs = 4 * split_kernels.multiprocessors(x.device)
    wanted_splits = cdiv(programs, num_samples * group_blocks)
    tiles_per_split = max(1, cdiv(spatial_tiles, min(wanted_splits, MAX_SPLITS)))
    splits = cdiv(spatial_tiles, tiles_per_split)
    partial = torch.empty(
        2 * num_samples * splits * num_groups, dtype=torch.float32, device=x.device
    )
    offset_arg = offset if offset is not None else partial
    launch(
        group_norm_group_stats_kernel,
        (splits, group_blocks, num_samples),
        x,
        partial,
        offset_arg,
        num_samples,
        channels,
        num_groups,
        spatial,
        *strides,
        *offset_strides,
        splits,
        tiles_per_split,
        CHANNELS_PER_GROUP=per_group,
        GROUPS_PER_BLOCK=groups_per_block,
        BLOCK_C=stats_block_c,
        BLOCK_G=max(2, next_power_of_2(groups_per_block)),
        BLOCK_S=stats_block_s,
        HAS_OFFSET=offset is not None,
        num_warps=8,  # two fp32 accumulators of a 4096-element tile, as the partial-stats kernel
        outputs=(partial,),
        **COMPILE_OPTIONS,
    )
    block_c, block_s, block_gt = apply_tile(
        channels, spatial, channel_contiguous, per_group, num_groups
    )
    launch(
        group_norm_apply_group_stats_kernel,
        (cdiv(spatial, block_s), cdiv(channels, block_c), num_samples),
        x,
        y,
        partial,
        weight if weight is not None else partial,
        bias if bias is not None else partial,
        offset_arg,
        num_samples,
        channels,
        spatial,
        num_groups,
        *strides,
        *out_strides,
        *offset_strides,
        splits,
        float(eps),
        CHANNELS_PER_GROUP=per_group,
        BLOCK_C=block_c,
        BLOCK_S=block_s,
        BLOCK_GT=block_gt,
        BLOCK_SPLIT=max(2, min(next_power_of_2(splits), 64)),
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        HAS_OFFSET=offset is not None,
        SILU=bool(silu),
        outputs=(y,),
        **COMPILE_OPTIONS,
    )
