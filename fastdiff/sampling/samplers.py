"""The eager sampling loop: one implementation for every sampler, applying a :class:`SamplingPlan`.

Samplers (see ``fastdiff.sampling.plan`` for the formulas and papers):
``ddpm`` ancestral DDPM (Ho et al. 2020), ``ddim`` (Song et al. 2021, any eta in [0, 1]),
``euler`` (Karras et al. 2022, Algorithm 1, as diffusers' EulerDiscreteScheduler),
``euler_ancestral`` (the same with fresh noise each step, EulerAncestralDiscreteScheduler),
``euler_karras`` (Euler through Karras et al.'s noise levels),
``dpmpp_2m`` (DPM-Solver++(2M), Lu et al. 2022), ``dpmpp_2m_sde`` (its SDE variant), and
``dpmpp_2m_karras`` / ``dpmpp_2m_sde_karras`` (the same through Karras et al.'s noise levels),
``dpmpp_3m[_sde][_karras]`` (their third-order multistep form, solver_order 3),
``heun`` / ``heun_karras`` (Heun's method, Karras et al. 2022, as HeunDiscreteScheduler: two
model calls, two plan rows, a step), ``kdpm2`` / ``kdpm2_karras`` (KDPM2, k-diffusion's
DPM-Solver-2, as KDPM2DiscreteScheduler: a second call at the midpoint, two rows a step),
``kdpm2_ancestral`` / ``kdpm2_ancestral_karras`` (the same with fresh noise each step, as
KDPM2AncestralDiscreteScheduler),
``pndm`` (PNDM's pseudo linear multistep, Liu et al. 2022,
as PNDMScheduler with skip_prk_steps: SD 1.x folders' own), ``lms`` / ``lms_karras`` (linear
multistep in sigma, as LMSDiscreteScheduler),
``lcm`` (latent consistency models' multistep sampling, Luo et al. 2023, as LCMScheduler) and
``tcd`` (trajectory consistency distillation's sampling, Zheng et al. 2024, as TCDScheduler),
``unipc`` / ``unipc_karras`` (UniPC's predictor-corrector, Zhao et al. 2023, as
UniPCMultistepScheduler).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastdiff.sampling.known_region import KnownRegion, keep_known, known_region_rows
from fastdiff.sampling.plan import (
    NOISE_STD,
    SamplingPlan,
    make_plan,
    model_input,
    plan_step,
    step_noise_dtype,
)
from fastdiff.sampling.schedule import NoiseSchedule

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, int, torch.Tensor], None]


def run_plan(
    model_fn: ModelFn,
    x_T: torch.Tensor,
    plan: SamplingPlan,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    known: KnownRegion | None = None,
) -> torch.Tensor:
    """Run a compiled plan from ``x_T`` ~ N(0, I) (see :func:`sample` for the arguments).
    ``known``: after each step, keep the region its mask leaves out at the image's latents noised
    to the next step's level (inpainting with a model that does not take the mask;
    ``fastdiff.sampling.known_region``)."""
    if not isinstance(x_T, torch.Tensor) or not x_T.is_floating_point():
        raise ValueError("x_T must be a floating-point tensor")
    if x_T.dim() < 1 or x_T.shape[0] < 1:
        raise ValueError(f"x_T must have a batch dimension, got shape {tuple(x_T.shape)}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {generator!r}")
    if not bool(torch.isfinite(x_T).all()):
        # Otherwise reported as a bad model output, or not at all when the model ignores x.
        raise ValueError("x_T (the starting noise / latents) contains NaN or inf")
    batch = x_T.shape[0]
    # Fractional timesteps (the Euler family's) reach the model in float32, as diffusers passes
    # them; whole ones as a LongTensor.
    t_dtype = torch.float32 if plan.timesteps.dtype.is_floating_point else torch.long
    x = x_T * plan.init_noise_scale if plan.init_noise_scale != 1.0 else x_T
    x0_prev = None
    older: list[torch.Tensor] = []  # x0 of two, three ... rows back, as deep as the plan reads
    keep_older = max(plan.history_depth - 1, 0)
    if known is not None:
        known.check(x)
        known_rows = known_region_rows(plan).tolist()
    for index, timestep in enumerate(plan.timesteps.tolist()):
        t = torch.full((batch,), timestep, dtype=t_dtype, device=x.device)
        output = model_fn(model_input(plan, index, x), t)
        if not isinstance(output, torch.Tensor) or output.shape != x.shape:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output)
            raise ValueError(
                f"model output shape {shape} != sample shape {tuple(x.shape)} "
                f"at step {index} (t={timestep})"
            )
        if not bool(torch.isfinite(output).all()):
            raise RuntimeError(
                f"model output contains NaN or inf at step {index} (timestep {timestep}) "
                f"of {len(plan)}"
            )
        noise = None
        if float(plan.coefficients[index, NOISE_STD]) != 0.0:
            # Drawn where the generator lives (a CPU generator also drives CUDA sampling, so a
            # seed gives the same images on every device), then moved to the state's device.
            noise_device = x.device if generator is None else generator.device
            dtype = step_noise_dtype(plan, x.dtype)
            noise = torch.randn(x.shape, generator=generator, device=noise_device, dtype=dtype)
            noise = noise.to(x.device)
        previous = x0_prev
        x, x0_prev = plan_step(plan, index, x, output.to(x.dtype), x0_prev, noise, x0_older=older)
        if keep_older and previous is not None:
            older = [previous, *older][:keep_older]
        if known is not None:
            x = keep_known(x, known, *known_rows[index])
        if callback is not None:
            callback(index, timestep, x)
    return x


def sample(
    model_fn: ModelFn,
    x_T: torch.Tensor,
    schedule: NoiseSchedule,
    sampler: str = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Draw samples by running ``sampler`` for ``steps`` steps from ``x_T`` ~ N(0, I).

    ``model_fn(x_t, t)`` gets ``x_t`` in the variance-preserving scale the model was trained on and
    ``t``, a LongTensor [batch] on x_T's device (float32 where the plan's timesteps are
    fractional: the Euler family's at ``linspace`` spacing or Karras levels, as diffusers'
    Euler schedulers call the model), and returns the model output in
    ``schedule.prediction_type`` with x_t's shape (wrap with
    :func:`fastdiff.sampling.classifier_free_guidance` for CFG). The result has x_T's dtype (fp64
    included) and is the clean sample in VP scale. ``callback(step_index, t, x)`` runs after each
    step with the sampler state. Noise (ddpm, euler_ancestral, the sde samplers, ddim with
    eta > 0) is drawn with ``generator``.
    A non-finite model output raises ``RuntimeError`` naming the step index and timestep.
    """
    if not isinstance(schedule, NoiseSchedule):
        raise ValueError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    plan = make_plan(schedule, sampler, steps, eta)
    return run_plan(model_fn, x_T, plan, generator=generator, callback=callback)
