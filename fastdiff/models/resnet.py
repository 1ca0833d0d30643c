"""ResNet block and the 2x down/up samplers shared by the U-Net and the VAE.

The ResNet block is the pre-activation residual unit of DDPM (Ho et al. 2020, appendix B):
GroupNorm+SiLU -> 3x3 conv -> (+ projected timestep embedding) -> GroupNorm+SiLU -> dropout ->
3x3 conv, plus a 1x1-conv shortcut when the channel count changes. Parameter names follow
diffusers' ``ResnetBlock2D``/``Downsample2D``/``Upsample2D`` so checkpoints load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.nn.modules.module as module_hooks
from torch import nn

from fastdiff import ops
from fastdiff.models.context_groups import GroupedEmbedding, repeat_batch
from fastdiff.models.upsample_fold import (
    AUTO,
    MODES,
    FoldedWeight,
    check_mode,
    measured_mode,
    upsample_conv,
)


def is_channels_last(x: torch.Tensor) -> bool:
    """A 4-d tensor whose (B, H, W, C) permutation is contiguous: its pixels are token rows."""
    return x.dim() == 4 and x.permute(0, 2, 3, 1).is_contiguous()


# Layer types a fold may compute from their parameters, each with its own ``forward`` as defined
# in its home module (``register_plain_layer``; fastdiff's layers register themselves where they
# are defined).
PLAIN_LAYER_FORWARDS: dict[type, object] = {}


def register_plain_layer(cls: type, home: str) -> None:
    """Let ``plain_layer`` accept ``cls``: its ``forward`` now, if that is the one defined in
    ``cls`` in the module ``home`` (a prefix); one already replaced on the class is never
    plain. Kept by identity: ``plain_layer`` then compares functions, which torch.compile
    traces as Python does (a comparison of ``__qualname__`` strings did not: inside compiled
    blocks every layer looked patched, and no fold applied)."""
    forward = getattr(cls, "forward", None)
    own = (
        getattr(forward, "__module__", "").startswith(home)
        and getattr(forward, "__qualname__", "") == f"{cls.__name__}.forward"
    )
    PLAIN_LAYER_FORWARDS[cls] = forward if own else None


register_plain_layer(nn.Conv2d, "torch.nn.modules.")
register_plain_layer(nn.Linear, "torch.nn.modules.")


def plain_layer(layer: nn.Module | None) -> bool:
    """An ``nn.Conv2d`` (zero padding), ``nn.Linear`` or fastdiff layer (``register_plain_layer``)
    whose output is the plain convolution, product or normalization by its own parameters, so a
    fold may compute it from those. Anything that could change that output is called as it is:
    a subclass or wrapper, a replaced ``forward`` (on the instance or the class, as LoRA patches
    do), another padding mode, forward hooks (the layer's or global ones)."""
    expected = PLAIN_LAYER_FORWARDS.get(type(layer))
    return (
        expected is not None
        and getattr(type(layer), "forward", None) is expected
        and "forward" not in vars(layer)
        and getattr(layer, "padding_mode", "zeros") == "zeros"
        and not (layer._forward_hooks or layer._forward_pre_hooks)
        and not (module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks)
    )


def is_conv3x3(conv: nn.Conv2d) -> bool:
    """A 3x3 convolution with stride 1, zero padding 1, no dilation or groups: what
    ``fastdiff.ops.conv3x3`` computes."""
    return (
        tuple(conv.kernel_size) == (3, 3)
        and tuple(conv.stride) == (1, 1)
        and tuple(conv.padding) == (1, 1)
        and tuple(conv.dilation) == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def conv_without_bias(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` less its bias (the caller adds the bias where it costs no kernel of its own);
    a 3x3 one through ``ops.conv3x3``."""
    if is_conv3x3(conv):
        return ops.conv3x3(x, conv.weight, None)
    return F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)


def run_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``; a plain 3x3 one (see ``plain_layer``) through ``ops.conv3x3``, whose backend
    may run the split-reduction kernel on small channels-last maps."""
    if plain_layer(conv) and is_conv3x3(conv):
        return ops.conv3x3(x, conv.weight, conv.bias)
    return conv(x)


def pointwise_as_linear(
    tokens: torch.Tensor, layer: nn.Module, extra_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """A 1x1 convolution (or a linear layer) applied to (..., C) rows as one GEMM, its bias (plus
    ``extra_bias``) added inside it: cuBLAS fuses the bias, where PyTorch adds a cuDNN
    convolution's bias in a kernel of its own."""
    bias = layer.bias
    if extra_bias is not None:
        bias = extra_bias if bias is None else bias + extra_bias
    return F.linear(tokens, layer.weight.flatten(1), bias)


class TimeShifts:
    """A U-Net's timestep embedding with the shifts of its ResNet blocks computed ahead, all in one
    GEMM (``UNet2DConditionModel.time_shifts``): what the blocks pass down as ``temb`` under
    ``fold_biases``. ``packed`` is that GEMM's output and ``spans`` maps a block's id to the
    (start, width) of its ``time_emb_proj(silu(emb)) + conv1.bias`` columns in it; a block not in
    it computes its own from ``embedding``."""

    def __init__(
        self, embedding: torch.Tensor, packed: torch.Tensor, spans: dict[int, tuple[int, int]]
    ) -> None:
        self.embedding = embedding
        self.packed = packed
        self.spans = spans
        self.shifts = {
            key: packed[:, start : start + width] for key, (start, width) in spans.items()
        }

    def shift_for(self, block: nn.Module) -> torch.Tensor | None:
        return self.shifts.get(id(block))

    def repeated(self, groups: int) -> TimeShifts:
        """The same for every sample repeated ``groups`` times (``context_groups``): one copy
        of the packed shifts."""
        embedding = repeat_batch(self.embedding, groups)
        return TimeShifts(embedding, repeat_batch(self.packed, groups), self.spans)


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` parameters, computed by ``fastdiff.ops.group_norm`` (optionally + SiLU,
    optionally of ``x`` plus a per-sample, per-channel ``offset``)."""

    def forward(
        self, x: torch.Tensor, silu: bool = False, offset: torch.Tensor | None = None
    ) -> torch.Tensor:
        return ops.group_norm(
            x, self.num_groups, self.weight, self.bias, self.eps, silu=silu, offset=offset
        )


register_plain_layer(GroupNorm, GroupNorm.__module__)


class ResnetBlock2D(nn.Module):
    """Residual block; ``temb_channels=None`` (the VAE) drops the timestep projection.

    ``fold_biases`` (set by ``ModelBase.fold_conv_biases``) computes the same sum with fewer
    full-size additions: conv1's bias joins the time embedding, and the two enter norm2 as its
    ``offset``, added inside the GroupNorm kernel as it reads conv1's output (no addition of its
    own); conv2's bias joins the 1x1 shortcut's, which runs as a GEMM with the bias fused when
    the input is channels-last, and with an identity shortcut it joins the residual addition
    (``ops.bias_residual``: one pass where the kernel runs, instead of two). In a U-Net,
    ``temb`` is then a ``TimeShifts``: the U-Net has computed every block's time shift plus
    conv1 bias in one GEMM."""

    fold_biases = False

    @property
    def has_bias_folds(self) -> bool:
        """Whether ``fold_biases`` can change anything here (conv1's bias or a time embedding,
        a 1x1 shortcut, conv2's bias beside an identity shortcut)."""
        return (  # (a wrapped layer has no bias of its own)
            getattr(self.conv1, "bias", None) is not None
            or self.time_emb_proj is not None
            or self.conv_shortcut is not None
            or getattr(self.conv2, "bias", None) is not None
        )

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int | None,
        groups: int,
        eps: float,
        dropout: float = 0.0,
        output_scale_factor: float = 1.0,
    ) -> None:
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = (
            nn.Linear(temb_channels, out_channels) if temb_channels is not None else None
        )
        self.norm2 = GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )
        self.output_scale_factor = output_scale_factor

    def batchable(self) -> bool:
        """Whether the U-Net may compute this block's time shift (with conv1's bias) in its batched
        GEMM: folding on, and the layers involved plain (see ``plain_layer``)."""
        return (  # plain first: a wrapped layer has no bias to read
            self.fold_biases
            and all(plain_layer(layer) for layer in (self.conv1, self.norm2, self.time_emb_proj))
            and self.conv1.bias is not None
            and self.time_emb_proj.bias is not None
        )

    def forward(
        self, x: torch.Tensor, temb: torch.Tensor | TimeShifts | None = None
    ) -> torch.Tensor:
        batched = None
        if isinstance(temb, GroupedEmbedding):  # several contexts per sample: the rows' own
            temb = temb.for_batch(x.shape[0])
        if isinstance(temb, TimeShifts):
            batched, temb = temb.shift_for(self), temb.embedding
        hidden = self.norm1(x, silu=True)
        if batched is not None:  # time_emb_proj(silu(temb)) + conv1.bias, computed by the U-Net
            hidden = conv_without_bias(self.conv1, hidden)
            hidden = self.norm2(hidden, silu=True, offset=batched)
            return self.finish(x, hidden)
        shift = None
        if self.time_emb_proj is not None and temb is not None:
            shift = self.time_emb_proj(F.silu(temb))
        if self.fold_biases and plain_layer(self.conv1) and plain_layer(self.norm2):
            hidden = conv_without_bias(self.conv1, hidden)
            offset = self.conv1.bias
            if shift is not None:
                offset = shift if offset is None else shift + offset
            hidden = self.norm2(hidden, silu=True, offset=offset)
        else:
            hidden = run_conv(self.conv1, hidden)
            if shift is not None:
                hidden = hidden + shift[:, :, None, None]
            hidden = self.norm2(hidden, silu=True)
        return self.finish(x, hidden)

    def finish(self, x: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Dropout, conv2 and the shortcut: the block after norm2."""
        hidden = self.dropout(hidden)
        if (
            self.fold_biases
            and is_channels_last(x)
            and plain_layer(self.conv_shortcut)
            and plain_layer(self.conv2)
        ):
            hidden = conv_without_bias(self.conv2, hidden)
            rows = pointwise_as_linear(x.permute(0, 2, 3, 1), self.conv_shortcut, self.conv2.bias)
            shortcut = rows.permute(0, 3, 1, 2)  # channels-last again, no copy
        elif (
            self.fold_biases
            and self.conv_shortcut is None
            and self.output_scale_factor == 1.0
            and plain_layer(self.conv2)
            and self.conv2.bias is not None
            and is_channels_last(x)
        ):
            # An identity shortcut: conv2's bias and the residual in one addition.
            return ops.bias_residual(x, conv_without_bias(self.conv2, hidden), self.conv2.bias)
        else:
            hidden = run_conv(self.conv2, hidden)
            shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        out = shortcut + hidden
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv (key ``conv``). ``padding=0`` pads right/bottom only, as the VAE does."""

    def __init__(self, channels: int, padding: int = 1) -> None:
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x (or to ``size``) followed by a 3x3 conv (key ``conv``).

    ``fold`` (set by ``ModelBase.fold_upsampling``: None, "auto", "transposed" or "phases") runs
    a doubling as one convolution over the small map with summed weights (4 taps per output
    pixel instead of 9, no upsampled map; ``fastdiff.models.upsample_fold``); "auto" picks, per
    call, what the backend table measured fastest at the input's shape (the two steps where
    nothing was). A fold applies where the conv is plain (``plain_layer``), no gradient of its
    weight is wanted, the weight's changes can be tracked and torch.compile is not tracing;
    otherwise the two steps run. ``folds`` keeps each mode's summed weights once derived."""

    fold: str | None = None

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.folds: dict[str, FoldedWeight] = {}

    def set_fold(self, mode: str | None) -> None:
        check_mode(mode)
        self.fold = mode
        # The summed weights of modes no longer in use are let go (derived again if needed).
        usable = () if mode is None else MODES if mode == AUTO else (mode,)
        self.folds = {name: folded for name, folded in self.folds.items() if name in usable}

    def fold_mode(self, x: torch.Tensor) -> str | None:
        """The fold this call would run (None: the two steps), before ``folded_weight``'s
        checks; the two steps while torch.compile traces (it compiles the module as written)."""
        if self.fold is None or torch.compiler.is_compiling():
            return None
        return measured_mode(x) if self.fold == AUTO else self.fold

    def folded_weight(self, x: torch.Tensor, mode: str) -> torch.Tensor | None:
        """The folded weight of ``mode`` for this call, or None where a fold does not apply."""
        conv = self.conv
        if not plain_layer(conv) or tuple(conv.kernel_size) != (3, 3):
            return None
        if conv.stride != (1, 1) or conv.padding != (1, 1) or conv.dilation != (1, 1):
            return None
        if conv.groups != 1 or x.dtype != conv.weight.dtype or x.device != conv.weight.device:
            return None
        if torch.is_grad_enabled() and conv.weight.requires_grad:
            return None
        return self.folded_for(mode).get(conv.weight)

    def folded_for(self, mode: str) -> FoldedWeight:
        """The holder of ``mode``'s summed weights (created empty the first time)."""
        if mode not in self.folds:
            self.folds[mode] = FoldedWeight(mode)
        return self.folds[mode]

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None or tuple(size) == (2 * x.shape[-2], 2 * x.shape[-1]):
            mode = self.fold_mode(x)
            folded = self.folded_weight(x, mode) if mode is not None else None
            if folded is not None:
                return upsample_conv(x, folded, self.conv.bias, mode)
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        return self.conv(x)
