"""Scaled dot-product attention over (B, H, N, D) tensors: self- and cross-attention."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastdiff.ops.backend import select_backend


def check_attention_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
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
        raise ValueError(
            f"attention: q and k head dims differ ({q.shape[-1]} vs {k.shape[-1]})"
        )


def attention_reference(q, k, v, scale: float | None = None) -> torch.Tensor:
    """fp32 reference that materialises the full score matrix; result cast back to ``q.dtype``."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v.float()).to(q.dtype)


def attention_eager(q, k, v, scale: float | None = None) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """softmax(q kᵀ · scale) v for q (B, H, N, D), k and v (B, H, M, D); scale defaults to D^-1/2."""
    check_attention_args(q, k, v)
    select_backend(q)
    return attention_eager(q, k, v, scale)
