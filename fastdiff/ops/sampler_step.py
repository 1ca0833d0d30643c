"""Fused classifier-free guidance + one sampling-plan step (the SamplingPlan contract of
``fastdiff/sampling/plan.py``).

Layers: ``kernels/sampler_step.py`` (Triton launcher) -> custom op ``fastdiff::sampler_step``
(with a fake kernel) -> ``sampler_step`` (checks, backend choice, eager path).

The reference is the sampling layer's own step, ``fastdiff.sampling.apply_plan_row`` applied to
``fastdiff.sampling.combine_guidance(uncond, cond, w)``; the tests compare against it. This module
cannot import it (ops sit below sampling), and its eager path differs on purpose: it reads the
coefficients and guidance from tensors without a host sync, so it is CUDA-graph safe as well.
"""

import warnings

import torch

from fastdiff.ops.autoselect import sampler_step_key
from fastdiff.ops.backend import (
    cuda_extension_op,
    kernel_dtype_supported,
    launch_kernel_op,
    needs_autograd,
    select_backend,
)

NUM_COEFFICIENTS = 10  # c0..c9, the columns of SamplingPlan.coefficients
MAX_OLDER = 3  # x0 estimates two to four rows back (columns 7..9)
# "untried" -> "works" after the kernel's first launch, or "failed" (warned) if that launch raised.
_kernel_state = "untried"


def sampler_step_eager(
    x: torch.Tensor,
    model_output: torch.Tensor,
    coefficients: torch.Tensor,
    step: torch.Tensor | int | None = None,
    x0_prev: torch.Tensor | None = None,
    guidance_scale: float | torch.Tensor = 1.0,
    noise: torch.Tensor | None = None,
    x0_older: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same step as a sequence of PyTorch ops in fp32 (fp64 for fp64 states); no host sync,
    so it can be captured in a CUDA graph too."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    if isinstance(step, int):
        step = torch.tensor(step, dtype=torch.int64, device=coefficients.device)
    # index_select, not coefficients[step]: indexing with a tensor syncs with the host, which
    # CUDA-graph capture forbids.
    row = coefficients if step is None else coefficients.index_select(0, step.reshape(1))[0]
    c0, c1, c2, c3, c4, c5, c6, *older_weights = row.to(dtype).unbind(-1)
    state = x.to(dtype)
    batch = x.shape[0]
    if model_output.shape[0] == 2 * batch:
        uncond, cond = model_output.to(dtype).chunk(2)
        guidance = guidance_scale
        if isinstance(guidance, torch.Tensor):
            guidance = guidance.to(dtype)
            if guidance.numel() == 1:
                # One value of any shape, as the kernels read it: 0-d, so that it cannot
                # broadcast the state to more dimensions than x has.
                guidance = guidance.reshape(())
        model = uncond + guidance * (cond - uncond)
    else:
        model = model_output.to(dtype)
    x0 = c1 * (c0 * state) + c2 * model
    x_next = c3 * state + c4 * x0
    if x0_prev is not None:
        x_next = x_next + c5 * x0_prev.to(dtype)
    if noise is not None:
        x_next = x_next + c6 * noise.to(dtype)
    if x0_older is not None:
        for weight, estimate in zip(older_weights, x0_older.unbind(0), strict=False):
            x_next = x_next + weight * estimate.to(dtype)
    return x_next.to(x.dtype), x0.to(x.dtype)


def sampler_step_launch(
    x: torch.Tensor,
    model_output: torch.Tensor,
    coefficients: torch.Tensor,
    step: torch.Tensor | None,
    x0_prev: torch.Tensor | None,
    guidance: torch.Tensor | None,
    guidance_value: float,
    noise: torch.Tensor | None,
    x0_older: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton launcher: the custom op's implementation, also called directly
    (``launch_kernel_op``)."""
    from fastdiff.kernels.sampler_step import sampler_step_forward

    return sampler_step_forward(
        x, model_output, coefficients, step, x0_prev, guidance, guidance_value, noise, x0_older
    )


sampler_step_triton = torch.library.custom_op(
    "fastdiff::sampler_step", sampler_step_launch, mutates_args=()
)


@sampler_step_triton.register_fake
def _sampler_step_fake(x, model_output, coefficients, step, x0_prev, guidance, value, noise, prev2):
    return torch.empty_like(x), torch.empty_like(x)


def check_sampler_step_args(x, model_output, coefficients, step, x0_prev, noise, x0_older) -> None:
    batch = x.shape[0] if x.dim() > 0 else 0
    if (
        x.dim() == 0
        or model_output.shape[1:] != x.shape[1:]
        or model_output.shape[0]
        not in (
            batch,
            2 * batch,
        )
    ):
        raise ValueError(
            f"sampler_step: model_output shape {tuple(model_output.shape)} must be x's "
            f"{tuple(x.shape)} or [uncond; cond] with twice its batch"
        )
    for name, tensor in (("x0_prev", x0_prev), ("noise", noise)):
        if tensor is not None and tensor.shape != x.shape:
            raise ValueError(
                f"sampler_step: {name} shape {tuple(tensor.shape)} != x shape {tuple(x.shape)}"
            )
    if x0_older is not None and (
        x0_older.dim() != x.dim() + 1
        or x0_older.shape[1:] != x.shape
        or not 1 <= x0_older.shape[0] <= MAX_OLDER
    ):
        raise ValueError(
            f"sampler_step: x0_older shape {tuple(x0_older.shape)} must be [K, *x.shape] with "
            f"K in [1, {MAX_OLDER}] (x shape {tuple(x.shape)})"
        )
    if coefficients.shape[-1] != NUM_COEFFICIENTS or coefficients.dim() not in (1, 2):
        raise ValueError(
            f"sampler_step: coefficients must be a [S, {NUM_COEFFICIENTS}] plan table or one "
            f"[{NUM_COEFFICIENTS}] row, got shape {tuple(coefficients.shape)}"
        )
    if (coefficients.dim() == 2) != (step is not None):
        raise ValueError(
            f"sampler_step: pass step (an integer tensor) with a [S, {NUM_COEFFICIENTS}] "
            f"coefficient table, and no step with a single [{NUM_COEFFICIENTS}] row"
        )
    if step is not None and (
        not isinstance(step, torch.Tensor) or step.numel() != 1 or step.dtype.is_floating_point
    ):
        # A float or NumPy step has no numel(): name it rather than fail with an AttributeError.
        got = (
            f"a {step.dtype} tensor of shape {tuple(step.shape)}"
            if isinstance(step, torch.Tensor)
            else f"{step!r} ({type(step).__name__})"
        )
        raise ValueError(
            f"sampler_step: step must be an int or a one-element integer tensor, got {got}"
        )


def _same_dense_layout(x: torch.Tensor, *others: torch.Tensor) -> bool:
    """True when element i of every tensor is the same sample position (flat kernel indexing)."""
    tensors = (x, *others)
    if all(t.is_contiguous() for t in tensors):
        return True
    return x.dim() == 4 and all(
        t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) for t in tensors
    )


def sampler_step_triton_supports(
    x, model_output, coefficients, step, x0_prev, guidance, noise, x0_older=None
):
    samples = [t for t in (model_output, x0_prev, noise) if t is not None]
    if x0_older is not None:
        if x0_older.stride(0) != x.numel():  # the kernels step through the K slots by numel
            return False
        samples += list(x0_older.unbind(0))
    if not kernel_dtype_supported(x) or not all(kernel_dtype_supported(t) for t in samples):
        return False
    if not _same_dense_layout(x, *samples) or coefficients.stride(-1) != 1:
        return False
    if coefficients.dtype not in (torch.float32, torch.float64):
        return False
    if step is not None and step.dtype != torch.int64:
        return False
    device_tensors = [coefficients, *samples] + [t for t in (step, guidance) if t is not None]
    return all(t.device == x.device for t in device_tensors)


def sampler_step(
    x: torch.Tensor,
    model_output: torch.Tensor,
    coefficients: torch.Tensor,
    step: torch.Tensor | int | None = None,
    x0_prev: torch.Tensor | None = None,
    guidance_scale: float | torch.Tensor = 1.0,
    noise: torch.Tensor | None = None,
    x0_older: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused step of a sampling plan with classifier-free guidance; returns (x_next, x0).

    x: state [B, ...]. model_output: [2B, ...] = [uncond; cond] (guided with ``guidance_scale``,
    Ho & Salimans 2022) or [B, ...] (used as is). coefficients: the plan table [S, 10] on x's
    device with ``step`` an int64 scalar tensor (or int), or a single [10] row with
    ``step=None``. x0_prev: the previous step's x0 (None counts as zeros); x0_older: a stacked
    [K, *x.shape] tensor (K <= 3) of the x0 estimates two, three and four rows back, for plans
    that read them (``SamplingPlan.history_depth`` > 1; missing ones count as zeros).
    noise: z for stochastic plans (None
    counts as zeros: pass it whenever the row's NOISE_STD is non-zero). guidance_scale: float or a
    one-element tensor. For a CUDA graph replayed across steps, pass ``step`` and
    ``guidance_scale`` as device tensors (updated in place between replays), never as Python
    numbers. A device ``step`` must lie in [0, S): it is not checked (that would sync).
    Guidance rescale is not fused: use ``fastdiff.sampling.combine_guidance`` then this op.
    """
    if isinstance(step, int):
        # A Python step is checked here for free; a device step cannot be without a host sync
        # (the kernels read whatever row it names: keep it in [0, S)).
        if coefficients.dim() == 2 and not 0 <= step < coefficients.shape[0]:
            raise IndexError(
                f"sampler_step: step {step} is outside the plan's {coefficients.shape[0]} rows"
            )
        step = torch.tensor(step, dtype=torch.int64, device=coefficients.device)
    check_sampler_step_args(x, model_output, coefficients, step, x0_prev, noise, x0_older)
    guidance = guidance_scale if isinstance(guidance_scale, torch.Tensor) else None
    if guidance is not None and guidance.numel() != 1:
        # The kernels read one scale; a per-sample one would be applied as its first value.
        raise ValueError(
            "sampler_step: guidance_scale must be a float or a one-element tensor, got shape "
            f"{tuple(guidance.shape)}"
        )
    guidance_value = 1.0 if guidance is not None else float(guidance_scale)
    backend = select_backend(x, "sampler_step", lambda: sampler_step_key(x, model_output))
    if needs_autograd(x, model_output, x0_prev, noise, coefficients, guidance, x0_older):
        backend = "eager"
    args = (x, model_output, coefficients, step, x0_prev, guidance, guidance_value, noise, x0_older)
    if backend == "cuda":
        native = cuda_extension_op("sampler_step", *args)
        if native is not None:
            return native(*args)
        backend = "triton"
    global _kernel_state
    if (
        backend == "triton"
        and _kernel_state != "failed"
        and sampler_step_triton_supports(
            x, model_output, coefficients, step, x0_prev, guidance, noise, x0_older
        )
    ):
        try:
            result = launch_kernel_op(sampler_step_triton, sampler_step_launch, *args)
        except Exception as error:
            if _kernel_state == "works":
                raise  # it compiled and ran before: a real error, not a compiler refusal
            _kernel_state = "failed"
            warnings.warn(
                f"sampler_step: the Triton kernel failed on first use ({type(error).__name__}: "
                f"{str(error)[:200]}); using the eager path from now on",
                RuntimeWarning,
                stacklevel=2,
            )
        else:
            _kernel_state = "works"
            return result
    return sampler_step_eager(
        x, model_output, coefficients, step, x0_prev, guidance_scale, noise, x0_older
    )
