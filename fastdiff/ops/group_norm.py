"""GroupNorm with an optional fused SiLU: the most frequent op in a U-Net's ResNet blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdiff.ops.backend import select_backend


def group_norm_reference(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    silu: bool = False,
) -> torch.Tensor:
    """fp32 reference: statistics and affine in float32, result cast back to ``x.dtype``."""
    out = F.group_norm(
        x.float(),
        num_groups,
        None if weight is None else weight.float(),
        None if bias is None else bias.float(),
        eps,
    )
    if silu:
        out = F.silu(out)
    return out.to(x.dtype)


def group_norm_eager(x, num_groups, weight, bias, eps=1e-5, silu=False):
    """Plain PyTorch in the input dtype: what an unfused model runs."""
    out = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(out) if silu else out


def check_group_norm_args(x: torch.Tensor, num_groups: int, weight, bias) -> None:
    if x.dim() < 2:
        raise ValueError(f"group_norm expects (N, C, *) input, got shape {tuple(x.shape)}")
    channels = x.shape[1]
    if num_groups < 1 or channels % num_groups != 0:
        raise ValueError(
            f"group_norm: num_groups={num_groups} must divide the {channels} channels of x"
        )
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None and tuple(param.shape) != (channels,):
            raise ValueError(
                f"group_norm: {name} has shape {tuple(param.shape)}, expected ({channels},)"
            )


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    silu: bool = False,
) -> torch.Tensor:
    """GroupNorm over (N, C, *) input, NCHW or channels-last, optionally followed by SiLU."""
    check_group_norm_args(x, num_groups, weight, bias)
    select_backend(x)  # validates FASTDIFF_BACKEND; kernels are wired in by the kernels work
    return group_norm_eager(x, num_groups, weight, bias, eps, silu)
