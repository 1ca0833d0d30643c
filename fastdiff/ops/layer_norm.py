"""LayerNorm over the last dimension (transformer blocks).

Layers: ``kernels/layer_norm.py`` -> custom op ``fastdiff::layer_norm`` (with a fake kernel) ->
``layer_norm`` (checks, backend choice, eager path for unsupported inputs).
"""

import torch
import torch.nn.functional as F

from fastdiff.ops.backend import (
    cuda_extension_op,
    kernel_dtype_supported,
    needs_autograd,
    rows_are_viewable,
    select_backend,
)


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


@torch.library.custom_op("fastdiff::layer_norm", mutates_args=())
def layer_norm_triton(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    from fastdiff.kernels.layer_norm import layer_norm_forward

    return layer_norm_forward(x, weight, bias, eps)


@layer_norm_triton.register_fake
def _layer_norm_fake(x, weight, bias, eps):
    return x.new_empty(x.shape)


def layer_norm_triton_supports(x: torch.Tensor, weight, bias) -> bool:
    from fastdiff.kernels.layer_norm import MAX_ROW

    if not kernel_dtype_supported(x) or x.shape[-1] > MAX_ROW or not rows_are_viewable(x):
        return False
    return all(p is None or (p.device == x.device and p.stride(0) == 1) for p in (weight, bias))


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """LayerNorm over the last dimension of ``x`` with optional affine parameters (fp32 math)."""
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None and tuple(param.shape) != (x.shape[-1],):
            raise ValueError(
                f"layer_norm: {name} has shape {tuple(param.shape)}, expected ({x.shape[-1]},)"
            )
        if param is not None and not param.is_floating_point():
            raise ValueError(f"layer_norm: {name} must be a floating tensor, got {param.dtype}")
    backend = select_backend(x)
    if needs_autograd(x, weight, bias):
        backend = "eager"
    if backend == "cuda":
        native = cuda_extension_op("layer_norm", x, weight, bias, eps)
        if native is not None:
            return native(x, weight, bias, eps)
        backend = "triton"
    if backend == "triton" and layer_norm_triton_supports(x, weight, bias):
        return layer_norm_triton(x, weight, bias, float(eps))
    if any(p is not None and p.dtype != x.dtype for p in (weight, bias)):
        # F.layer_norm refuses most dtype mixes: compute in fp32 (fp64 for fp64 x), as the
        # kernel does, and return x's dtype.
        compute = torch.promote_types(x.dtype, torch.float32)
        weight, bias = (None if p is None else p.to(compute) for p in (weight, bias))
        return layer_norm_eager(x.to(compute), weight, bias, eps).to(x.dtype)
    return layer_norm_eager(x, weight, bias, eps)
