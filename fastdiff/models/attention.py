"""Multi-head attention with optional fused projections (Vaswani et al. 2017, sec. 3.2).

``Attention`` keeps diffusers' parameter names (``to_q``, ``to_k``, ``to_v``, ``to_out.0`` and,
for the VAE's spatial attention, ``group_norm``). ``fuse_projections()`` replaces the separate
projections by one ``to_qkv`` (self-attention) or ``to_kv`` (cross-attention) linear layer: one
GEMM instead of three. State-dict hooks keep the unfused key names in ``state_dict()`` and accept
them in ``load_state_dict()``, so a fused model still saves and loads diffusers checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff import ops
from fastdiff.models.resnet import GroupNorm, plain_layer, register_plain_layer

# Old diffusers (< 0.14) VAE attention names, renamed on load; value is the current name.
LEGACY_ATTENTION_NAMES = {
    "query": "to_q",
    "key": "to_k",
    "value": "to_v",
    "proj_attn": "to_out.0",
}


def concat_linears(layers: list[nn.Linear]) -> nn.Linear:
    """One Linear whose output is the outputs of ``layers`` concatenated, same device/dtype;
    its parameters want gradients where the layers' did (a model frozen by
    ``requires_grad_(False)`` before the fusion stays frozen after it)."""
    first = layers[0]
    has_bias = first.bias is not None
    fused = nn.Linear(
        first.in_features,
        sum(layer.out_features for layer in layers),
        bias=has_bias,
        device=first.weight.device,
        dtype=first.weight.dtype,
    )
    with torch.no_grad():
        fused.weight.copy_(torch.cat([layer.weight for layer in layers], dim=0))
        if has_bias:
            fused.bias.copy_(torch.cat([layer.bias for layer in layers], dim=0))
    fused.weight.requires_grad_(any(layer.weight.requires_grad for layer in layers))
    if has_bias:
        fused.bias.requires_grad_(any(layer.bias.requires_grad for layer in layers))
    return fused


class ContextProjections:
    """The text context with its keys and values already projected for the cross-attention
    modules that read it (``fastdiff.models.packing.context_projections``: one GEMM for all of
    them): what a U-Net's blocks pass down in place of the context under ``fold_biases``, and
    what a caller may pass as ``encoder_hidden_states`` to project a context once for many
    steps. ``projected`` is that GEMM's output; ``views`` maps a module's id to its (B, T,
    2 * inner) ``to_kv`` output, a view of it; a module not in it projects ``states`` itself."""

    def __init__(
        self, states: torch.Tensor, projected: torch.Tensor, views: dict[int, torch.Tensor]
    ) -> None:
        self.states = states
        self.projected = projected
        self.views = views

    def keys_values_for(self, module: nn.Module) -> torch.Tensor | None:
        return self.views.get(id(module))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The tensors it holds (its views are of ``projected``): for memory reports."""
        return self.states, self.projected

    def signature(self) -> tuple:
        """What two projections must share for ``load_``: the modules, the shape and dtype."""
        return (tuple(sorted(self.views)), tuple(self.projected.shape), str(self.projected.dtype))

    def load_(self, other: ContextProjections, states_loaded: bool = False) -> None:
        """Copy ``other``'s context and projections into this one's tensors, in place (the
        static buffers a captured CUDA graph reads). Both must come from the same packing.
        ``states_loaded``: this one's context already holds ``other``'s (the caller copied it
        with the rest of the condition), so only the projections are copied."""
        if other.signature() != self.signature():
            raise ValueError(
                "context projections of another packing: the U-Net's packed cross-attentions "
                f"changed ({len(other.views)} modules, {tuple(other.projected.shape)}, against "
                f"{len(self.views)}, {tuple(self.projected.shape)})"
            )
        if other.states is not self.states and not states_loaded:
            self.states.copy_(other.states)
        self.projected.copy_(other.projected)


def context_states(context: torch.Tensor | ContextProjections | None) -> torch.Tensor | None:
    """The context tensor itself, whether or not its projections were computed ahead."""
    return context.states if isinstance(context, ContextProjections) else context


class Attention(nn.Module):
    """Self- or cross-attention over (B, N, C) tokens; 4-D input when ``norm_groups`` is set.

    ``cross_attention_dim=None`` makes it self-attention. With ``norm_groups`` (the VAE mid-block
    form) the module takes (B, C, H, W), group-normalises it, attends over the H*W positions and
    adds the input back.
    """

    def __init__(
        self,
        query_dim: int,
        heads: int,
        dim_head: int,
        cross_attention_dim: int | None = None,
        qkv_bias: bool = False,
        norm_groups: int | None = None,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.dim_head = dim_head
        self.is_cross_attention = cross_attention_dim is not None
        context_dim = cross_attention_dim if cross_attention_dim is not None else query_dim
        self.group_norm = (
            GroupNorm(norm_groups, query_dim, eps=norm_eps) if norm_groups is not None else None
        )
        self.to_q = nn.Linear(query_dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim, inner, bias=qkv_bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(0.0)])
        self.fused = False
        self._register_state_dict_hook(_unfuse_state_dict)
        self._register_load_state_dict_pre_hook(_rename_and_fuse_incoming, with_module=True)

    def fuse_projections(self) -> bool:
        """Concatenate q/k/v (self-attention) or k/v (cross-attention) into one Linear; returns
        whether this call fused them. Projections that are hooked, patched or wrapped (see
        ``plain_layer``) are left as they are: the fused layer would run without the patch."""
        if self.fused:
            return False
        _, names = self.fused_layout()
        if not all(plain_layer(getattr(self, name)) for name in names):
            return False
        if self.is_cross_attention:
            self.to_kv = concat_linears([self.to_k, self.to_v])
            del self.to_k, self.to_v
        else:
            self.to_qkv = concat_linears([self.to_q, self.to_k, self.to_v])
            del self.to_q, self.to_k, self.to_v
        self.fused = True
        return True

    def fused_layout(self) -> tuple[str, tuple[str, ...]]:
        """Name of the fused layer and the diffusers layers it replaces."""
        if self.is_cross_attention:
            return "to_kv", ("to_k", "to_v")
        return "to_qkv", ("to_q", "to_k", "to_v")

    def split_heads(self, x: torch.Tensor, parts: int) -> list[torch.Tensor]:
        """(B, N, parts*H*D) -> ``parts`` tensors of shape (B, H, N, D)."""
        batch, tokens, _ = x.shape
        x = x.view(batch, tokens, parts, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        return list(x.unbind(0))

    def attend(
        self,
        x: torch.Tensor,
        context: torch.Tensor | ContextProjections | None,
        output_bias: bool = True,
    ) -> torch.Tensor:
        projected = None
        if isinstance(context, ContextProjections):
            projected = context.keys_values_for(self) if self.fused else None
            context = context.states
        if self.fused and not self.is_cross_attention:
            q, k, v = self.split_heads(self.to_qkv(x), 3)
        else:
            source = x if context is None else context
            (q,) = self.split_heads(self.to_q(x), 1)
            if self.fused:
                kv = self.to_kv(source) if projected is None else projected
                k, v = self.split_heads(kv, 2)
            else:
                (k,) = self.split_heads(self.to_k(source), 1)
                (v,) = self.split_heads(self.to_v(source), 1)
        out = ops.attention(q, k, v)
        batch, _, tokens, _ = out.shape
        out = out.transpose(1, 2).reshape(batch, tokens, self.heads * self.dim_head)
        if not output_bias:  # the caller adds to_out[0]'s bias (without_output_bias)
            return F.linear(out, self.to_out[0].weight)
        return self.to_out[1](self.to_out[0](out))

    def without_output_bias(
        self, x: torch.Tensor, context: torch.Tensor | ContextProjections | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(self(x, context) - b, b)`` with ``b`` the output projection's bias: its GEMM runs
        without the bias (cuBLAS's bias epilogue made the GEMM slower at SD1.5's 8192×320×320:
        about 10 µs per call against 6.7 without, H200 profile in benchmarks/NOTES.md), for a
        caller that adds it in a kernel it runs anyway (``BasicTransformerBlock``'s
        ``add_layer_norm``). ``(self(x, context), None)`` where that does not apply: this module,
        its output projection or its dropout patched or hooked, no bias, a dropout that drops,
        the VAE form (``group_norm``)."""
        projection, dropout = self.to_out
        splits = (
            self.group_norm is None
            and plain_layer(self)
            and plain_layer(projection)
            and projection.bias is not None
            and type(dropout) is nn.Dropout
            and (dropout.p == 0 or not dropout.training)
            and "forward" not in vars(dropout)
            and not (dropout._forward_hooks or dropout._forward_pre_hooks)
        )
        if not splits:
            return self(x, context), None
        return self.attend(x, context, output_bias=False), projection.bias

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | ContextProjections | None = None
    ) -> torch.Tensor:
        if self.group_norm is None:
            return self.attend(x, context)
        batch, channels, height, width = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)
        out = self.attend(tokens, None)
        return out.transpose(1, 2).reshape(batch, channels, height, width) + x


register_plain_layer(Attention, Attention.__module__)


def _unfuse_state_dict(module: Attention, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict hook: write a fused layer back as diffusers' separate to_q/to_k/to_v keys."""
    if not module.fused:
        return
    fused_name, names = module.fused_layout()
    for param in ("weight", "bias"):
        key = f"{prefix}{fused_name}.{param}"
        if key not in state_dict:
            continue
        tensor = state_dict.pop(key)
        for name, chunk in zip(names, tensor.chunk(len(names), dim=0), strict=True):
            state_dict[f"{prefix}{name}.{param}"] = chunk


def _rename_and_fuse_incoming(module: Attention, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: accept legacy VAE names, and unfused keys on a fused module."""
    for key in [key for key in state_dict if key.startswith(prefix)]:
        name, _, param = key[len(prefix) :].partition(".")
        if name in LEGACY_ATTENTION_NAMES and param in ("weight", "bias"):
            tensor = state_dict.pop(key)
            if tensor.dim() == 4 and tensor.shape[2:] == (1, 1):  # a linear weight's 1x1-conv
                tensor = tensor[:, :, 0, 0]  # form; any other kernel is left to mismatch
            state_dict[f"{prefix}{LEGACY_ATTENTION_NAMES[name]}.{param}"] = tensor
    if not module.fused:
        return
    fused_name, names = module.fused_layout()
    for param in ("weight", "bias"):
        keys = [f"{prefix}{name}.{param}" for name in names]
        if all(key in state_dict for key in keys):
            state_dict[f"{prefix}{fused_name}.{param}"] = torch.cat(
                [state_dict.pop(key) for key in keys], dim=0
            )
