"""Checks of ``Pipeline.__call__``'s plain arguments, each failing with a message that names the
argument and what it accepts (the conditioning inputs are checked in ``conditioning.py``)."""

from __future__ import annotations

import math
import numbers
import operator
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from fastdiff.sampling import SAMPLERS
from fastdiff.sampling.config import default_sampler, default_sampler_note

OUTPUT_TYPES = ("pil", "tensor", "np", "latent")


@dataclass(frozen=True)
class CallDefaults:
    """What ``Pipeline.__call__`` uses for the arguments a call leaves out (None): the defaults
    of the diffusers pipeline and scheduler a folder names (``for_folder``)."""

    guidance_scale: float = 7.5
    inpaint_guidance_scale: float = 7.5  # with a mask: the inpainting pipelines' default
    sampler: str = "ddim"
    strength: float = 0.8  # img2img
    inpaint_strength: float = 1.0  # inpainting U-Nets: from pure noise
    num_inference_steps: int = 20  # diffusers' 50, except for latent consistency models' 4
    # img2img with the lcm sampler as LatentConsistencyModelImg2ImgPipeline runs it (all steps,
    # within the strength's share of the distillation schedule), not by cutting the plan
    lcm_img2img: bool = False

    def __post_init__(self) -> None:
        for name in ("guidance_scale", "inpaint_guidance_scale"):
            object.__setattr__(self, name, guidance_scale_value(getattr(self, name)))
        check_choices(self.sampler, "tensor", 1)
        for name in ("strength", "inpaint_strength"):
            value = as_float(getattr(self, name))  # None or a string: this error, not TypeError
            if not isinstance(value, float) or not 0.0 < value <= 1.0:
                raise ValueError(f"default {name} must lie in (0, 1], got {getattr(self, name)!r}")
        steps = self.num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"default num_inference_steps must be a positive int, got {steps!r}")

    @classmethod
    def for_folder(cls, index: dict[str, Any], scheduler_config: dict[str, Any]) -> CallDefaults:
        """From model_index.json and the scheduler config. StableDiffusionXLPipeline and
        StableDiffusionXLImg2ImgPipeline default to guidance 5.0 and img2img strength 0.3, the
        others (SDXL inpainting included) to 7.5 and 0.8; inpainting (a mask) to guidance 7.5
        (StableDiffusionXLInpaintPipeline's as well as the SD pipeline's) and strength 1.0,
        and SDXL folders to StableDiffusionXLInpaintPipeline's 0.9999 (the pipeline diffusers
        inpaints with from any of them); the sampler is the one equal to the folder's
        scheduler (``fastdiff.sampling.config.default_sampler``), else ddim, with a warning
        that says why (``default_sampler_note``). Steps: 20, and
        LatentConsistencyModelPipeline's (and its img2img pipeline's) 4 steps at guidance 8.5,
        whose img2img (with the lcm sampler) is LatentConsistencyModelImg2ImgPipeline's."""
        note = default_sampler_note(scheduler_config)
        if note is not None:
            warnings.warn(note, UserWarning, stacklevel=2)
        name = str(index.get("_class_name", ""))
        sdxl = name.startswith("StableDiffusionXL") and "Inpaint" not in name
        lcm = name in ("LatentConsistencyModelPipeline", "LatentConsistencyModelImg2ImgPipeline")
        return cls(
            guidance_scale=8.5 if lcm else 5.0 if sdxl else 7.5,
            num_inference_steps=4 if lcm else 20,
            lcm_img2img=lcm,
            sampler=default_sampler(scheduler_config),
            strength=0.3 if sdxl else 0.8,
            inpaint_strength=0.9999 if name.startswith("StableDiffusionXL") else 1.0,
        )


def check_choices(sampler: str, output_type: str, num_images: int) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; allowed values: {', '.join(SAMPLERS)}")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(
            f"unknown output_type {output_type!r}; allowed values: {', '.join(OUTPUT_TYPES)}"
        )
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be a positive int, got {num_images!r}")


def make_generator(
    seed: int | None, generator: torch.Generator | None, device: torch.device
) -> torch.Generator | None:
    """The generator the call draws its noise with: ``generator``, or a new one seeded with
    ``seed`` on ``device``, or None (torch's global generator)."""
    if seed is not None and generator is not None:
        raise ValueError("pass seed or generator, not both")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(
            "generator must be one torch.Generator (a list of per-image generators, as "
            f"diffusers accepts, is not supported), got {type(generator).__name__}"
        )
    if seed is None:
        return generator
    if not isinstance(seed, (bool, numbers.Integral)) and not (
        isinstance(seed, torch.Tensor) and seed.dtype == torch.bool
    ):
        try:  # a 0-d integer tensor or array, as int(seed) accepted
            seed = operator.index(seed)
        except TypeError:
            pass
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed must lie in [-2**63, 2**64), got {seed}")
    return torch.Generator(device=device).manual_seed(int(seed))


def as_float(value):
    """``value`` as a float when it is a number (a 0-d tensor or numpy scalar included; never a
    bool or a string), else unchanged for the caller's error."""
    if not isinstance(value, (bool, str)):
        try:
            return float(value)
        except (TypeError, ValueError, RuntimeError):
            pass
    return value


def guidance_rescale_value(guidance_rescale) -> float:
    """``guidance_rescale`` in [0, 1], checked whether or not guidance is on (the eager loop
    used to ignore a bad value when it was off, the optimized runtime refused it)."""
    value = as_float(guidance_rescale)
    if not isinstance(value, float):
        raise ValueError(f"guidance_rescale must be a number in [0, 1], got {guidance_rescale!r}")
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise ValueError(f"guidance_rescale must lie in [0, 1], got {guidance_rescale!r}")
    return value


def guidance_scale_value(guidance_scale) -> float:
    """``guidance_scale`` as a finite float (a 0-d tensor or numpy scalar is accepted)."""
    # NaN compares false with everything: unchecked, it would silently disable guidance.
    value = as_float(guidance_scale)
    if not isinstance(value, float) or not math.isfinite(value):
        raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
    return value


def check_latents(latents) -> None:
    """Given starting latents are a finite floating-point tensor (the shape is checked later,
    against the image size)."""
    if latents is None:
        return
    if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
        what = latents.dtype if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"latents must be a floating-point tensor, got {what}")
    if not bool(torch.isfinite(latents).all()):
        raise ValueError("latents contain NaN or inf")


def starting_noise(
    latents: torch.Tensor | None,
    shape: tuple[int, int, int, int],
    vae_scale_factor: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The call's starting latents: ``latents`` when given (their shape checked), else N(0, I)
    drawn in float32 on the generator's device (CPU without one), so that a seed gives the same
    noise for every weights dtype and device."""
    if latents is not None:
        if tuple(latents.shape) != shape:
            raise ValueError(
                f"latents must have shape {shape} (batch x channels x height/{vae_scale_factor} "
                f"x width/{vae_scale_factor}), got {tuple(latents.shape)}"
            )
        return latents
    device = generator.device if generator is not None else "cpu"
    return torch.randn(shape, generator=generator, device=device)
