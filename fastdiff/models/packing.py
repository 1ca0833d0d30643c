"""Layers whose parameters lie side by side in one tensor, so that one GEMM computes them all.

A U-Net applies many small linear layers to the same input: every ResNet block projects the
timestep embedding (``time_emb_proj``), every cross-attention projects the text context to its
keys and values (``to_kv``). Under ``fold_biases`` the U-Net moves each kind's parameters into
one tensor, every layer's parameter becoming a view of its rows (names, values and the state
dict unchanged; in-place updates such as ``load_state_dict`` land in the packed tensor), and
computes the kind in one GEMM per forward. A layer that is patched or hooked, or whose
parameters were replaced (a ``.to()``), computes its own output as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdiff.models.attention import Attention, ContextProjections
from fastdiff.models.resnet import plain_layer
from fastdiff.ops.backend import needs_autograd


def packed_rows(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The tensors concatenated along dim 0, as a view, when they lie one after another in one
    storage (as ``pack_rows`` leaves them); else None."""
    first = tensors[0]
    storage = first.untyped_storage().data_ptr()
    offset = first.storage_offset()
    for tensor in tensors:
        if (
            tensor.untyped_storage().data_ptr() != storage
            or tensor.storage_offset() != offset
            or not tensor.is_contiguous()
            or tensor.dtype != first.dtype
            or tensor.shape[1:] != first.shape[1:]
        ):
            return None
        offset += tensor.numel()
    shape = (sum(tensor.shape[0] for tensor in tensors), *first.shape[1:])
    strides = [1] * len(shape)  # row-major, whatever strides the first tensor's size-1 dims had
    for dim in range(len(shape) - 2, -1, -1):
        strides[dim] = strides[dim + 1] * shape[dim + 1]
    return first.detach().as_strided(shape, strides, first.storage_offset())


def pack_rows(kinds: list[list[torch.Tensor]]) -> bool:
    """Move each list of parameters into one tensor, rows concatenated, each parameter's data
    becoming a view of its rows. Returns whether they are packed: a list whose parameters differ
    in dtype, device or trailing shape leaves every list as it is."""
    for params in kinds:
        if not params or len({(p.dtype, p.device, p.shape[1:]) for p in params}) != 1:
            return False
    with torch.no_grad():
        for params in kinds:
            if packed_rows(params) is not None:
                continue  # already packed
            packed = torch.cat([param.detach() for param in params])
            start = 0
            for param in params:
                param.data = packed[start : start + param.shape[0]]
                start += param.shape[0]
    return True


def context_attentions(model: torch.nn.Module) -> list[Attention]:
    """The fused cross-attention modules of ``model`` whose ``to_kv`` is an ``nn.Linear`` (not a
    wrapper such as a LoRA adapter module), in module order."""
    return [
        module
        for module in model.modules()
        if isinstance(module, Attention)
        and module.is_cross_attention
        and module.fused
        and isinstance(module.to_kv, torch.nn.Linear)
    ]


def pack_context_projections(modules: list[Attention]) -> bool:
    """Pack the ``to_kv`` weights (and biases, where all have one) of cross-attention modules
    that read the same context (``pack_rows``)."""
    if not modules:
        return False
    layers = [module.to_kv for module in modules]
    biases = [layer.bias for layer in layers]
    if any(bias is None for bias in biases) and any(bias is not None for bias in biases):
        return False
    kinds = [[layer.weight for layer in layers]]
    if biases[0] is not None:
        kinds.append(biases)
    return pack_rows(kinds)


def context_projections(
    modules: list[Attention], context: torch.Tensor
) -> torch.Tensor | ContextProjections:
    """Every packed module's keys and values of ``context`` from one GEMM: ``ContextProjections``
    for the blocks to pass down in place of the context. ``context`` itself where that does not
    apply (nothing packed, the weights no longer packed, a dtype that differs, gradients
    wanted, a ``to_kv`` replaced by another module); a patched or hooked ``to_kv`` gets no view
    and projects the context itself."""
    layers = [getattr(module, "to_kv", None) for module in modules]
    if not layers or not all(isinstance(layer, torch.nn.Linear) for layer in layers):
        return context  # a to_kv replaced since packing (a wrapper): each module projects
    weight = packed_rows([layer.weight for layer in layers])
    has_bias = layers[0].bias is not None
    bias = packed_rows([layer.bias for layer in layers]) if has_bias else None
    if weight is None or (has_bias and bias is None) or weight.dtype != context.dtype:
        return context
    # The packed views are detached: gradients need the modules' own layers.
    if torch.is_grad_enabled() and (
        needs_autograd(context) or any(needs_autograd(*layer.parameters()) for layer in layers)
    ):
        return context
    projected = F.linear(context, weight, bias)
    views, start = {}, 0
    for module, layer in zip(modules, layers, strict=True):
        if plain_layer(layer):
            views[id(module)] = projected[..., start : start + layer.out_features]
        start += layer.out_features
    return ContextProjections(context, projected, views)
