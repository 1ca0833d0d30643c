"""GEGLU activation (Shazeer 2020): the feed-forward gate of SD transformer blocks.

Input is the output of the block's ``proj`` linear layer, (..., 2*D): the first half is the
value, the second half the gate. Output is ``value * gelu(gate)`` with shape (..., D), the same
split diffusers' ``GEGLU`` uses, so its weights load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdiff.ops.backend import select_backend


def _check(x: torch.Tensor) -> None:
    if x.shape[-1] % 2 != 0:
        raise ValueError(f"geglu: last dimension must be even (value|gate), got shape {tuple(x.shape)}")


def geglu_reference(x: torch.Tensor) -> torch.Tensor:
    value, gate = x.float().chunk(2, dim=-1)
    return (value * F.gelu(gate)).to(x.dtype)


def geglu_eager(x: torch.Tensor) -> torch.Tensor:
    value, gate = x.chunk(2, dim=-1)
    return value * F.gelu(gate)


def geglu(x: torch.Tensor) -> torch.Tensor:
    """``value * gelu(gate)`` for ``x = [value | gate]`` along the last dimension (exact-erf GELU)."""
    _check(x)
    select_backend(x)
    return geglu_eager(x)
