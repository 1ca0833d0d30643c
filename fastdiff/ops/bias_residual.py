"""The end of a ResNet block with an identity shortcut: ``x + h + bias``, ``h`` the second
convolution's output without its bias, ``bias`` per channel (``ResnetBlock2D`` under
``fold_biases``).

PyTorch takes two full passes for it (the convolution's bias added to its output, then the
residual addition); the triton backend runs ``kernels/bias_residual.py``, one pass in float32
rounded once. ``auto`` runs the kernel only at shapes the measured table has it faster
(``bias_residual`` rows of bench_bias_residual.py) and the two PyTorch additions elsewhere; the
eager backend, inputs that are not channels-last maps of one shape, dtype and device, and inputs
that need gradients always run PyTorch's.

Layers: ``kernels/bias_residual.py`` -> custom op ``fastdiff::bias_residual`` (with a fake
kernel) -> ``bias_residual`` (checks, backend choice, PyTorch for other inputs).
"""

import torch

from fastdiff.ops.autoselect import group_norm_key
from fastdiff.ops.backend import (
    kernel_dtype_supported,
    launch_kernel_op,
    needs_autograd,
    select_backend,
    strictly_nhwc,
)


def check_bias_residual_args(x: torch.Tensor, h: torch.Tensor, bias: torch.Tensor) -> None:
    if not all(isinstance(t, torch.Tensor) for t in (x, h, bias)):
        raise ValueError(
            "bias_residual expects tensors x, h and bias, got "
            f"{', '.join(type(t).__name__ for t in (x, h, bias))}"
        )
    if x.dim() != 4 or x.shape != h.shape:
        raise ValueError(
            "bias_residual expects x and h of one (B, C, H, W) shape, got "
            f"{tuple(x.shape)} and {tuple(h.shape)}"
        )
    if tuple(bias.shape) != (x.shape[1],):
        raise ValueError(
            f"bias_residual: bias has shape {tuple(bias.shape)}, expected ({x.shape[1]},)"
        )


def bias_residual_reference(x, h, bias) -> torch.Tensor:
    """fp32 reference, cast back to ``x.dtype`` (in x's memory format)."""
    total = x.float() + h.float() + bias.float()[None, :, None, None]
    return total.to(x.dtype)


def bias_residual_eager(x, h, bias) -> torch.Tensor:
    """What the block computes unfolded: the bias added to the convolution's output, then the
    shortcut."""
    return x + (h + bias[None, :, None, None])


def bias_residual_launch(x: torch.Tensor, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The Triton launcher: the custom op's implementation, also called directly
    (``launch_kernel_op``)."""
    from fastdiff.kernels.bias_residual import bias_residual_forward

    return bias_residual_forward(x, h, bias)


bias_residual_triton = torch.library.custom_op(
    "fastdiff::bias_residual", bias_residual_launch, mutates_args=()
)


@bias_residual_triton.register_fake
def _bias_residual_fake(x, h, bias):
    return torch.empty_like(x, memory_format=torch.channels_last)


def bias_residual_triton_supports(x: torch.Tensor, h: torch.Tensor, bias: torch.Tensor) -> bool:
    """Inputs the kernel takes: x and h strictly channels-last (the layout PyTorch's addition
    would also return), one dtype and device, a dense bias on that device."""
    if not kernel_dtype_supported(x) or h.dtype != x.dtype or bias.dtype != x.dtype:
        return False
    if h.device != x.device or bias.device != x.device or not bias.is_contiguous():
        return False
    return strictly_nhwc(x) and strictly_nhwc(h)


def bias_residual(x: torch.Tensor, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``x + h + bias[None, :, None, None]`` for (B, C, H, W) ``x`` and ``h``."""
    check_bias_residual_args(x, h, bias)
    backend = select_backend(x, "bias_residual", lambda: group_norm_key(x))
    if needs_autograd(x, h, bias):
        backend = "eager"
    if backend == "triton" and bias_residual_triton_supports(x, h, bias):
        return launch_kernel_op(bias_residual_triton, bias_residual_launch, x, h, bias)
    return bias_residual_eager(x, h, bias)
