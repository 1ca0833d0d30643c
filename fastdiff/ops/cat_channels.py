"""Concatenation along channels of two (B, C, H, W) maps: the U-Net up blocks' skip
connections, ``torch.cat([x, skip], dim=1)``.

On channels-last inputs PyTorch's concatenation indexes every element through the output's
strides; the triton backend runs ``kernels/cat_channels.py`` instead, which copies whole pixel
rows in vectors. It is a copy: the result is exactly ``torch.cat``'s. ``auto`` runs the kernel
only at shapes the measured table has it faster (``cat_channels`` rows of
bench_cat_channels.py), and ``torch.cat`` elsewhere; the eager backend, other layouts, mixed
dtypes or devices and inputs that need gradients always run ``torch.cat``.

Layers: ``kernels/cat_channels.py`` -> custom op ``fastdiff::cat_channels`` (with a fake kernel)
-> ``cat_channels`` (checks, backend choice, ``torch.cat`` for other inputs).
"""

import torch

from fastdiff.ops.autoselect import cat_channels_key
from fastdiff.ops.backend import (
    kernel_dtype_supported,
    launch_kernel_op,
    needs_autograd,
    select_backend,
    strictly_nhwc,
)


def check_cat_channels_args(a: torch.Tensor, b: torch.Tensor) -> None:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise ValueError(
            f"cat_channels expects two tensors, got {type(a).__name__} and {type(b).__name__}"
        )
    if a.dim() != 4 or b.dim() != 4:
        raise ValueError(
            "cat_channels expects two (B, C, H, W) tensors, got shapes "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )
    if (a.shape[0], *a.shape[2:]) != (b.shape[0], *b.shape[2:]):
        raise ValueError(
            "cat_channels: the two maps must agree in batch, height and width, got "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )


def cat_channels_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.cat([a, b], dim=1)``: a copy, so the reference is PyTorch's own."""
    return torch.cat([a, b], dim=1)


cat_channels_eager = cat_channels_reference


def cat_channels_launch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The Triton launcher: the custom op's implementation, also called directly
    (``launch_kernel_op``)."""
    from fastdiff.kernels.cat_channels import cat_channels_forward

    return cat_channels_forward(a, b)


cat_channels_triton = torch.library.custom_op(
    "fastdiff::cat_channels", cat_channels_launch, mutates_args=()
)


@cat_channels_triton.register_fake
def _cat_channels_fake(a, b):
    # Allocated channels-last as the launcher does (see conv3x3's fake: a 1x1 map).
    batch, channels, height, width = a.shape
    return torch.empty(
        (batch, channels + b.shape[1], height, width),
        dtype=a.dtype,
        device=a.device,
        memory_format=torch.channels_last,
    )


def cat_channels_triton_supports(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Inputs the kernel takes: both strictly channels-last, one dtype and device. torch.cat
    returns a channels-last result only for those (an input that is both layouts makes it
    NCHW), and the output's layout must not depend on the backend."""
    if not kernel_dtype_supported(a) or a.dtype != b.dtype or a.device != b.device:
        return False
    return strictly_nhwc(a) and strictly_nhwc(b)


def cat_channels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.cat([a, b], dim=1)`` for (B, C, H, W) maps of one batch and size."""
    check_cat_channels_args(a, b)
    backend = select_backend(a, "cat_channels", lambda: cat_channels_key(a, b))
    if needs_autograd(a, b):
        backend = "eager"
    if backend == "triton" and cat_channels_triton_supports(a, b):
        return launch_kernel_op(cat_channels_triton, cat_channels_launch, a, b)
    return cat_channels_eager(a, b)
