"""Timestep embeddings: sinusoidal features (Vaswani et al. 2017, sec. 3.5) and their MLP.

DDPM (Ho et al. 2020, appendix B) feeds the diffusion timestep to every ResNet block through a
sinusoidal embedding followed by a two-layer MLP; SD and SDXL use the same construction for the
timestep and for SDXL's micro-conditioning ``time_ids``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(
    timesteps: torch.Tensor,
    dim: int,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """Sinusoidal features of a 1-D tensor of (possibly fractional) timesteps: (N,) -> (N, dim).

    Frequency ``i`` is ``max_period ** (-i / (dim/2 - freq_shift))``; the output is
    ``[sin | cos]`` or, with ``flip_sin_to_cos``, ``[cos | sin]`` (the SD convention), zero-padded
    by one column when ``dim`` is odd. Always float32: fp16 cannot represent ``t * freq`` for
    t near 1000 precisely enough.
    """
    if timesteps.dim() != 1:
        raise ValueError(
            f"timestep_embedding expects a 1-D tensor, got shape {tuple(timesteps.shape)}"
        )
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device)
    # diffusers' order of operations (the same fp32 roundings: at t = 999 one ulp of the
    # exponent moves a feature by 3e-5); a tensor division, so dim 1 (no frequency, only the
    # zero padding column) divides nothing by zero.
    exponent = (-math.log(max_period) * exponent) / (half - freq_shift)
    angles = timesteps.float()[:, None] * torch.exp(exponent)[None, :]
    if flip_sin_to_cos:
        features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    else:
        features = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    if dim % 2 == 1:
        features = F.pad(features, (0, 1))
    return features


def guidance_scale_embedding(scales: torch.Tensor, dim: int) -> torch.Tensor:
    """The embedding of guidance scales that guidance-distilled U-Nets (latent consistency
    models, Luo et al. 2023; after Meng et al. 2023's guided distillation) take in their time
    embedding: ``[sin | cos]`` of ``1000 w`` at frequencies ``10000 ** (-i / (dim/2 - 1))``,
    zero-padded when ``dim`` is odd, float32, (N,) -> (N, dim). Callers pass w = scale - 1, as
    diffusers' pipelines do."""
    if scales.dim() != 1:
        raise ValueError(f"guidance scales must be a 1-D tensor, got {tuple(scales.shape)}")
    if dim < 4:  # the frequency step divides by dim // 2 - 1 (diffusers: NaN)
        raise ValueError(f"a guidance-scale embedding needs at least 4 features, got {dim}")
    half = dim // 2
    step = math.log(10000.0) / (half - 1)
    frequencies = torch.exp(torch.arange(half, dtype=torch.float32, device=scales.device) * -step)
    angles = (scales.float() * 1000.0)[:, None] * frequencies[None, :]
    features = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2 == 1:
        features = F.pad(features, (0, 1))
    return features


class TimestepEmbedding(nn.Module):
    """Two linear layers with a SiLU between them (keys ``linear_1``, ``linear_2``); with
    ``cond_features`` a bias-free ``cond_proj`` adds a condition (a guidance-scale embedding)
    to the input features first."""

    def __init__(self, in_features: int, out_features: int, cond_features: int | None = None):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, out_features)
        self.linear_2 = nn.Linear(out_features, out_features)
        self.cond_proj = (
            None if cond_features is None else nn.Linear(cond_features, in_features, bias=False)
        )

    def forward(self, features: torch.Tensor, condition: torch.Tensor | None = None):
        if condition is not None:
            if self.cond_proj is None:
                raise ValueError(
                    "timestep_cond given, but this U-Net's time embedding takes no condition "
                    "(time_cond_proj_dim is not set)"
                )
            features = features + self.cond_proj(condition)
        return self.linear_2(F.silu(self.linear_1(features)))
