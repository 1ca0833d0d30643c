"""The spatial transformer of the Stable Diffusion U-Net (Rombach et al. 2022, sec. 3.3).

``Transformer2DModel`` flattens a feature map to tokens, runs ``BasicTransformerBlock``s
(self-attention, cross-attention to the text tokens, GEGLU feed-forward (Shazeer 2020), each
pre-LayerNorm and residual), and adds the result back to the input. ``proj_in``/``proj_out`` are
1x1 convolutions (SD 1.x) or linear layers (``use_linear_projection``, SD 2.x / SDXL).
"""

from __future__ import annotations

import torch
from torch import nn

from fastdiff import ops
from fastdiff.models.attention import Attention, ContextProjections, context_states
from fastdiff.models.context_groups import groups_of, repeat_batch
from fastdiff.models.resnet import (
    GroupNorm,
    is_channels_last,
    plain_layer,
    pointwise_as_linear,
    register_plain_layer,
)
from fastdiff.ops.backend import needs_autograd


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` parameters, computed by ``fastdiff.ops.layer_norm``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps)

    def after_residual(
        self,
        x: torch.Tensor,
        residual: torch.Tensor,
        sum_bias: torch.Tensor | None = None,
        x_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x (+ x_bias) + residual (+ sum_bias), self(x (+ x_bias) + residual))`` in one
        kernel (``ops.add_layer_norm``)."""
        return ops.add_layer_norm(x, residual, self.weight, self.bias, self.eps, sum_bias, x_bias)


register_plain_layer(LayerNorm, LayerNorm.__module__)


class GEGLU(nn.Module):
    """Linear to ``2 * inner`` features (key ``proj``), then the GEGLU activation: one op,
    ``fastdiff.ops.linear_geglu``, for a plain linear layer (the backend decides whether the
    projection's output reaches memory); ``proj`` and ``fastdiff.ops.geglu`` one after the other
    for anything else (a LoRA-patched or hooked ``proj``)."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if plain_layer(self.proj):
            return ops.linear_geglu(x, self.proj.weight, self.proj.bias)
        return ops.geglu(self.proj(x))


class FeedForward(nn.Module):
    """GEGLU feed-forward with 4x expansion; keys ``net.0.proj`` and ``net.2`` as in diffusers."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList([GEGLU(dim, inner), nn.Dropout(0.0), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x

    def accumulate_into(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``out += self(x) - net[2].bias``, in place: the last projection accumulates into
        ``out`` (cuBLAS's beta = 1), so the residual addition after the feed-forward is no
        separate kernel. The caller has put the bias into ``out``."""
        hidden = self.net[1](self.net[0](x))
        projection = self.net[2]
        out = out if out.is_contiguous() else out.contiguous()
        out.view(-1, out.shape[-1]).addmm_(
            hidden.reshape(-1, hidden.shape[-1]), projection.weight.t()
        )
        return out


register_plain_layer(FeedForward, FeedForward.__module__)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention and feed-forward, each with a residual.

    ``fold_biases`` (set by ``ModelBase.fold_conv_biases``): the residual additions after the
    two attentions are done by the LayerNorms that follow them (``LayerNorm.after_residual``),
    which read the two addends and write the sum with its normalization, adding the attention's
    output-projection bias as they read (``Attention.without_output_bias``); the second one also
    adds the feed-forward's output bias to the sum it writes, and the feed-forward's last GEMM
    accumulates into that sum in place (``FeedForward.accumulate_into``), so no residual
    addition or bias is a kernel or GEMM epilogue of its own."""

    fold_biases = False
    has_bias_folds = True

    def __init__(self, dim: int, heads: int, dim_head: int, cross_attention_dim: int) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim_head)
        self.norm2 = LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim_head, cross_attention_dim=cross_attention_dim)
        self.norm3 = LayerNorm(dim)
        self.ff = FeedForward(dim)

    def accumulates_feed_forward(
        self, x: torch.Tensor, context: torch.Tensor | ContextProjections | None
    ) -> bool:
        """Whether the feed-forward may accumulate into the residual sum in place: a plain
        ``FeedForward`` whose last layer is a plain linear layer with a bias, and no gradient
        through this block (autograd keeps the sum for norm3's backward)."""
        if not plain_layer(self.ff):  # (a replaced feed-forward may have no net)
            return False
        projection = self.ff.net[2]
        return (
            plain_layer(projection)
            and projection.bias is not None
            and projection.bias.dtype == x.dtype
            # (grad mode first: listing the parameters walks every submodule, on every call)
            and not (
                torch.is_grad_enabled()
                and needs_autograd(x, context_states(context), *self.parameters())
            )
        )

    def context_for_attn2(
        self, context: torch.Tensor | ContextProjections | None
    ) -> torch.Tensor | ContextProjections | None:
        """The context as attn2 takes it: keys and values projected ahead only for a plain
        ``Attention`` (a replaced, patched or hooked attn2, its hooks, see the tensor)."""
        if isinstance(self.attn2, Attention) and plain_layer(self.attn2):
            return context
        return context_states(context)

    @staticmethod
    def attend_without_output_bias(
        attention: nn.Module, x: torch.Tensor, *context
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``Attention.without_output_bias`` for fastdiff's ``Attention``; any other module
        (a replacement) is called as it is, its output whole."""
        if isinstance(attention, Attention):
            return attention.without_output_bias(x, *context)
        return attention(x, *context), None

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | ContextProjections | None
    ) -> torch.Tensor:
        context = self.context_for_attn2(context)
        # k contexts per row (fastdiff.models.context_groups): everything up to the
        # cross-attention runs once per row, and the rows are repeated where the contexts part.
        groups = groups_of(x.shape[0], context)
        if self.fold_biases and plain_layer(self.norm2) and plain_layer(self.norm3):
            attended, out_bias = self.attend_without_output_bias(self.attn1, self.norm1(x))
            x, hidden = self.norm2.after_residual(attended, x, x_bias=out_bias)
            x, hidden = repeat_batch(x, groups), repeat_batch(hidden, groups)
            attended, out_bias = self.attend_without_output_bias(self.attn2, hidden, context)
            if self.accumulates_feed_forward(x, context):
                ff_bias = self.ff.net[2].bias
                x, hidden = self.norm3.after_residual(attended, x, ff_bias, out_bias)
                return self.ff.accumulate_into(x, hidden)
            x, hidden = self.norm3.after_residual(attended, x, x_bias=out_bias)
            return self.ff(hidden) + x
        x = repeat_batch(self.attn1(self.norm1(x)) + x, groups)
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class Transformer2DModel(nn.Module):
    """GroupNorm -> proj_in -> transformer blocks over H*W tokens -> proj_out, plus the input.

    ``fold_biases`` (set by ``ModelBase.fold_conv_biases``): 1x1-convolution projections of a
    channels-last input run as GEMMs on the token rows, the bias fused, instead of cuDNN
    convolutions whose bias PyTorch adds in a kernel of its own."""

    fold_biases = False

    @property
    def has_bias_folds(self) -> bool:
        """Whether ``fold_biases`` can change anything here (1x1-convolution projections)."""
        return not self.use_linear_projection

    def __init__(
        self,
        heads: int,
        dim_head: int,
        in_channels: int,
        num_layers: int,
        cross_attention_dim: int,
        norm_groups: int,
        use_linear_projection: bool,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.use_linear_projection = use_linear_projection
        self.norm = GroupNorm(norm_groups, in_channels, eps=1e-6)
        if use_linear_projection:
            self.proj_in = nn.Linear(in_channels, inner)
            self.proj_out = nn.Linear(inner, in_channels)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner, 1)
            self.proj_out = nn.Conv2d(inner, in_channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, cross_attention_dim)
            for _ in range(num_layers)
        )

    @staticmethod
    def project(layer: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """proj_in / proj_out on (B, N, C) token rows: the linear layer itself, or a 1x1
        convolution's weights as one GEMM."""
        return pointwise_as_linear(tokens, layer) if isinstance(layer, nn.Conv2d) else layer(tokens)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        batch, _, height, width = x.shape
        hidden = self.norm(x)
        on_tokens = self.use_linear_projection or (
            self.fold_biases
            and is_channels_last(hidden)
            and plain_layer(self.proj_in)
            and plain_layer(self.proj_out)
        )
        if not on_tokens:
            hidden = self.proj_in(hidden)
        # (B, C, H, W) -> (B, H*W, C): a view when the input is channels-last.
        tokens = hidden.permute(0, 2, 3, 1).reshape(batch, height * width, hidden.shape[1])
        if on_tokens:
            tokens = self.project(self.proj_in, tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        if on_tokens:
            tokens = self.project(self.proj_out, tokens)
        # (its blocks may have met several contexts per row: tokens' batch, not x's)
        hidden = tokens.reshape(-1, height, width, tokens.shape[-1]).permute(0, 3, 1, 2)
        if not on_tokens:
            hidden = self.proj_out(hidden)
        # Keep the caller's memory format so the following convolutions see one layout.
        layout = (
            torch.channels_last
            if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            else torch.contiguous_format
        )
        if hidden.shape[0] != x.shape[0]:  # its blocks met several contexts per row
            x = repeat_batch(x, hidden.shape[0] // x.shape[0])
        return hidden.contiguous(memory_format=layout) + x
