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
    x0_older: torch.Tensor | None = None,
) -> None:
    """In place: ``x <- x_next`` and ``x0_prev <- x0`` for plan row ``coefficients[step]``; with
    ``x0_older`` ([K, ...]: the x0 estimates two to K + 1 rows back, for plans that read them)
    the history moves back one row too: ``x0_older[k] <- x0_older[k - 1]``,
    ``x0_older[0] <- x0_prev``.

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
        x0_older,
    )
    if x0_older is not None:
        for k in range(x0_older.shape[0] - 1, 0, -1):
            x0_older[k].copy_(x0_older[k - 1])
        x0_older[0].copy_(x0_prev)
    x0_prev.copy_(x0)
    x.copy_(x_next)
