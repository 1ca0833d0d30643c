"""One sampler update (CFG combine + plan row) on static buffers, safe inside a CUDA graph.

The update is the SamplingPlan contract of ``fastdiff/sampling/plan.py``; the fused op
``fastdiff.ops.sampler_step`` computes it reading the plan row at a device step index, so a
captured graph stays correct for every step. The op returns new tensors; they are copied back
into the static buffers because a graph must keep reading and writing the same addresses.
"""

from __future__ import annotations

import torch

from fastdiff.ops import sampler_step


def apply_plan_step(
    x: torch.Tensor,
    model_out: torch.Tensor,
    x0_prev: torch.Tensor,
    coefficients: torch.Tensor,
    step: torch.Tensor,
    guidance_scale: torch.Tensor | None,
    noise: torch.Tensor | None,
    x0_prev2: torch.Tensor | None = None,
) -> None:
    """In place: ``x <- x_next`` and ``x0_prev <- x0`` for plan row ``coefficients[step]``; with
    ``x0_prev2`` (plans that read the x0 of two steps back: UniPC) also ``x0_prev2 <- x0_prev``.

    ``model_out`` is [uncond; cond] (2B rows) when ``guidance_scale`` is given, else B rows.
    """
    if guidance_scale is None and model_out.shape[0] != x.shape[0]:
        raise ValueError(
            f"unguided step: model output batch {model_out.shape[0]} != state batch {x.shape[0]}"
        )
    x_next, x0 = sampler_step(
        x,
        model_out,
        coefficients,
        step,
        x0_prev,
        guidance_scale if guidance_scale is not None else 1.0,
        noise,
        x0_prev2,
    )
    if x0_prev2 is not None:
        x0_prev2.copy_(x0_prev)
    x0_prev.copy_(x0)
    x.copy_(x_next)
