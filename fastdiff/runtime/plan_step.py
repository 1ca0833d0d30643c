"""One sampler update (CFG combine + plan row) on device tensors, safe inside a CUDA graph.

The update is the SamplingPlan contract of notes/PLAN_INTERFACE.md, with the plan row selected
by a device step index so that a captured graph stays correct for every step:

    m = u + w (c - u);  x_in = c0 x;  x0 = c1 x_in + c2 m;
    x_next = c3 x + c4 x0 + c5 x0_prev + c6 z

It writes ``x <- x_next`` and ``x0_prev <- x0`` in place. On CUDA with kernels enabled it calls the
fused kernel ``fastdiff.ops.sampler_step`` when that op exists; otherwise a short sequence of
PyTorch ops that never reads a value back to the host.
"""

from __future__ import annotations

import torch

from fastdiff.ops.backend import select_backend


def noise_needed(coefficients: torch.Tensor) -> bool:
    """True when some step of the plan adds fresh Gaussian noise (column NOISE_STD non-zero)."""
    return bool((coefficients[:, 6] != 0).any())


def apply_plan_step_torch(
    x: torch.Tensor,
    model_out: torch.Tensor,
    x0_prev: torch.Tensor,
    coefficients: torch.Tensor,
    step: torch.Tensor,
    guidance_scale: torch.Tensor | None,
    noise: torch.Tensor | None,
) -> None:
    """The plan update in plain PyTorch ops, in the state's dtype (float32)."""
    row = coefficients.index_select(0, step)[0].to(x.dtype)
    out = model_out.to(x.dtype)
    if guidance_scale is not None:
        uncond, cond = out.chunk(2)
        out = uncond + guidance_scale.to(x.dtype) * (cond - uncond)
    x0 = row[1] * (row[0] * x) + row[2] * out
    x_next = row[3] * x + row[4] * x0 + row[5] * x0_prev
    if noise is not None:
        x_next = x_next + row[6] * noise
    x0_prev.copy_(x0)
    x.copy_(x_next)


def fused_sampler_step():
    """``fastdiff.ops.sampler_step`` when the kernels package provides it, else None."""
    import fastdiff.ops as ops

    return getattr(ops, "sampler_step", None)


def apply_plan_step(
    x: torch.Tensor,
    model_out: torch.Tensor,
    x0_prev: torch.Tensor,
    coefficients: torch.Tensor,
    step: torch.Tensor,
    guidance_scale: torch.Tensor | None,
    noise: torch.Tensor | None,
) -> None:
    """In-place plan update; the fused kernel on CUDA, the PyTorch sequence elsewhere."""
    fused = fused_sampler_step()
    if fused is not None and x.is_cuda and select_backend(x) != "eager":
        fused_plan_step(fused, x, model_out, x0_prev, coefficients, step, guidance_scale, noise)
        return
    apply_plan_step_torch(x, model_out, x0_prev, coefficients, step, guidance_scale, noise)


def fused_plan_step(fused, x, model_out, x0_prev, coefficients, step, guidance_scale, noise):
    """Adapter to the kernels' op; filled in against its signature once it lands."""
    apply_plan_step_torch(x, model_out, x0_prev, coefficients, step, guidance_scale, noise)
