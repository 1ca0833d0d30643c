"""The GEGLU projection and its activation in one op: ``geglu(x @ weight.T + bias)``.

The feed-forward of an SD transformer block starts with a linear layer to ``2 * inner`` features
(diffusers' ``GEGLU.proj``) whose output only the GEGLU activation reads. Fused, that (M, 2I)
intermediate never reaches memory.

Backends: triton runs the fused kernel; eager runs the two steps (cuBLAS, then
``fastdiff.ops.geglu`` on its own backend, the path before this op existed), and so does cuda
where the extension is built (cuda means triton where it is not, as for every op,
``fastdiff.ops.backend.select_backend``). ``auto`` takes the
faster of the two for the shape from the measured table (``linear_geglu`` rows of
bench_linear_geglu.py) and the two steps where nothing is measured near it: the fused kernel is
only chosen where it was timed faster.

Layers: ``kernels/linear_geglu.py`` -> custom op ``fastdiff::linear_geglu`` (with a fake
kernel) -> ``linear_geglu`` (checks, backend choice, the two-step path for other inputs).
"""

import torch
import torch.nn.functional as F

from fastdiff.ops.autoselect import linear_geglu_key
from fastdiff.ops.backend import (
    autocast_enabled,
    kernel_dtype_supported,
    launch_kernel_op,
    needs_autograd,
    rows_are_viewable,
    select_backend,
)
from fastdiff.ops.geglu import geglu, geglu_eager, geglu_reference


def check_linear_geglu_args(x: torch.Tensor, weight: torch.Tensor, bias) -> bool:
    """Raise ValueError naming what is wrong with the arguments. Returns whether autocast is on
    for x's device (read once x is known to be a tensor), where weight and bias may have another
    dtype than x: the projection then casts them as ``nn.Linear``'s would."""
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise ValueError(
            f"linear_geglu expects tensors x and weight, got {type(x).__name__} and "
            f"{type(weight).__name__}"
        )
    if x.dim() < 1 or weight.dim() != 2 or weight.shape[0] % 2 != 0:
        raise ValueError(
            "linear_geglu expects x (..., K) and weight (2 * inner, K) with an even number of "
            f"rows (value | gate), got x {tuple(x.shape)} and weight {tuple(weight.shape)}"
        )
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"linear_geglu: weight {tuple(weight.shape)} takes {weight.shape[1]} input features, "
            f"x {tuple(x.shape)} has {x.shape[-1]}"
        )
    if bias is not None and (
        not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)
    ):
        shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"linear_geglu: bias has shape {shape}, expected ({weight.shape[0]},)")
    autocast = autocast_enabled(x.device.type)
    for name, param in (("weight", weight), ("bias", bias)):
        if param is None:
            continue
        if param.device != x.device or (not autocast and param.dtype != x.dtype):
            raise ValueError(
                f"linear_geglu: {name} is {param.dtype} on {param.device}, x is {x.dtype} on "
                f"{x.device}; they must match"
            )
    return autocast


def linear_geglu_reference(x, weight, bias=None) -> torch.Tensor:
    """fp32 reference: the projection and the activation in float32, cast back to ``x.dtype``."""
    projection = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return geglu_reference(projection).to(x.dtype)


def linear_geglu_eager(x, weight, bias=None) -> torch.Tensor:
    """Plain PyTorch in the input dtype: the projection (rounded), then the activation."""
    return geglu_eager(F.linear(x, weight, bias))


def linear_geglu_two_steps(x, weight, bias=None) -> torch.Tensor:
    """The projection by PyTorch (cuBLAS on a GPU), then ``fastdiff.ops.geglu``."""
    return geglu(F.linear(x, weight, bias))


def linear_geglu_launch(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The Triton launcher: the custom op's implementation, also called directly
    (``launch_kernel_op``)."""
    from fastdiff.kernels.linear_geglu import linear_geglu_forward

    return linear_geglu_forward(x, weight, bias)


linear_geglu_triton = torch.library.custom_op(
    "fastdiff::linear_geglu", linear_geglu_launch, mutates_args=()
)


@linear_geglu_triton.register_fake
def _linear_geglu_fake(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0] // 2))


def linear_geglu_triton_supports(x: torch.Tensor, weight: torch.Tensor, bias) -> bool:
    """Inputs the fused kernel takes; the rest runs in two steps (never wrong numbers)."""
    if not kernel_dtype_supported(x) or x.shape[-1] == 0 or not rows_are_viewable(x):
        return False
    if weight.dtype != x.dtype or weight.device != x.device or weight.stride(1) != 1:
        return False
    return bias is None or (
        bias.dtype == x.dtype and bias.device == x.device and bias.is_contiguous()
    )


def linear_geglu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``value * gelu(gate)`` for ``[value | gate] = x @ weight.T + bias`` (exact-erf GELU):
    x (..., K), weight (2 * inner, K) and bias (2 * inner,) as ``nn.Linear`` stores them, value
    rows first (diffusers' ``GEGLU``); returns (..., inner).

    Under ``torch.autocast`` it runs the two steps, so the projection is autocast as
    ``nn.Linear``'s would be (fp32 weights with half-precision activations, for example)."""
    autocast = check_linear_geglu_args(x, weight, bias)
    backend = select_backend(x, "linear_geglu", lambda: linear_geglu_key(x, weight))
    if needs_autograd(x, weight, bias) or autocast:
        backend = "eager"
    if backend == "triton" and linear_geglu_triton_supports(x, weight, bias):
        return launch_kernel_op(linear_geglu_triton, linear_geglu_launch, x, weight, bias)
    return linear_geglu_two_steps(x, weight, bias)
