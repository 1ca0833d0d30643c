"""An ``AutoencoderKL``-compatible VAE: the latent space of latent diffusion.

Rombach et al. 2022 (LDM, sec. 3.1): a convolutional encoder maps an image to a diagonal
Gaussian over a downsampled latent (trained with a reconstruction loss and a small KL term,
Kingma & Welling 2014); the decoder maps latents back to pixels. Diffusion runs on
``(z - shift_factor) * scaling_factor``. Parameter names equal diffusers' so its checkpoints load.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fastdiff.models.config import VAEConfig
from fastdiff.models.module import ModelBase
from fastdiff.models.resnet import GroupNorm, Upsample2D
from fastdiff.models.tiling import tiled_decode, tiled_encode
from fastdiff.models.unet_blocks import BlockSpec, DownBlock, MidBlock


def posterior_noise(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device | str,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The eps ~ N(0, I) that sampling a posterior of this mean shape and dtype draws from
    ``generator`` (on the generator's device, moved to ``device``)."""
    draw_device = generator.device if generator is not None else device
    noise = torch.randn(shape, generator=generator, device=draw_device, dtype=dtype)
    return noise.to(device)


def run_sliced(function, batch: torch.Tensor, enabled: bool) -> torch.Tensor:
    """``function(batch)``, one sample at a time when ``enabled`` (an autoencoder's slicing:
    less memory)."""
    if not enabled or batch.shape[0] < 2:
        return function(batch)
    return torch.cat([function(sample) for sample in batch.split(1)])


class DiagonalGaussian:
    """N(mean, diag(std^2)) from ``moments = [mean | logvar]`` on the channel axis."""

    def __init__(self, moments: torch.Tensor) -> None:
        if moments.dim() < 2 or moments.shape[1] % 2 != 0:
            raise ValueError(
                f"moments must have an even channel count (mean|logvar), got {tuple(moments.shape)}"
            )
        self.parameters = moments
        self.mean, logvar = moments.chunk(2, dim=1)
        # Clamped as in LDM so exp() stays finite in fp16.
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * eps, eps ~ N(0, I) drawn from ``generator``.

        A generator on another device (a CPU generator for CUDA latents, so that a seed gives the
        same latents everywhere) draws there and the noise is moved to the mean's device.
        """
        noise = posterior_noise(self.mean.shape, self.mean.dtype, self.mean.device, generator)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over the latent dimensions: shape (B,)."""
        terms = self.mean.pow(2) + self.var - 1.0 - self.logvar
        return 0.5 * terms.flatten(1).sum(dim=1)


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        channels = list(config.block_out_channels)
        spec = BlockSpec(None, config.norm_num_groups, 1e-6)
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        out_channels = channels[0]
        for i in range(len(channels)):
            in_channels, out_channels = out_channels, channels[i]
            self.down_blocks.append(
                DownBlock(
                    in_channels,
                    out_channels,
                    config.layers_per_block,
                    spec,
                    add_downsample=i < len(channels) - 1,
                    downsample_padding=0,
                )
            )
        self.mid_block = MidBlock(channels[-1], spec, add_attention=config.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(config.norm_num_groups, channels[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(channels[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x, _ = block(x, None)
        x = self.mid_block(x)
        return self.conv_out(self.conv_norm_out(x, silu=True))


class DecoderUpBlock(nn.Module):
    """``UpDecoderBlock2D``: ResNets without skip connections, then an optional 2x upsampler."""

    def __init__(
        self, in_channels: int, out_channels: int, num_layers: int, spec: BlockSpec, upsample: bool
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            spec.resnet(in_channels if i == 0 else out_channels, out_channels)
            for i in range(num_layers)
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        channels = list(config.block_out_channels)[::-1]
        spec = BlockSpec(None, config.norm_num_groups, 1e-6)
        self.conv_in = nn.Conv2d(config.latent_channels, channels[0], 3, padding=1)
        self.mid_block = MidBlock(channels[0], spec, add_attention=config.mid_block_add_attention)
        self.up_blocks = nn.ModuleList()
        out_channels = channels[0]
        for i in range(len(channels)):
            in_channels, out_channels = out_channels, channels[i]
            self.up_blocks.append(
                DecoderUpBlock(
                    in_channels,
                    out_channels,
                    config.layers_per_block + 1,
                    spec,
                    upsample=i < len(channels) - 1,
                )
            )
        self.conv_norm_out = GroupNorm(config.norm_num_groups, channels[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(channels[-1], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_norm_out(x, silu=True))


class AutoencoderKL(ModelBase):
    """``encode(x) -> DiagonalGaussian``, ``decode(z) -> image``; images in [-1, 1]."""

    def __init__(self, config: VAEConfig | dict[str, Any]) -> None:
        super().__init__()
        config = VAEConfig.from_dict(config) if isinstance(config, dict) else config
        self.config = config
        latent = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent, latent, 1) if config.use_post_quant_conv else None
        self.tiling_enabled = False
        self.slicing_enabled = False
        self.tile_size: int | None = None
        self.tile_overlap: int | None = None

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, variant=None):
        """Same as ``fastdiff.models.load_vae``."""
        from fastdiff.models.loading import load_vae

        return load_vae(path, dtype=dtype, device=device, variant=variant)

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def shift_factor(self) -> float:
        return self.config.shift_factor or 0.0

    @property
    def downscale_factor(self) -> int:
        return self.config.downscale_factor

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Images -> the posterior Gaussian. With ``enable_tiling()``, images larger than the
        tile (``tile_size`` latent pixels times the downscale factor) are encoded in blended
        tiles; with ``enable_slicing()``, one sample at a time."""
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"vae.encode expects (B, {self.config.in_channels}, H, W) images, got "
                f"{tuple(x.shape)}"
            )
        moments = self.sliced(self.run_encoder, x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)  # 1x1: pointwise, so it can run after tiling
        return DiagonalGaussian(moments)

    def run_encoder(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's output for ``x`` (before ``quant_conv``), tiled when enabled."""
        tile, overlap = self.default_tile()
        factor = self.downscale_factor
        if self.tiling_enabled and max(x.shape[-2:]) > tile * factor:
            return tiled_encode(self.encoder, x, tile * factor, overlap * factor, factor)
        return self.encoder(x)

    def sliced(self, function, batch: torch.Tensor) -> torch.Tensor:
        return run_sliced(function, batch, self.slicing_enabled)

    def enable_tiling(self, tile_size: int | None = None, overlap: int | None = None) -> None:
        """Decode latents, and encode images, larger than the tile in blended tiles: the tile is
        ``tile_size`` latent pixels (default: the training resolution, ``sample_size`` over the
        downscale factor), ``tile_size * downscale_factor`` image pixels for encoding; tiles
        overlap by ``overlap`` latent pixels (default a quarter of the tile)."""
        for name, value, least in (("tile_size", tile_size, 1), ("overlap", overlap, 0)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < least
            ):
                raise ValueError(f"{name} must be an int >= {least} or None, got {value!r}")
        if tile_size is not None and overlap is not None and overlap >= tile_size:
            raise ValueError(f"overlap {overlap} must be smaller than tile_size {tile_size}")
        self.tiling_enabled = True
        self.tile_size, self.tile_overlap = tile_size, overlap

    def disable_tiling(self) -> None:
        self.tiling_enabled = False

    def enable_slicing(self) -> None:
        """Encode and decode one sample of a batch at a time (as diffusers' enable_slicing)."""
        self.slicing_enabled = True

    def disable_slicing(self) -> None:
        self.slicing_enabled = False

    def default_tile(self) -> tuple[int, int]:
        """Tile = the training resolution in latent pixels; overlap a quarter of it."""
        sample_size = self.config.sample_size
        if isinstance(sample_size, (list, tuple)):
            sample_size = min(sample_size)
        tile = self.tile_size
        if tile is None:
            tile = max(1, int(sample_size) // self.downscale_factor)
        overlap = self.tile_overlap if self.tile_overlap is not None else tile // 4
        return tile, min(overlap, tile - 1)

    def decode_tile(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def decode(
        self,
        z: torch.Tensor,
        tiled: bool | None = None,
        tile_size: int | None = None,
        overlap: int | None = None,
    ) -> torch.Tensor:
        """Decode latents (unscaled: divide by ``scaling_factor`` first) to images.

        ``tiled=None`` follows ``enable_tiling()``, tiling only latents larger than the tile;
        ``tile_size`` given here without ``overlap`` overlaps by a quarter of it.
        """
        if z.dim() != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(
                f"vae.decode expects (B, {self.config.latent_channels}, h, w) latents, got "
                f"{tuple(z.shape)}"
            )
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)  # 1x1: pointwise, so it can run before tiling
        default_tile, default_overlap = self.default_tile()
        tile = default_tile if tile_size is None else tile_size
        if overlap is None:
            overlap = default_overlap if tile_size is None else tile // 4
        if tiled is None:
            tiled = self.tiling_enabled and max(z.shape[-2:]) > tile
        if not tiled:
            return self.sliced(self.decode_tile, z)

        def decode_tiles(latents: torch.Tensor) -> torch.Tensor:
            return tiled_decode(self.decode_tile, latents, tile, overlap, self.downscale_factor)

        return self.sliced(decode_tiles, z)

    def graph_state(self) -> tuple:
        """What a captured graph of encode/decode bakes in besides its inputs: the tiling and
        slicing settings decide which kernels run (fastdiff.runtime keys its graphs by this)."""
        return (self.tiling_enabled, self.tile_size, self.tile_overlap, self.slicing_enabled)

    def forward(
        self,
        x: torch.Tensor,
        sample_posterior: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Reconstruction: decode(sample or mode of encode(x))."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z)
