"""U-Net stages: down blocks, mid blocks and up blocks, with or without cross-attention.

Names and layouts follow diffusers' ``DownBlock2D``, ``CrossAttnDownBlock2D``,
``AttnDownBlock2D``, ``UpBlock2D``, ``CrossAttnUpBlock2D``, ``AttnUpBlock2D``,
``UNetMidBlock2DCrossAttn`` and ``UNetMidBlock2D`` so state-dict keys match. Down blocks return
every intermediate feature map for the skip connections; up blocks consume them from the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastdiff import ops
from fastdiff.models.attention import Attention
from fastdiff.models.resnet import Downsample2D, ResnetBlock2D, TimeShifts, Upsample2D
from fastdiff.models.transformer import Transformer2DModel


@dataclass
class BlockSpec:
    """What every stage of one U-Net needs to know besides its own channel counts."""

    temb_channels: int | None
    groups: int
    eps: float
    dropout: float = 0.0
    output_scale_factor: float = 1.0

    def resnet(self, in_channels: int, out_channels: int) -> ResnetBlock2D:
        return ResnetBlock2D(
            in_channels,
            out_channels,
            self.temb_channels,
            self.groups,
            self.eps,
            self.dropout,
            self.output_scale_factor,
        )


@dataclass
class CrossAttentionSpec:
    """Transformer settings of one stage; ``heads`` heads of ``channels // heads`` features."""

    heads: int
    depth: int
    cross_attention_dim: int
    use_linear_projection: bool

    def build(self, channels: int, spec: BlockSpec) -> Transformer2DModel:
        if channels % self.heads != 0:
            raise ValueError(
                f"attention_head_dim={self.heads} heads do not divide the {channels} channels of "
                "this block"
            )
        return Transformer2DModel(
            self.heads,
            channels // self.heads,
            channels,
            self.depth,
            self.cross_attention_dim,
            spec.groups,
            self.use_linear_projection,
        )


@dataclass
class SelfAttentionSpec:
    """Spatial self-attention of ``AttnDownBlock2D``/``AttnUpBlock2D``: heads of ``head_dim``.

    (In these blocks diffusers reads ``attention_head_dim`` as the per-head width.)
    """

    head_dim: int

    def build(self, channels: int, spec: BlockSpec) -> Attention:
        if channels % self.head_dim != 0:
            raise ValueError(
                f"attention_head_dim={self.head_dim} does not divide the {channels} channels of "
                "this self-attention block"
            )
        return Attention(
            channels,
            channels // self.head_dim,
            self.head_dim,
            qkv_bias=True,
            norm_groups=spec.groups,
            norm_eps=spec.eps,
        )


class DownBlock(nn.Module):
    """``DownBlock2D`` (``attention=None``), ``CrossAttnDownBlock2D`` or ``AttnDownBlock2D``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        spec: BlockSpec,
        add_downsample: bool,
        downsample_padding: int = 1,
        attention: CrossAttentionSpec | SelfAttentionSpec | None = None,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            spec.resnet(in_channels if i == 0 else out_channels, out_channels)
            for i in range(num_layers)
        )
        self.has_cross_attention = isinstance(attention, CrossAttentionSpec)
        self.attentions = (
            nn.ModuleList(attention.build(out_channels, spec) for _ in range(num_layers))
            if attention is not None
            else None
        )
        self.downsamplers = (
            nn.ModuleList([Downsample2D(out_channels, downsample_padding)])
            if add_downsample
            else None
        )

    def forward(
        self,
        x: torch.Tensor,
        temb: torch.Tensor | TimeShifts | None,
        context: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


def fourier_filter(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Scale the lowest spatial frequencies of ``x`` (the centred 2x2 block of its shifted 2-D
    spectrum) by ``scale``, in float32 (FreeU's skip filter, as diffusers computes it)."""
    spectrum = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    height, width = spectrum.shape[-2:]
    mask = torch.ones(spectrum.shape[-2:], device=x.device)
    mask[height // 2 - 1 : height // 2 + 1, width // 2 - 1 : width // 2 + 1] = scale
    spectrum = torch.fft.ifftshift(spectrum * mask, dim=(-2, -1))
    filtered = torch.fft.ifftn(spectrum, dim=(-2, -1)).real.to(x.dtype)
    nhwc = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    # (.real is a strided view: give the skip the layout it came in, for the concatenation)
    return filtered.contiguous(
        memory_format=torch.channels_last if nhwc else torch.contiguous_format
    )


def freeu(
    x: torch.Tensor, skip: torch.Tensor, backbone: float, skip_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """FreeU (Si et al. 2024): the first half of the backbone's channels scaled by ``backbone``,
    the skip features' lowest frequencies by ``skip_scale``."""
    half = x.shape[1] // 2
    x = torch.cat([x[:, :half] * backbone, x[:, half:]], dim=1)
    return x, fourier_filter(skip, skip_scale)


class UpBlock(nn.Module):
    """``UpBlock2D`` (``attention=None``), ``CrossAttnUpBlock2D`` or ``AttnUpBlock2D``.

    ResNet ``i`` sees the running features concatenated with one skip: the block's own width
    for all but the last, whose skip comes from the previous (narrower) down stage.
    """

    # FreeU's (backbone scale b, skip scale s) for this block, or None (UNet.enable_freeu).
    freeu: tuple[float, float] | None = None

    def __init__(
        self,
        in_channels: int,
        prev_output_channel: int,
        out_channels: int,
        num_layers: int,
        spec: BlockSpec,
        add_upsample: bool,
        attention: CrossAttentionSpec | SelfAttentionSpec | None = None,
    ) -> None:
        super().__init__()
        # AttnUpBlock2D (self-attention): a block diffusers' FreeU leaves alone
        self.self_attention = isinstance(attention, SelfAttentionSpec)
        resnets = []
        for i in range(num_layers):
            skip_channels = in_channels if i == num_layers - 1 else out_channels
            running_channels = prev_output_channel if i == 0 else out_channels
            resnets.append(spec.resnet(running_channels + skip_channels, out_channels))
        self.resnets = nn.ModuleList(resnets)
        self.has_cross_attention = isinstance(attention, CrossAttentionSpec)
        self.attentions = (
            nn.ModuleList(attention.build(out_channels, spec) for _ in range(num_layers))
            if attention is not None
            else None
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(
        self,
        x: torch.Tensor,
        skips: list[torch.Tensor],
        temb: torch.Tensor | TimeShifts | None,
        context: torch.Tensor | None = None,
        upsample_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            skip = skips[-1 - i]
            if self.freeu is not None:
                x, skip = freeu(x, skip, *self.freeu)
            x = resnet(ops.cat_channels(x, skip), temb)  # torch.cat([x, skip], dim=1)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class MidBlockCrossAttention(nn.Module):
    """``UNetMidBlock2DCrossAttn``: ResNet, transformer, ResNet."""

    has_cross_attention = True

    def __init__(self, channels: int, spec: BlockSpec, attention: CrossAttentionSpec) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [spec.resnet(channels, channels), spec.resnet(channels, channels)]
        )
        self.attentions = nn.ModuleList([attention.build(channels, spec)])

    def forward(
        self,
        x: torch.Tensor,
        temb: torch.Tensor | TimeShifts | None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


class MidBlock(nn.Module):
    """``UNetMidBlock2D``: ResNet, then ``num_layers`` x (spatial self-attention?, ResNet).

    The VAE uses one layer with single-head attention over the whole feature map. Note: inside
    ``UNet2DConditionModel`` diffusers builds this block with ``num_layers=0`` - a single ResNet,
    no attention - and so does fastdiff, to stay checkpoint-compatible.
    """

    has_cross_attention = False

    def __init__(
        self, channels: int, spec: BlockSpec, num_layers: int = 1, add_attention: bool = True
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(spec.resnet(channels, channels) for _ in range(num_layers + 1))
        self.add_attention = add_attention
        if add_attention:
            self.attentions = nn.ModuleList(
                Attention(
                    channels, 1, channels, qkv_bias=True, norm_groups=spec.groups, norm_eps=spec.eps
                )
                for _ in range(num_layers)
            )

    def forward(
        self,
        x: torch.Tensor,
        temb: torch.Tensor | TimeShifts | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        for i, resnet in enumerate(self.resnets[1:]):
            if self.add_attention:
                x = self.attentions[i](x)
            x = resnet(x, temb)
        return x
