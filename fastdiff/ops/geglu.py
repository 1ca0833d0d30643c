"""GEGLU activation (Shazeer 2020): the feed-forward gate of SD transformer blocks.

Input is the output of the block's ``proj`` linear layer, (..., 2*D): the first half is the
value, the second half the gate. Output is ``value * gelu(gate)`` with shape (..., D), the same
split diffusers' ``GEGLU`` uses, so its weights load unchanged.

Layers: ``kernels/geglu.py`` -> custom op ``fastdiff::geglu`` (with a fake kernel) -> ``geglu``.
"""

import torch
import torch.nn.functional as F

from fastdiff.ops.backend import (
    cuda_extension_op,
    kernel_dtype_supported,
    launch_kernel_op,
    needs_autograd,
    rows_are_viewable,
    select_backend,
)


def _check(x: torch.Tensor) -> None:
    if x.dim() == 0 or x.shape[-1] % 2 != 0:
        raise ValueError(
            f"geglu: last dimension must be even (value|gate), got shape {tuple(x.shape)}"
        )


def geglu_reference(x: torch.Tensor) -> torch.Tensor:
    value, gate = x.float().chunk(2, dim=-1)
    return (value * F.gelu(gate)).to(x.dtype)


def geglu_eager(x: torch.Tensor) -> torch.Tensor:
    value, gate = x.chunk(2, dim=-1)
    return value * F.gelu(gate)


def geglu_launch(x: torch.Tensor) -> torch.Tensor:
    """The Triton launcher: the custom op's implementation, also called directly
    (``launch_kernel_op``)."""
    from fastdiff.kernels.geglu import geglu_forward

    return geglu_forward(x)


geglu_triton = torch.library.custom_op("fastdiff::geglu", geglu_launch, mutates_args=())


@geglu_triton.register_fake
def _geglu_fake(x):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


def geglu(x: torch.Tensor) -> torch.Tensor:
    """``value * gelu(gate)`` for ``x = [value | gate]`` on the last dimension (exact-erf GELU)."""
    _check(x)
    backend = select_backend(x)
    if needs_autograd(x):
        backend = "eager"
    if backend == "cuda":
        native = cuda_extension_op("geglu", x)
        if native is not None:
            return native(x)
        backend = "triton"
    if backend == "triton" and kernel_dtype_supported(x) and rows_are_viewable(x):
        return launch_kernel_op(geglu_triton, geglu_launch, x)
    return geglu_eager(x)
