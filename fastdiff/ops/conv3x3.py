"""3x3 convolution, stride 1, zero padding 1: the U-Net ResNet blocks' convolutions.

Backends: triton runs ``kernels/conv3x3.py`` (an implicit GEMM with its reduction split over
programs) on channels-last inputs of at most ``MAX_ROWS`` output pixels, the small feature maps
where cuDNN leaves most of a large GPU idle; everything else, and the eager backend, run
PyTorch's convolution (cuDNN on a GPU). The CUDA extension has no convolution: cuda runs
PyTorch's where the extension is built, and means triton where it is not (as for every op,
``fastdiff.ops.backend.select_backend``). ``auto`` runs the kernel only at shapes the measured
table has it faster (``conv3x3`` rows of bench_conv3x3.py), and cuDNN elsewhere.

Layers: ``kernels/conv3x3.py`` -> custom op ``fastdiff::conv3x3`` (with a fake kernel) ->
``conv3x3`` (checks, backend choice, PyTorch's convolution for other inputs).
"""

import torch
import torch.nn.functional as F

from fastdiff.ops.autoselect import conv3x3_key
from fastdiff.ops.backend import (
    autocast_enabled,
    kernel_dtype_supported,
    launch_kernel_op,
    needs_autograd,
    select_backend,
)


def check_conv3x3_args(x: torch.Tensor, weight: torch.Tensor, bias) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise ValueError(
            f"conv3x3 expects tensors x and weight, got {type(x).__name__} and "
            f"{type(weight).__name__}"
        )
    if x.dim() != 4 or weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(
            "conv3x3 expects x (B, C, H, W) and weight (N, C, 3, 3), got x "
            f"{tuple(x.shape)} and weight {tuple(weight.shape)}"
        )
    if weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"conv3x3: weight {tuple(weight.shape)} takes {weight.shape[1]} input channels, "
            f"x {tuple(x.shape)} has {x.shape[1]}"
        )
    if bias is not None and (
        not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)
    ):
        shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"conv3x3: bias has shape {shape}, expected ({weight.shape[0]},)")


def conv3x3_reference(x, weight, bias=None) -> torch.Tensor:
    """fp32 reference, cast back to ``x.dtype`` (in x's memory format, as PyTorch returns it)."""
    out = F.conv2d(x.float(), weight.float(), None if bias is None else bias.float(), padding=1)
    return out.to(x.dtype)


def conv3x3_eager(x, weight, bias=None) -> torch.Tensor:
    return F.conv2d(x, weight, bias, padding=1)


def conv3x3_launch(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The Triton launcher: the custom op's implementation, also called directly
    (``launch_kernel_op``)."""
    from fastdiff.kernels.conv3x3 import conv3x3_forward

    return conv3x3_forward(x, weight, bias)


conv3x3_triton = torch.library.custom_op("fastdiff::conv3x3", conv3x3_launch, mutates_args=())


@conv3x3_triton.register_fake
def _conv3x3_fake(x, weight, bias):
    # Allocated channels-last as the launcher does: ``.contiguous(memory_format=...)`` of a
    # new NCHW tensor keeps NCHW strides where the map is 1x1 (both layouts at once).
    batch, _, height, width = x.shape
    return torch.empty(
        (batch, weight.shape[0], height, width),
        dtype=x.dtype,
        device=x.device,
        memory_format=torch.channels_last,
    )


def conv3x3_triton_supports(x: torch.Tensor, weight: torch.Tensor, bias) -> bool:
    """Inputs the split-reduction kernel takes; the rest runs PyTorch's convolution."""
    from fastdiff.kernels.conv3x3 import MAX_ROWS

    batch, channels, height, width = x.shape
    if not kernel_dtype_supported(x) or channels == 0 or batch * height * width > MAX_ROWS:
        return False
    if weight.shape[0] == 0:  # PyTorch refuses a weight without output channels: so do we
        return False
    if not x.is_contiguous(memory_format=torch.channels_last):
        return False
    if height * width > 1 and x.is_contiguous():
        # One channel: NCHW too, and PyTorch's convolution may return NCHW, which the kernel's
        # channels-last output is not (a 1x1 map's output is both layouts at once).
        return False
    if weight.dtype != x.dtype or weight.device != x.device:
        return False
    return bias is None or (
        bias.dtype == x.dtype and bias.device == x.device and bias.is_contiguous()
    )


def conv3x3(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for a 3x3 ``weight`` (N, C, 3, 3). Under
    ``torch.autocast`` PyTorch's convolution runs (and autocasts)."""
    check_conv3x3_args(x, weight, bias)
    backend = select_backend(x, "conv3x3", lambda: conv3x3_key(x, weight))
    if needs_autograd(x, weight, bias) or autocast_enabled(x.device.type):
        backend = "eager"
    if backend == "triton" and conv3x3_triton_supports(x, weight, bias):
        return launch_kernel_op(conv3x3_triton, conv3x3_launch, x, weight, bias)
    return conv3x3_eager(x, weight, bias)
