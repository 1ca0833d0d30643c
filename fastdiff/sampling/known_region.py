"""Inpainting with a model that never sees the mask: after every step the state is replaced, where
the mask keeps the image, by the image's latents noised to the level of the next step, so the
model only ever fills in the masked region around a consistent noisy context (the blending of
diffusers' StableDiffusionInpaintPipeline and StableDiffusionXLInpaintPipeline for 4-channel
U-Nets; RePaint, Lugmayr et al. 2022, without its resampling).

In the plan's terms (``fastdiff/sampling/plan.py``) the state after row i is the input state of
row i + 1, whose VP level is ``plan.alphas_cumprod[i + 1]`` and whose model input is
``c0[i + 1] * x``. The known latents x0 with the run's unit noise z at that level, in the state's
own scale, are

    known_i = (sqrt(alphā) x0 + sqrt(1 - alphā) z) / c0[i + 1]

(x0 + sigma z for the Euler family, the VP mix for the others: each scheduler's ``add_noise`` at
the next timestep), and after the last row, whose result is the clean sample, known = x0. The
state becomes ``(1 - mask) * known_i + mask * x``. One exception, as diffusers: before a KDPM2
midpoint call the known part is x0 + sigma' z at the step's next level sigma', not the
midpoint's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastdiff.sampling.plan import (
    INPUT_SCALE,
    NEXT_FROM_PREV_X0,
    NEXT_FROM_X,
    NOISE_STD,
    SamplingPlan,
)


@dataclass(frozen=True)
class KnownRegion:
    """The part of the latents a run keeps: ``latents`` (B, C, h, w), the image's clean latents;
    ``mask`` (B or 1, 1, h, w), 1 where the model repaints and 0 where the image is kept; and
    ``noise`` (B, C, h, w), the unit noise the run started from, which noises the kept part at
    every step as diffusers noises it."""

    latents: torch.Tensor
    mask: torch.Tensor
    noise: torch.Tensor

    def check(self, state: torch.Tensor) -> None:
        """Refuse parts that do not fit the sampler state ``state`` (B, C, h, w)."""
        shape = tuple(state.shape)
        for name in ("latents", "noise"):
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(
                    f"known region: {name} shape {tuple(getattr(self, name).shape)} != "
                    f"state shape {shape}"
                )
        mask = tuple(self.mask.shape)
        if len(mask) != len(shape) or mask[1] != 1 or mask[0] not in (1, shape[0]):
            raise ValueError(
                f"known region: mask shape {mask} must be (1 or {shape[0]}, 1, {shape[2]}, "
                f"{shape[3]}) for state shape {shape}"
            )
        if mask[2:] != shape[2:]:
            raise ValueError(f"known region: mask shape {mask} != state size {shape[2:]}")


def known_region_rows(plan: SamplingPlan) -> torch.Tensor:
    """float64 [S, 2]: row i holds (a, b) with ``known_i = a * x0 + b * z`` (module docstring)."""
    if plan.alphas_cumprod is None:
        raise ValueError("a known region needs the plan's noise levels (plan.alphas_cumprod)")
    rows = []
    for index in range(len(plan)):
        if index + 1 == len(plan):
            rows.append((1.0, 0.0))
            continue
        following = plan.coefficients[index + 1]
        if plan.sampler.startswith("kdpm2") and float(following[NEXT_FROM_PREV_X0]) != 0.0:
            # A KDPM2 midpoint call (its rows alone read the previous x0): diffusers noises
            # the kept part to the step's next level sigma', not the midpoint's s (its add_noise
            # finds sigma' where its table lists the midpoint's timestep), and so does fastdiff,
            # to give its images. The row's c3 is sigma_t / s (sigma_t: the update's target,
            # sigma' or, ancestral, sigma_down, to which fresh noise of std c6 adds up to
            # sigma'), its input scale 1 / sqrt(s^2 + 1).
            midpoint = math.sqrt(1.0 / float(following[INPUT_SCALE]) ** 2 - 1.0)
            target = float(following[NEXT_FROM_X]) * midpoint
            rows.append((1.0, math.hypot(target, float(following[NOISE_STD]))))
            continue
        alpha_bar = float(plan.alphas_cumprod[index + 1])
        scale = float(following[INPUT_SCALE])
        rows.append((math.sqrt(alpha_bar) / scale, math.sqrt(1.0 - alpha_bar) / scale))
    return torch.tensor(rows, dtype=torch.float64).reshape(len(plan), 2)


def keep_known(
    x: torch.Tensor, region: KnownRegion, signal: float | torch.Tensor, sigma: float | torch.Tensor
) -> torch.Tensor:
    """``(1 - mask) * (signal * latents + sigma * noise) + mask * x``, in x's dtype, as
    diffusers blends (with a 0/1 mask each element is exactly x or the noised image)."""
    known = region.latents.to(x.dtype) * signal + region.noise.to(x.dtype) * sigma
    mask = region.mask.to(x.dtype)
    return (1 - mask) * known + mask * x
