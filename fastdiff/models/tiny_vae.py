"""An ``AutoencoderTiny``-compatible autoencoder (TAESD, Ollin Boer Bohan 2023): a small
deterministic encoder and decoder trained to map to and from the latent space of a Stable
Diffusion VAE, at a fraction of its cost, so decoding stops dominating few-step generation.

Both halves are plain convolution stacks: 3x3 convolutions with ReLUs, residual blocks of three
convolutions, strided convolutions down and nearest-neighbour upsampling up. The decoder first
soft-clamps the latents to (-3, 3) with ``3 tanh(z / 3)``; the encoder reads images in [0, 1].
Unlike ``AutoencoderKL`` the encoder returns latents, not a posterior to sample, so encoding draws
no random numbers (as in diffusers). Parameter names equal diffusers' so its folders load.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fastdiff.models.config import ConfigBase
from fastdiff.models.config_checks import require_bool, require_choice, require_positive_int
from fastdiff.models.module import ModelBase
from fastdiff.models.vae import run_sliced


@dataclasses.dataclass
class TinyVAEConfig(ConfigBase):
    """``AutoencoderTiny`` configuration (same keys and defaults as diffusers)."""

    class_name = "AutoencoderTiny"

    in_channels: int = 3
    out_channels: int = 3
    encoder_block_out_channels: Sequence[int] = (64, 64, 64, 64)
    decoder_block_out_channels: Sequence[int] = (64, 64, 64, 64)
    act_fn: str = "relu"
    upsample_fn: str = "nearest"
    latent_channels: int = 4
    upsampling_scaling_factor: int = 2
    num_encoder_blocks: Sequence[int] = (1, 3, 3, 3)
    num_decoder_blocks: Sequence[int] = (3, 3, 3, 1)
    latent_magnitude: float = 3
    latent_shift: float = 0.5
    force_upcast: bool = False  # always false, as diffusers registers it whatever the file says
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    # diffusers registers the decoder's widths under this key; pipelines read the VAE's scale
    # factor, 2 ** (len(block_out_channels) - 1), from it.
    block_out_channels: Sequence[int] | None = None
    extra: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in ("in_channels", "out_channels", "latent_channels"):
            require_positive_int(key, getattr(self, key))
        require_choice("act_fn", self.act_fn, ("relu",))
        require_choice("upsample_fn", self.upsample_fn, ("nearest",))
        require_choice("upsampling_scaling_factor", self.upsampling_scaling_factor, (2,))
        require_bool("force_upcast", self.force_upcast)
        self.force_upcast = False  # diffusers' AutoencoderTiny never upcasts (fp16 is fine)
        for widths, counts in (
            ("encoder_block_out_channels", "num_encoder_blocks"),
            ("decoder_block_out_channels", "num_decoder_blocks"),
        ):
            for key in (widths, counts):
                value = getattr(self, key)
                if not isinstance(value, (list, tuple)) or not value:
                    raise ValueError(f"config {key} must be a non-empty list, got {value!r}")
            if len(getattr(self, widths)) != len(getattr(self, counts)):
                raise ValueError(f"config {widths} and {counts} must have the same length")
            for value in getattr(self, widths):
                require_positive_int(widths, value)
            for value in getattr(self, counts):  # a stage may have no blocks
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError(f"config {counts} must hold ints >= 0, got {value!r}")
        for key in ("encoder_block_out_channels", "decoder_block_out_channels"):
            # diffusers' strided convolutions and blocks keep the width they are given
            if len(set(getattr(self, key))) != 1:
                raise ValueError(f"config {key} must all be equal, got {list(getattr(self, key))}")
        if self.block_out_channels is None:
            self.block_out_channels = tuple(self.decoder_block_out_channels)

    @property
    def downscale_factor(self) -> int:
        return 2 ** (len(self.encoder_block_out_channels) - 1)


class TinyBlock(nn.Module):
    """relu(conv(relu(conv(relu(conv(x))))) + x): three 3x3 convolutions and a residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )
        self.skip = nn.Identity()  # diffusers' 1x1 skip only exists between unequal widths
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


def encoder_layers(config: TinyVAEConfig) -> nn.Sequential:
    layers: list[nn.Module] = []
    for index, (width, count) in enumerate(
        zip(config.encoder_block_out_channels, config.num_encoder_blocks, strict=True)
    ):
        if index == 0:
            layers.append(nn.Conv2d(config.in_channels, width, 3, padding=1))
        else:
            layers.append(nn.Conv2d(width, width, 3, padding=1, stride=2, bias=False))
        layers.extend(TinyBlock(width) for _ in range(count))
    layers.append(
        nn.Conv2d(config.encoder_block_out_channels[-1], config.latent_channels, 3, padding=1)
    )
    return nn.Sequential(*layers)


def decoder_layers(config: TinyVAEConfig) -> nn.Sequential:
    widths = list(config.decoder_block_out_channels)
    layers: list[nn.Module] = [
        nn.Conv2d(config.latent_channels, widths[0], 3, padding=1),
        nn.ReLU(),
    ]
    for index, (width, count) in enumerate(zip(widths, config.num_decoder_blocks, strict=True)):
        last = index == len(widths) - 1
        layers.extend(TinyBlock(width) for _ in range(count))
        if not last:
            layers.append(nn.Upsample(scale_factor=config.upsampling_scaling_factor))
        layers.append(
            nn.Conv2d(width, config.out_channels if last else width, 3, padding=1, bias=last)
        )
    return nn.Sequential(*layers)


class TinyEncoder(nn.Module):
    def __init__(self, config: TinyVAEConfig) -> None:
        super().__init__()
        self.layers = encoder_layers(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.add(1).div(2))  # images in [-1, 1] -> [0, 1]


class TinyDecoder(nn.Module):
    def __init__(self, config: TinyVAEConfig) -> None:
        super().__init__()
        self.layers = decoder_layers(config)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = torch.tanh(z / 3) * 3  # soft clamp to (-3, 3)
        return self.layers(z).mul(2).sub(1)  # [0, 1] -> [-1, 1]


class AutoencoderTiny(ModelBase):
    """``encode(x) -> latents`` (deterministic), ``decode(z) -> image``; images in [-1, 1]."""

    deterministic = True  # encode() returns latents: no posterior, no random draw

    def __init__(self, config: TinyVAEConfig | dict[str, Any]) -> None:
        super().__init__()
        config = TinyVAEConfig.from_dict(config) if isinstance(config, dict) else config
        self.config = config
        self.encoder = TinyEncoder(config)
        self.decoder = TinyDecoder(config)
        self.slicing_enabled = False

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, variant=None):
        """Same as ``fastdiff.models.load_vae`` (which reads either autoencoder)."""
        from fastdiff.models.loading import load_vae

        return load_vae(path, dtype=dtype, device=device, variant=variant)

    @property
    def downscale_factor(self) -> int:
        return self.config.downscale_factor

    def check(self, tensor: torch.Tensor, channels: int, what: str) -> None:
        if tensor.dim() != 4 or tensor.shape[1] != channels:
            raise ValueError(f"vae.{what} expects (B, {channels}, H, W), got {tuple(tensor.shape)}")

    def sliced(self, function, batch: torch.Tensor) -> torch.Tensor:
        return run_sliced(function, batch, self.slicing_enabled)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> latents (unscaled, as the diffusion model's before scaling)."""
        self.check(x, self.config.in_channels, "encode")
        return self.sliced(self.encoder, x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1]."""
        self.check(z, self.config.latent_channels, "decode")
        return self.sliced(self.decoder, z)

    def enable_slicing(self) -> None:
        self.slicing_enabled = True

    def disable_slicing(self) -> None:
        self.slicing_enabled = False

    def enable_tiling(self, tile_size: int | None = None, overlap: int | None = None) -> None:
        raise ValueError(
            "the tiny autoencoder (AutoencoderTiny) decodes large images whole; tiling is "
            "implemented for AutoencoderKL only"
        )

    def disable_tiling(self) -> None:
        pass

    def graph_state(self) -> tuple:
        """What a captured encode/decode graph bakes in besides its inputs."""
        return (self.slicing_enabled,)

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> [0, 1] (``latent_magnitude``, ``latent_shift``), as TAESD stores them."""
        magnitude, shift = self.config.latent_magnitude, self.config.latent_shift
        return z.div(2 * magnitude).add(shift).clamp(0, 1)

    def unscale_latents(self, z: torch.Tensor) -> torch.Tensor:
        magnitude, shift = self.config.latent_magnitude, self.config.latent_shift
        return z.sub(shift).mul(2 * magnitude)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction through 8-bit latents, as diffusers' forward: decode(unscale(
        round(255 scale(encode(x))) / 255))."""
        stored = self.scale_latents(self.encode(x)).mul(255).round().byte()
        return self.decode(self.unscale_latents(stored / 255.0))
