"""LayerNorm over the last dimension (transformer blocks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdiff.ops.backend import select_backend


def layer_norm_reference(x, weight, bias, eps: float = 1e-5) -> torch.Tensor:
    """fp32 reference, cast back to ``x.dtype``."""
    shape = (x.shape[-1],)
    out = F.layer_norm(
        x.float(),
        shape,
        None if weight is None else weight.float(),
        None if bias is None else bias.float(),
        eps,
    )
    return out.to(x.dtype)


def layer_norm_eager(x, weight, bias, eps: float = 1e-5) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """LayerNorm over the last dimension of ``x`` with optional affine parameters."""
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None and tuple(param.shape) != (x.shape[-1],):
            raise ValueError(
                f"layer_norm: {name} has shape {tuple(param.shape)}, expected ({x.shape[-1]},)"
            )
    select_backend(x)
    return layer_norm_eager(x, weight, bias, eps)
