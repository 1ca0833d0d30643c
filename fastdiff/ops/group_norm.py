"""GroupNorm with an optional fused SiLU: the most frequent op in a U-Net's ResNet blocks.

Layers: ``kernels/group_norm.py`` (Triton launcher) -> custom op ``fastdiff::group_norm`` (with a
fake kernel, so torch.compile and CUDA graphs trace through it) -> ``group_norm`` (checks the
arguments, picks the backend, sends unsupported inputs to the eager path).
"""

import torch
import torch.nn.functional as F

from fastdiff.ops.autoselect import group_norm_key
from fastdiff.ops.backend import (
    check_eps,
    cuda_extension_op,
    kernel_dtype_supported,
    launch_kernel_op,
    needs_autograd,
    select_backend,
)

MAX_CHANNELS_PER_GROUP = 8192  # the finalize kernel holds one group's channels in registers


def group_norm_reference(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    silu: bool = False,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp32 reference: statistics and affine in float32, result cast back to ``x.dtype``.
    ``offset`` ((N, C) or (C,)) is added to ``x`` in float32 first."""
    values = x.float()
    if offset is not None:
        values = values + broadcast_offset(offset.float(), x)
    out = group_norm_in_dense_layout(
        values,
        num_groups,
        None if weight is None else weight.float(),
        None if bias is None else bias.float(),
        eps,
    )
    if silu:
        out = F.silu(out)
    return out.to(x.dtype)


def group_norm_in_dense_layout(x, num_groups, weight, bias, eps):
    """``F.group_norm`` computed on an (N, C, *)-contiguous copy of ``x`` when it has another
    layout, the result in ``x``'s layout: PyTorch's CPU kernel for channels-last inputs loses
    the variance to cancellation (fp32, mean 1000: an error of 3, against 4e-5 in NCHW)."""
    if x.is_contiguous():
        return F.group_norm(x, num_groups, weight, bias, eps)
    out = F.group_norm(x.contiguous(), num_groups, weight, bias, eps)
    for layout, dims in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if x.dim() == dims and x.is_contiguous(memory_format=layout):
            return out.contiguous(memory_format=layout)
    return out


def broadcast_offset(offset: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """An (N, C) or (C,) offset viewed so that it broadcasts over ``x``'s (N, C, *) shape."""
    spatial = (1,) * (x.dim() - 2)
    if offset.dim() == 1:
        return offset.view(1, -1, *spatial)
    return offset.view(*offset.shape, *spatial)


def group_norm_eager(x, num_groups, weight, bias, eps=1e-5, silu=False, offset=None):
    """Plain PyTorch in the input dtype: what an unfused model runs (the offset is a separate
    addition whose sum is rounded to ``x.dtype``)."""
    if offset is not None:
        x = x + broadcast_offset(offset.to(x.dtype), x)
    if x.device.type == "cpu":  # the reference path on CPU: see group_norm_in_dense_layout
        out = group_norm_in_dense_layout(x, num_groups, weight, bias, eps)
    else:
        out = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(out) if silu else out


def check_group_norm_args(
    x: torch.Tensor, num_groups: int, weight, bias, eps: float = 1e-5, offset=None
) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"group_norm expects an (N, C, *) tensor, got {shape}")
    channels = x.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int):
        raise ValueError(f"group_norm: num_groups must be an int, got {num_groups!r}")
    check_eps("group_norm", eps)
    if num_groups < 1 or channels % num_groups != 0:
        raise ValueError(
            f"group_norm: num_groups={num_groups} must divide the {channels} channels of x"
        )
    for name, param in (("weight", weight), ("bias", bias)):
        if param is None:
            continue
        if not isinstance(param, torch.Tensor):
            raise ValueError(
                f"group_norm: {name} must be a ({channels},) tensor or None, got "
                f"{type(param).__name__}"
            )
        if tuple(param.shape) != (channels,):
            raise ValueError(
                f"group_norm: {name} has shape {tuple(param.shape)}, expected ({channels},)"
            )
        if not param.is_floating_point():
            raise ValueError(f"group_norm: {name} must be a floating tensor, got {param.dtype}")
    if offset is not None:
        allowed = [(x.shape[0], channels), (channels,)]
        if not isinstance(offset, torch.Tensor) or tuple(offset.shape) not in allowed:
            shape = tuple(offset.shape) if isinstance(offset, torch.Tensor) else offset
            raise ValueError(
                f"group_norm: offset has shape {shape}, expected {allowed[0]} (per sample and "
                f"channel) or {allowed[1]} (per channel)"
            )
        if not offset.is_floating_point():
            raise ValueError(f"group_norm: offset must be a floating tensor, got {offset.dtype}")
        if offset.device != x.device:
            raise ValueError(f"group_norm: offset is on {offset.device}, x on {x.device}")


def group_norm_launch(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    silu: bool,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Triton launcher: the custom op's implementation, also called directly
    (``launch_kernel_op``)."""
    from fastdiff.kernels.group_norm import group_norm_forward

    return group_norm_forward(x, num_groups, weight, bias, eps, silu, offset)


group_norm_triton = torch.library.custom_op(
    "fastdiff::group_norm", group_norm_launch, mutates_args=()
)


@group_norm_triton.register_fake
def _group_norm_fake(x, num_groups, weight, bias, eps, silu, offset=None):
    return torch.empty_like(x)


# Elements of one sample the kernels index in int32 (channel and spatial offsets within it): a
# larger sample (a VAE decode at 4096x4104 with 128 channels) runs eagerly.
MAX_SAMPLE_ELEMENTS = 2**31


def group_norm_triton_supports(x: torch.Tensor, num_groups: int, weight, bias, offset=None) -> bool:
    """Inputs the Triton kernels handle; everything else runs eagerly (never wrong numbers)."""
    from fastdiff.kernels.group_norm import flat_strides

    if not kernel_dtype_supported(x):
        return False
    strides = flat_strides(x)
    if x.shape[1] // num_groups > MAX_CHANNELS_PER_GROUP or strides is None:
        return False
    if x.numel():
        if x.numel() // x.shape[0] >= MAX_SAMPLE_ELEMENTS:
            return False  # the kernels index within a sample in int32
        # ... through x's strides, which a view spreads wider than its elements (a channel
        # slice of a channels-last map): its largest offset within a sample must fit too.
        spatial = x.numel() // (x.shape[0] * x.shape[1])
        if (x.shape[1] - 1) * strides[1] + (spatial - 1) * strides[2] >= MAX_SAMPLE_ELEMENTS:
            return False
    if offset is not None and offset.dtype not in (x.dtype, torch.float32):
        return False
    return all(p is None or (p.device == x.device and p.stride(0) == 1) for p in (weight, bias))


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    silu: bool = False,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """GroupNorm over (N, C, *) input, NCHW or channels-last, optionally followed by SiLU.

    Statistics are computed in fp32 whatever the input dtype; the output has the input's dtype and
    memory format. ``offset`` ((N, C) per sample and channel, or (C,)) is added to ``x`` first:
    ``group_norm(x, g, offset=t)`` is ``group_norm(x + t[:, :, None, None], g)``, but the Triton
    kernels add it as they read ``x`` (in fp32), so the sum is never written.
    """
    check_group_norm_args(x, num_groups, weight, bias, eps, offset)
    backend = select_backend(x, "group_norm", lambda: group_norm_key(x))
    if needs_autograd(x, weight, bias, offset):
        backend = "eager"
    if backend == "cuda":
        # The extension has no offset: the Triton kernels take it.
        native = (
            cuda_extension_op("group_norm", x, num_groups, weight, bias, eps, silu)
            if offset is None
            else None
        )
        if native is not None:
            return native(x, num_groups, weight, bias, eps, silu)
        backend = "triton"
    if backend == "triton" and group_norm_triton_supports(x, num_groups, weight, bias, offset):
        args = (x, num_groups, weight, bias, float(eps), bool(silu), offset)
        return launch_kernel_op(group_norm_triton, group_norm_launch, *args)
    if offset is not None:
        x = x + broadcast_offset(offset.to(x.dtype), x)
    if any(p is not None and p.dtype != x.dtype for p in (weight, bias)):
        # F.group_norm refuses most dtype mixes (fp16 x with fp32 weight, as under autocast):
        # compute in fp32 (fp64 for fp64 x), as the kernels do, and return x's dtype.
        compute = torch.promote_types(x.dtype, torch.float32)
        weight, bias = (None if p is None else p.to(compute) for p in (weight, bias))
        out = group_norm_eager(x.to(compute), num_groups, weight, bias, eps, silu)
        return out.to(x.dtype)
    return group_norm_eager(x, num_groups, weight, bias, eps, silu)
