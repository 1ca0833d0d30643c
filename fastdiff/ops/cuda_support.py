"""Which inputs the CUDA C++ kernels (csrc/) take, decided in Python without calling them.

``group_norm_launch_plan`` mirrors ``fastdiff::group_norm_plan`` in csrc/group_norm.cu line for
line (the GPU tests, and ``benchmarks/gpu_stack_check.sh`` on CPU tensors, compare the two through
``torch.ops.fastdiff_cuda.group_norm_plan``), so the dispatcher can route a call to the triton
kernel before the CUDA kernel would refuse it. Keep the two in step when either changes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Constants of csrc/group_norm.cu.
GROUP_NORM_MAX_THREADS = 1024
GROUP_NORM_BYTES_PER_THREAD = 64  # FASTDIFF_GROUP_NORM_BYTES_PER_THREAD
GROUP_NORM_MAX_GROUP_CHANNELS = 1024  # kGroupNormMaxGroupChannels
INT32_LIMIT = 2**31


class GroupNormPlan(NamedTuple):
    supported: bool
    vec: int = 0  # elements per memory access (8 = 128-bit for fp16/bf16, 4 for fp32)
    threads: int = 0
    loads: int = 0  # packs of `vec` elements each thread holds in registers


def group_norm_layout(x: torch.Tensor) -> str | None:
    """The kernel's name for x's layout: "nchw" (contiguous), "nhwc" (4-D channels-last), or None
    for a layout it does not read. A tensor that is both (H = W = 1) counts as contiguous."""
    if x.is_contiguous():
        return "nchw"
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return "nhwc"
    return None


def plan_group_norm(
    shape: tuple[int, ...], element_bytes: int, channels_last: bool, address: int, num_groups: int
) -> GroupNormPlan:
    """The CUDA GroupNorm launch for an input of ``shape`` at byte ``address`` (pure arithmetic)."""
    if len(shape) < 2 or element_bytes not in (2, 4):
        return GroupNormPlan(False)
    batch, channels = shape[0], shape[1]
    if channels <= 0 or num_groups <= 0 or channels % num_groups != 0:
        return GroupNormPlan(False)
    spatial = 1
    for size in shape[2:]:
        spatial *= size
    group_channels = channels // num_groups
    if (
        group_channels > GROUP_NORM_MAX_GROUP_CHANNELS
        or spatial * channels >= INT32_LIMIT
        or batch * num_groups >= INT32_LIMIT
    ):
        return GroupNormPlan(False)
    if batch == 0 or spatial == 0:
        return GroupNormPlan(True)
    run = group_channels if channels_last else spatial
    vec = 16 // element_bytes
    while vec > 1 and (run % vec != 0 or address % (vec * element_bytes) != 0):
        vec //= 2
    max_loads = GROUP_NORM_BYTES_PER_THREAD // (vec * element_bytes)
    total_packs = spatial * group_channels // vec
    threads = min(GROUP_NORM_MAX_THREADS, (total_packs + 31) // 32 * 32)
    if channels_last:
        packs_per_row = group_channels // vec
        if packs_per_row > threads:
            return GroupNormPlan(False)
        rows_per_step = threads // packs_per_row
        loads = -(-spatial // rows_per_step)
    else:
        loads = -(-total_packs // threads)
    return GroupNormPlan(loads <= max_loads, vec, threads, loads)


def group_norm_launch_plan(x: torch.Tensor, num_groups: int) -> GroupNormPlan:
    """``plan_group_norm`` for a tensor (unsupported dtypes and layouts give supported=False)."""
    layout = group_norm_layout(x)
    if x.dtype not in KERNEL_DTYPES or layout is None:
        return GroupNormPlan(False)
    return plan_group_norm(
        tuple(x.shape), x.element_size(), layout == "nhwc", x.data_ptr(), num_groups
    )


def _same_dense_layout(x: torch.Tensor, other: torch.Tensor) -> bool:
    if x.is_contiguous() and other.is_contiguous():
        return True
    return (
        x.dim() == 4
        and other.dim() == 4
        and x.is_contiguous(memory_format=torch.channels_last)
        and other.is_contiguous(memory_format=torch.channels_last)
    )


def sampler_step_supported(
    x: torch.Tensor,
    model_output: torch.Tensor,
    coefficients: torch.Tensor,
    step: torch.Tensor | None,
    x0_prev: torch.Tensor | None,
    guidance: torch.Tensor | None,
    noise: torch.Tensor | None,
    x0_older: torch.Tensor | None = None,
) -> bool:
    """The CUDA sampler-step kernel's input rules (the binding enforces the same with errors):
    CUDA tensors on one device; x and model_output fp32/fp16/bf16 (they may differ);
    x0_prev, noise and x0_older (stacked [K, *x.shape], slices numel apart) in x's dtype;
    one dense layout for all sample tensors; coefficients
    fp32/fp64 with unit-stride columns; step an int64 scalar; guidance an fp32/fp64/fp16/bf16
    scalar (the dtypes the kernel reads; no float8)."""
    if not x.is_cuda or x.dim() == 0:
        return False
    if x.dtype not in KERNEL_DTYPES or model_output.dtype not in KERNEL_DTYPES:
        return False
    samples = [model_output] + [t for t in (x0_prev, noise) if t is not None]
    if x0_older is not None:  # [K, *x.shape], K <= 3, its slices numel apart
        if x0_older.dim() != x.dim() + 1 or not 1 <= x0_older.shape[0] <= 3:
            return False
        if x0_older.stride(0) != x.numel() or x0_older.device != x.device:
            return False
        samples.append(x0_older[0])
    if not all(t.device == x.device and _same_dense_layout(x, t) for t in samples):
        return False
    if any(t is not None and t.dtype != x.dtype for t in (x0_prev, noise, x0_older)):
        return False
    if coefficients.device != x.device or coefficients.dtype not in (torch.float32, torch.float64):
        return False
    if coefficients.dim() not in (1, 2) or coefficients.stride(-1) != 1:
        return False
    if step is not None and (
        step.device != x.device or step.dtype != torch.int64 or step.numel() != 1
    ):
        return False
    if guidance is not None and (
        guidance.device != x.device
        or guidance.dtype not in (*KERNEL_DTYPES, torch.float64)
        or guidance.numel() != 1
    ):
        return False
    return True
