"""The pipeline's denoising loop: a sampling plan run by ``fastdiff.sampling.run_plan``, starting
from pure noise (text/class-to-image) or part-way down the schedule (img2img).

img2img is SDEdit (Meng et al. 2022): encode the init image, diffuse it with the closed-form
forward process q(x_t | x_0) to the timestep of plan step ``start_step``, and run the plan's
remaining steps. It needs no sampler of its own: the remaining rows of the full plan are a valid
plan, given two adjustments made here:
- the first state must be in the sampler's own scale: x = x_vp / c0 (c0 = INPUT_SCALE of that
  row; 1 for the VP samplers, 1/sqrt(sigma^2 + 1) for Euler), which ``init_noise_scale`` applies;
- the image is diffused to the noise level the plan gives that step (``plan.alphas_cumprod``:
  the schedule's alphā at its timestep, except for Karras levels and the clamped zero-SNR end);
- a multistep solver has no previous x0 estimate at its first step, so that step runs first
  order, as diffusers' multistep schedulers do after ``set_begin_index``: x0_prev := x0, i.e.
  the NEXT_FROM_PREV_X0 coefficient is folded into NEXT_FROM_X0; UniPC's first two rows are
  built again (``fastdiff.sampling.plan.restarted_coefficients``).
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fastdiff.pipeline import images as image_utils
from fastdiff.sampling import KnownRegion, NoiseSchedule, make_plan, run_plan
from fastdiff.sampling.plan import (
    INPUT_SCALE,
    SamplingPlan,
    restarted_coefficients,
    rows_per_step,
)


def strength_value(strength) -> float:
    """An img2img ``strength`` as a float in (0, 1] (numbers and 0-d float tensors)."""
    if isinstance(strength, torch.Tensor) and strength.dim() == 0 and strength.is_floating_point():
        strength = strength.item()  # a 0-d tensor, as float(strength) accepted
    # A string would pass float() and then repeat itself in steps * strength.
    if isinstance(strength, (bool, str)) or not isinstance(strength, numbers.Real):
        raise ValueError(f"strength must be a number in (0, 1], got {strength!r}")
    if not 0.0 < float(strength) <= 1.0:
        raise ValueError(f"strength must lie in (0, 1], got {strength!r}")
    return float(strength)


def img2img_start_step(steps: int, strength: float) -> int:
    """First plan step of an img2img run: ``int(steps * strength)`` steps are left to run
    (strength 1 runs them all, from nearly pure noise)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"num_inference_steps must be a positive int, got {steps!r}")
    strength = strength_value(strength)
    remaining = min(int(steps * strength), steps)
    if remaining < 1:
        raise ValueError(
            f"strength={strength} with {steps} steps leaves no step to run; "
            f"use strength >= {1 / steps:.3g} or more steps"
        )
    return steps - remaining


def denoising_range(
    timesteps: torch.Tensor,
    num_train_timesteps: int,
    denoising_start: float | None,
    denoising_end: float | None,
    order: int = 1,
) -> tuple[int, int | None]:
    """(start_step, end_step) of the plan rows a ``denoising_start`` / ``denoising_end`` split
    runs (SDXL's base-then-refiner hand-over, "ensemble of expert denoisers"), as diffusers'
    SDXL pipelines cut their timesteps: each fraction d becomes the timestep cutoff
    round(T - d * T); the first pipeline runs the steps at or above its end cutoff, the second
    the steps below its start cutoff. end_step None: to the end. ``timesteps`` are the plan's
    rows (one per model call); with ``order`` 2 (Heun, KDPM2: two rows a step) a start that would
    split a step moves one row earlier, onto the step's first row, as diffusers' img2img
    pipelines move it for second-order schedulers."""
    for name, value in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < 1
        ):
            raise ValueError(f"{name} must be a number strictly between 0 and 1, got {value!r}")
    if denoising_start is not None and denoising_end is not None:
        if denoising_start >= denoising_end:
            raise ValueError(
                f"denoising_start {denoising_start} must be below denoising_end {denoising_end}"
            )

    def cutoff(fraction: float) -> int:
        return int(round(num_train_timesteps - fraction * num_train_timesteps))

    steps = int(timesteps.shape[0])
    start_step, end_step = 0, None
    if denoising_start is not None:
        remaining = int((timesteps < cutoff(denoising_start)).sum())
        if order == 2 and remaining % 2 == 0:
            remaining += 1  # (the rows from there on: a correction, then whole steps)
        start_step = steps - min(remaining, steps)
    if denoising_end is not None:
        end_step = int((timesteps >= cutoff(denoising_end)).sum())
    if start_step >= (steps if end_step is None else end_step):
        raise ValueError(
            f"denoising_start={denoising_start}, denoising_end={denoising_end} leave none of the "
            f"{steps} steps to run; use more steps or a wider range"
        )
    return start_step, end_step


def plan_until(plan: SamplingPlan, end_step: int) -> SamplingPlan:
    """The rows ``:end_step`` of ``plan``: the run stops at the state of step ``end_step``,
    still noisy, in the sampler's own scale (what diffusers returns as latents then)."""
    if not 0 < end_step <= len(plan):
        raise ValueError(f"end_step {end_step} out of range for a {len(plan)}-step plan")
    levels = plan.alphas_cumprod
    return SamplingPlan(
        plan.sampler,
        plan.timesteps[:end_step].clone(),
        plan.coefficients[:end_step].clone(),
        plan.init_noise_scale,
        plan.eta,
        None if levels is None else levels[:end_step].clone(),
    )


def plan_from_step(
    plan: SamplingPlan, start_step: int, schedule: NoiseSchedule | None = None
) -> SamplingPlan:
    """The rows ``start_step:`` of ``plan`` as a plan of their own whose initial state is
    ``init_noise_scale * x_vp`` for a VP-scale x at that step (see the module docstring);
    ``schedule``: the plan's (a unipc plan needs it to start part-way)."""
    if not 0 <= start_step < len(plan):
        raise ValueError(f"start_step {start_step} out of range for a {len(plan)}-step plan")
    if start_step == 0:
        return plan
    coefficients = restarted_coefficients(plan, start_step, schedule)
    levels = plan.alphas_cumprod
    return SamplingPlan(
        plan.sampler,
        plan.timesteps[start_step:].clone(),
        coefficients,
        1.0 / float(plan.coefficients[start_step, INPUT_SCALE]),
        plan.eta,
        None if levels is None else levels[start_step:].clone(),
    )


def start_state(
    plan: SamplingPlan,
    schedule: NoiseSchedule,
    noise: torch.Tensor,
    init_latents: torch.Tensor | None,
    start_step: int,
    end_step: int | None = None,
    add_noise: bool = True,
) -> tuple[SamplingPlan, torch.Tensor]:
    """(plan, initial state): the whole plan from ``noise``, or for img2img the rows from
    ``start_step`` on, starting from ``init_latents`` forward-diffused to that step; with
    ``add_noise=False`` from ``init_latents`` as they are, the state of a run stopped at that
    step (``end_step``: the rows before it only, see ``plan_until``)."""
    if end_step is not None:
        if start_step >= end_step:
            raise ValueError(f"start_step {start_step} must be below end_step {end_step}")
        if not 0 < end_step <= len(plan):
            raise ValueError(f"end_step {end_step} out of range for a {len(plan)}-step plan")
    if init_latents is None:
        if start_step != 0:
            raise ValueError("start_step needs init_latents (img2img)")
        return (plan if end_step is None else plan_until(plan, end_step)), noise
    if init_latents.shape != noise.shape:
        raise ValueError(
            f"init latents shape {tuple(init_latents.shape)} != noise shape {tuple(noise.shape)}"
        )
    # Restarted before it is cut: a restarted row depends on the steps after it (UniPC's last
    # step is first order only where the whole plan ends).
    plan = plan_from_step(plan, start_step, schedule)
    if end_step is not None:
        plan = plan_until(plan, end_step - start_step)
    if not add_noise:  # already the sampler's state at start_step, in its own scale
        return dataclasses.replace(plan, init_noise_scale=1.0), init_latents
    if plan.alphas_cumprod is None:
        t_start = plan.timesteps[:1].expand(noise.shape[0]).to(noise.device)
        return plan, schedule.add_noise(init_latents, noise, t_start)
    # The noise level the sampler itself assigns to that step: for Karras levels it is not the
    # schedule's alphā at the (rounded) timestep; diffusers' add_noise uses the same level.
    alpha_bar = float(plan.alphas_cumprod[0])
    return plan, alpha_bar**0.5 * init_latents + (1.0 - alpha_bar) ** 0.5 * noise


def run_sampler(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    sampler: str = "ddim",
    steps: int = 20,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    init_latents: torch.Tensor | None = None,
    start_step: int = 0,
    end_step: int | None = None,
    add_noise: bool = True,
    progress: bool = True,
    known: KnownRegion | None = None,
    lcm_strength: float = 1.0,
) -> torch.Tensor:
    """Sample from unit-variance ``noise``; with ``init_latents`` (img2img) start at plan step
    ``start_step`` from the forward-diffused init latents instead (or from the init latents as
    they are, ``add_noise=False``); stop before step ``end_step`` when given. ``known``: keep
    its region at the image after each step (``fastdiff.sampling.known_region``);
    ``lcm_strength``: ``make_plan``'s. Returns the final latents."""
    plan = make_plan(schedule, sampler=sampler, steps=steps, eta=eta, lcm_strength=lcm_strength)
    plan, x_start = start_state(
        plan, schedule, noise, init_latents, start_step, end_step, add_noise
    )
    # A generator on another device is fine: run_plan draws the step noise where the generator
    # lives and moves it (a CPU generator gives the same images on every device).
    with tqdm(total=len(plan), desc="sampling", disable=not progress, leave=False) as bar:
        return run_plan(
            model_fn,
            x_start,
            plan,
            generator=generator,
            callback=lambda *_: bar.update(1),
            known=known,
        )


@dataclasses.dataclass
class RunStart:
    """Where a ``Pipeline`` call's run starts and stops, and the image size it makes."""

    height: int | None
    width: int | None
    start_step: int = 0
    end_step: int | None = None
    strength: float | None = None  # img2img / inpainting (None with denoising_start)
    pixels: torch.Tensor | None = None  # the init image, (B, 3, H, W) in [-1, 1]
    given_latents: torch.Tensor | None = None  # latents given as the image, not encoded
    # LatentConsistencyModelImg2ImgPipeline's img2img: all steps, within this share of the lcm
    # sampler's distillation schedule (start_step stays 0)
    lcm_strength: float = 1.0


def run_start(
    pipe: Any,
    image,
    latents: torch.Tensor | None,
    strength: float | None,
    denoising: tuple[float | None, float | None],
    inpaint: bool,
    size: tuple[int | None, int | None],
    plan: tuple[str, int],
) -> RunStart:
    """The start of a call: ``image`` read (pixels, or latents given in its place), the plan
    step that ``strength`` or ``denoising`` = (denoising_start, denoising_end) selects, and the
    image size, from the image unless ``size`` gives it (inpainting: the folder's default size,
    as diffusers' inpainting pipelines resize to it; PIL images are resized, tensors and arrays
    of another size refused). ``plan``: (sampler, steps), whose timesteps the denoising
    fractions cut."""
    denoising_start, denoising_end = denoising
    height, width = size
    steps = plan[1]
    if inpaint and (height is None or width is None):
        default_height, default_width = pipe.default_size
        if isinstance(image, (torch.Tensor, np.ndarray)):
            given = tuple(
                image.shape[-2:] if isinstance(image, torch.Tensor) else image.shape[-3:-1]
            )
            wanted = (height or default_height, width or default_width)
            if given != wanted:
                raise ValueError(
                    f"inpainting: the image is {given[0]}x{given[1]} but the folder's default "
                    f"size is {wanted[0]}x{wanted[1]}, to which diffusers resizes it: pass "
                    f"height={given[0]}, width={given[1]} to keep its size, or resize it"
                )
        height, width = height or default_height, width or default_width
    start = RunStart(height, width)
    if image is not None:
        if latents is not None:
            raise ValueError("pass image (img2img) or latents, not both")
        if denoising_start is None:
            default = pipe.defaults.inpaint_strength if inpaint else pipe.defaults.strength
            start.strength = default if strength is None else strength
            if pipe.defaults.lcm_img2img and plan[0] == "lcm" and not inpaint:
                # every step runs, within the strength's share of the schedule (the plan
                # refuses a share with fewer timesteps than steps)
                start.lcm_strength = strength_value(start.strength)
            else:
                # (in plan rows: Heun's steps take two)
                start.start_step = img2img_start_step(steps, start.strength) * rows_per_step(
                    plan[0]
                )
        elif strength is not None:  # diffusers ignores strength then: refuse, not ignore
            raise ValueError("pass strength or denoising_start, not both")
        start.given_latents = image_utils.latents_of(image, pipe.vae.config["latent_channels"])
        if start.given_latents is None:
            start.pixels = image_utils.image_to_tensor(image, height, width)
            start.height, start.width = start.pixels.shape[2], start.pixels.shape[3]
            factor = pipe.vae_scale_factor
            if height is None and width is None and (start.height % factor or start.width % factor):
                # (check_size's own message would name height= and width= the call never gave)
                raise ValueError(
                    f"the init image is {start.width}x{start.height} (width x height): each side "
                    f"must be a multiple of the VAE downsampling factor {factor}; resize it, or "
                    "(PIL images) pass height and width to have it resized"
                )
        else:
            start.height, start.width = image_utils.latent_image_size(
                start.given_latents, height, width, pipe.vae_scale_factor
            )
    elif strength is not None:  # text-to-image has no strength: never ignore one silently
        raise ValueError(f"strength={strength!r} is only used with image= (img2img)")
    elif denoising_start is not None:
        raise ValueError(
            "denoising_start needs image=: the latents of a run stopped at denoising_end"
        )
    if denoising_start is not None or denoising_end is not None:
        # diffusers cuts on its own timesteps: the Euler family's are fractions, an LCM
        # img2img run's lie within its strength's share of the schedule
        timesteps = pipe.schedule.timesteps(steps, plan[0], keep_fraction=True)
        if start.lcm_strength != 1.0:
            timesteps = make_plan(
                pipe.schedule, "lcm", steps, lcm_strength=start.lcm_strength
            ).timesteps
        first, start.end_step = denoising_range(
            timesteps,
            pipe.schedule.num_train_timesteps,
            denoising_start,
            denoising_end,
            rows_per_step(plan[0]),
        )
        if denoising_start is not None:
            start.start_step = first
        if start.end_step is not None and start.start_step >= start.end_step:
            raise ValueError(
                f"strength={start.strength} starts at step {start.start_step} of {steps}, at or "
                f"after denoising_end={denoising_end}'s end at step {start.end_step}"
            )
    return start
