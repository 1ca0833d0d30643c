"""LayerNorm over the last dimension (transformer blocks), and ``add_layer_norm``: a residual
addition followed by LayerNorm, one kernel for both.

Layers: ``kernels/layer_norm.py`` -> custom ops ``fastdiff::layer_norm`` and
``fastdiff::add_layer_norm`` (with fake kernels) -> ``layer_norm`` / ``add_layer_norm`` (checks,
backend choice, eager path for unsupported inputs).
"""

import torch
import torch.nn.functional as F

from fastdiff.ops.backend import (
    check_eps,
    cuda_extension_op,
    kernel_dtype_supported,
    launch_kernel_op,
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


def layer_norm_launch(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """The Triton launcher: the custom op's implementation, also called directly
    (``launch_kernel_op``)."""
    from fastdiff.kernels.layer_norm import layer_norm_forward

    return layer_norm_forward(x, weight, bias, eps)


layer_norm_triton = torch.library.custom_op(
    "fastdiff::layer_norm", layer_norm_launch, mutates_args=()
)


@layer_norm_triton.register_fake
def _layer_norm_fake(x, weight, bias, eps):
    return x.new_empty(x.shape)


def layer_norm_triton_supports(x: torch.Tensor, weight, bias) -> bool:
    from fastdiff.kernels.layer_norm import MAX_ROW

    if not kernel_dtype_supported(x) or x.shape[-1] > MAX_ROW or not rows_are_viewable(x):
        return False
    return all(p is None or (p.device == x.device and p.stride(0) == 1) for p in (weight, bias))


def check_layer_norm_args(x: torch.Tensor, weight, bias, eps: float) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"layer_norm expects a tensor of at least one dimension, got {shape}")
    check_eps("layer_norm", eps)
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None and tuple(param.shape) != (x.shape[-1],):
            raise ValueError(
                f"layer_norm: {name} has shape {tuple(param.shape)}, expected ({x.shape[-1]},)"
            )
        if param is not None and not param.is_floating_point():
            raise ValueError(f"layer_norm: {name} must be a floating tensor, got {param.dtype}")


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """LayerNorm over the last dimension of ``x`` with optional affine parameters (fp32 math)."""
    check_layer_norm_args(x, weight, bias, eps)
    backend = select_backend(x)
    if needs_autograd(x, weight, bias):
        backend = "eager"
    if backend == "cuda":
        native = cuda_extension_op("layer_norm", x, weight, bias, eps)
        if native is not None:
            return native(x, weight, bias, eps)
        backend = "triton"
    if backend == "triton" and layer_norm_triton_supports(x, weight, bias):
        return launch_kernel_op(layer_norm_triton, layer_norm_launch, x, weight, bias, float(eps))
    if any(p is not None and p.dtype != x.dtype for p in (weight, bias)):
        # F.layer_norm refuses most dtype mixes: compute in fp32 (fp64 for fp64 x), as the
        # kernel does, and return x's dtype.
        compute = torch.promote_types(x.dtype, torch.float32)
        weight, bias = (None if p is None else p.to(compute) for p in (weight, bias))
        return layer_norm_eager(x.to(compute), weight, bias, eps).to(x.dtype)
    return layer_norm_eager(x, weight, bias, eps)


def add_layer_norm_reference(
    x, residual, weight, bias, eps: float = 1e-5, sum_bias=None, x_bias=None
):
    """fp32 reference of ``add_layer_norm``: the sum and its LayerNorm in float32, both cast back
    to ``x.dtype``."""
    total = x.float() + residual.float()
    if x_bias is not None:
        total = total + x_bias.float()
    normed = layer_norm_reference(total, weight, bias, eps).to(x.dtype)
    if sum_bias is not None:
        total = total + sum_bias.float()
    return total.to(x.dtype), normed


def add_layer_norm_eager(x, residual, weight, bias, eps: float = 1e-5, sum_bias=None, x_bias=None):
    """Plain PyTorch: the addition (rounded to ``x.dtype``; ``x + x_bias`` first, rounded, as the
    linear layer that made x would have added its bias), then LayerNorm of the rounded sum (and
    the sum plus ``sum_bias``, a third operation)."""
    total = (x if x_bias is None else x + x_bias.to(x.dtype)) + residual
    normed = layer_norm_eager(total, weight, bias, eps)
    return (total if sum_bias is None else total + sum_bias), normed


def add_layer_norm_launch(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    sum_bias: torch.Tensor | None = None,
    x_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton launcher: the custom op's implementation, also called directly
    (``launch_kernel_op``)."""
    from fastdiff.kernels.layer_norm import layer_norm_forward

    return layer_norm_forward(x, weight, bias, eps, residual, sum_bias, x_bias)


add_layer_norm_triton = torch.library.custom_op(
    "fastdiff::add_layer_norm", add_layer_norm_launch, mutates_args=()
)


@add_layer_norm_triton.register_fake
def _add_layer_norm_fake(x, residual, weight, bias, eps, sum_bias=None, x_bias=None):
    return x.new_empty(x.shape), x.new_empty(x.shape)


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    sum_bias: torch.Tensor | None = None,
    x_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x + residual, layer_norm(x + residual))``: a transformer block's residual addition and
    the LayerNorm after it. The Triton kernel reads both inputs once and writes both outputs,
    normalizing the fp32 sum; the eager path runs the two ops.

    ``sum_bias`` ((D,)) is added to the returned sum only: ``(x + residual + sum_bias,
    layer_norm(x + residual))``. A block whose next linear layer accumulates into the sum in
    place (``BasicTransformerBlock``'s feed-forward) gets that layer's bias this way.

    ``x_bias`` ((D,)) is added to x first, so to both outputs: the bias of the linear layer that
    produced x (an attention's output projection), whose GEMM then runs without one."""
    if not isinstance(residual, torch.Tensor) or residual.shape != x.shape:
        shape = tuple(residual.shape) if isinstance(residual, torch.Tensor) else residual
        raise ValueError(
            f"add_layer_norm: residual has shape {shape}, expected x's {tuple(x.shape)}"
        )
    if residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError(
            f"add_layer_norm: residual is {residual.dtype} on {residual.device}, x is {x.dtype} "
            f"on {x.device}; they must match"
        )
    check_layer_norm_args(x, weight, bias, eps)
    for name, extra in (("sum_bias", sum_bias), ("x_bias", x_bias)):
        if extra is not None and (
            tuple(extra.shape) != (x.shape[-1],) or not extra.is_floating_point()
        ):
            raise ValueError(
                f"add_layer_norm: {name} must be a floating ({x.shape[-1]},) tensor, got "
                f"{extra.dtype} of shape {tuple(extra.shape)}"
            )
    backend = select_backend(x)
    if needs_autograd(x, residual, weight, bias, sum_bias, x_bias):
        backend = "eager"
    if (
        backend in ("triton", "cuda")
        and layer_norm_triton_supports(x, weight, bias)
        and layer_norm_triton_supports(x, sum_bias, x_bias)
        and rows_are_viewable(residual)
    ):
        args = (x, residual, weight, bias, float(eps), sum_bias, x_bias)
        return launch_kernel_op(add_layer_norm_triton, add_layer_norm_launch, *args)
    if x_bias is not None:
        x = x + x_bias.to(x.dtype)
    total = x + residual
    normed = layer_norm(total, weight, bias, eps)
    return (total if sum_bias is None else total + sum_bias.to(total.dtype)), normed
