"""Scaled dot-product attention over (B, H, N, D) tensors: self- and cross-attention.

Layers: ``kernels/attention.py`` (flash-attention forward) -> custom op ``fastdiff::attention``
(with a fake kernel) -> ``attention`` (checks, backend choice, eager path for unsupported inputs).
"""

import math

import torch
import torch.nn.functional as F

from fastdiff.ops.autoselect import attention_key
from fastdiff.ops.backend import (
    cuda_extension_op,
    kernel_dtype_supported,
    launch_kernel_op,
    needs_autograd,
    select_backend,
)

MAX_KERNEL_HEAD_DIM = 256
MAX_INT32_OFFSET = 2**31


def check_attention_args(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> None:
    if not all(isinstance(item, torch.Tensor) for item in (q, k, v)):
        names = [type(item).__name__ for item in (q, k, v)]
        raise ValueError(f"attention expects tensors q, k, v, got {names}")
    # SDPA reads a NaN scale as something else and returns finite, wrong numbers.
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)
    ):
        raise ValueError(f"attention: scale must be a finite number or None, got {scale!r}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "attention expects (B, H, N, D) tensors, got shapes "
            f"q={tuple(q.shape)} k={tuple(k.shape)} v={tuple(v.shape)}"
        )
    if k.shape != v.shape[:3] + (k.shape[3],) or k.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"attention: batch/heads/keys disagree: q={tuple(q.shape)} k={tuple(k.shape)} "
            f"v={tuple(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention: q and k head dims differ ({q.shape[-1]} vs {k.shape[-1]})")


def attention_reference(q, k, v, scale: float | None = None) -> torch.Tensor:
    """fp32 reference that materialises the full score matrix; result cast back to ``q.dtype``."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v.float()).to(q.dtype)


def attention_eager(q, k, v, scale: float | None = None) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def attention_launch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """The Triton launcher: the custom op's implementation, also called directly
    (``launch_kernel_op``)."""
    from fastdiff.kernels.attention import attention_forward

    return attention_forward(q, k, v, scale)


attention_triton = torch.library.custom_op("fastdiff::attention", attention_launch, mutates_args=())


@attention_triton.register_fake
def _attention_fake(q, k, v, scale):
    batch, heads, queries, _ = q.shape
    return q.new_empty((batch, queries, heads, v.shape[-1])).transpose(1, 2)


def attention_triton_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale) -> bool:
    """Inputs the flash kernel handles; the rest runs eagerly (never wrong numbers)."""
    if not kernel_dtype_supported(q) or not (q.dtype == k.dtype == v.dtype):
        return False
    if not 0 < q.shape[-1] <= MAX_KERNEL_HEAD_DIM or v.shape[-1] != q.shape[-1] or k.shape[2] == 0:
        return False
    if not (q.device == k.device == v.device):
        return False
    if not offsets_fit_int32(q, k, v):
        return False
    return scale is None or scale > 0  # the kernel's running max assumes a positive scale


def offsets_fit_int32(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """The kernel's int32 arithmetic holds for these operands: it scales the batch and head
    strides back in int32 (a batch's and head's int64 offsets are products of those) and indexes
    the rows and head-dim columns of one batch and head in int32. A view spread wider than its
    elements (a slice of a much larger projection) can pass 2**31 where a dense tensor does not."""
    for t in (q, k, v):
        batch, heads, rows, dim = t.shape
        stride_b, stride_h, stride_n, stride_d = t.stride()
        if (
            (rows - 1) * stride_n >= MAX_INT32_OFFSET
            or (dim - 1) * stride_d >= MAX_INT32_OFFSET
            or (batch > 1 and stride_b >= MAX_INT32_OFFSET)
            or (heads > 1 and stride_h >= MAX_INT32_OFFSET)
        ):
            return False
    # The output, (B, N, H, D) memory: its batch stride and row offsets are below N * H * D.
    return q.shape[1] * q.shape[2] * q.shape[3] < MAX_INT32_OFFSET


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """softmax(q kᵀ · scale) v for q (B, H, N, D), k and v (B, H, M, D); scale defaults to D^-1/2.

    Any strides are accepted (views of a fused QKV projection are read in place). The triton
    output is a (B, H, N, D) view of (B, N, H, D) memory, as PyTorch's flash backend returns.
    """
    check_attention_args(q, k, v, scale)
    backend = select_backend(q, "attention", lambda: attention_key(q, k))
    if needs_autograd(q, k, v):
        backend = "eager"
    if backend == "cuda":
        native = cuda_extension_op("attention", q, k, v, scale)
        if native is not None:
            return native(q, k, v, scale)
        backend = "triton"
    if backend == "triton" and attention_triton_supports(q, k, v, scale):
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        return launch_kernel_op(attention_triton, attention_launch, q, k, v, scale)
    return attention_eager(q, k, v, scale)
