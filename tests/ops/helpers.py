"""Shared test helpers for the ops: device choice and the tolerance rule from STYLE.md."""

from __future__ import annotations

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Per-dtype floor, relative to the reference's largest magnitude (at least 1).
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}

needs_triton = pytest.mark.skipif(
    not (INTERPRET or torch.cuda.is_available()),
    reason="triton kernels need a GPU or TRITON_INTERPRET=1",
)


def kernel_dtypes() -> list:
    """fp32, fp16 and (not under the numpy interpreter) bf16, as pytest params."""
    skip_bf16 = pytest.mark.skipif(INTERPRET, reason="the Triton interpreter has no bfloat16")
    return [
        pytest.param(torch.float32, id="fp32"),
        pytest.param(torch.float16, id="fp16"),
        pytest.param(torch.bfloat16, id="bf16", marks=skip_bf16),
    ]


def max_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return (out.float() - reference.float()).abs().max().item()


def assert_within_tolerance(
    out: torch.Tensor, reference: torch.Tensor, eager: torch.Tensor, what: str = ""
) -> None:
    """Kernel error <= 2 x the same-dtype eager error + a per-dtype floor (flash-attention's rule).

    ``reference`` is the fp32 reference result, ``eager`` the plain PyTorch result in the input
    dtype; all three are compared in fp32.
    """
    assert out.shape == reference.shape, f"{what}: shape {out.shape} != {reference.shape}"
    assert out.dtype == eager.dtype, f"{what}: dtype {out.dtype} != eager's {eager.dtype}"
    assert torch.isfinite(out.float()).all(), f"{what}: non-finite values"
    scale = max(1.0, reference.float().abs().max().item())
    floor = FLOOR[out.dtype] * scale
    error = max_error(out, reference)
    eager_error = max_error(eager, reference)
    assert error <= 2 * eager_error + floor, (
        f"{what}: kernel error {error:.3g} > 2 x eager error {eager_error:.3g} + floor {floor:.3g}"
    )


def record_attention_launches(monkeypatch) -> list[tuple[tuple[int, int], dict]]:
    """Spy on the attention launcher's choice of kernel configuration: each launch appends
    ((BLOCK_D, BLOCK_DT), launch options) to the returned list (options {} for the autotuner)."""
    import fastdiff.kernels.attention as attention_kernels

    launched = []
    lone_config = attention_kernels.lone_config

    def spy(q, queries, keys, block_d, block_dt):
        kernel, options = lone_config(q, queries, keys, block_d, block_dt)
        launched.append(((block_d, block_dt), options))
        return kernel, options

    monkeypatch.setattr(attention_kernels, "lone_config", spy)
    return launched


class CallCounter:
    """Wraps a launcher so a test can assert the kernel path ran (not a silent fallback), and
    keeps each call's arguments (``arguments``: (args, kwargs) per call) for tests that check
    what was passed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> None:
        self.calls = 0
        self.arguments: list[tuple[tuple, dict]] = []
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            self.calls += 1
            self.arguments.append((args, kwargs))
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    def argument(self, position: int, name: str) -> list:
        """One argument of every call so far, passed by position or by name (None if not)."""
        return [
            args[position] if len(args) > position else kwargs.get(name)
            for args, kwargs in self.arguments
        ]


def sampler_step_reference(
    row, x, model_output, guidance, x0_prev, noise, dtype=torch.float32, x0_older=None
):
    """The sampling layer's own step, apply_plan_row(combine_guidance(...)), with the inputs in
    ``dtype``, returned in x's dtype: the reference of every fused sampler-step kernel."""
    from fastdiff.sampling import apply_plan_row, combine_guidance

    def cast(t):
        return None if t is None else t.to(dtype)

    model = cast(model_output)
    if model.shape[0] == 2 * x.shape[0]:
        model = combine_guidance(*model.chunk(2), float(guidance))
    x_next, x0 = apply_plan_row(
        row, cast(x), model, cast(x0_prev), cast(noise), x0_older=cast(x0_older)
    )
    return x_next.to(x.dtype), x0.to(x.dtype)


def check_sampler_step(
    out, row, x, model_output, guidance, x0_prev, noise, what="", same_layout=False, x0_older=None
):
    """Both outputs of a fused step within the tolerance rule of the fp32 reference (the eager
    error being the reference computed in x's dtype); ``same_layout``: also x's strides."""
    inputs = (row, x, model_output, guidance, x0_prev, noise)
    reference = sampler_step_reference(*inputs, x0_older=x0_older)
    eager = sampler_step_reference(*inputs, x.dtype, x0_older=x0_older)
    for name, got, want, base in zip(("x_next", "x0"), out, reference, eager, strict=True):
        assert_within_tolerance(got, want, base, f"{what} {name}")
        if same_layout:
            assert got.stride() == x.stride(), f"{what} {name}: layout changed"


# Activations and weights of differing float dtypes: autocast-style fp16/bf16 x with fp32
# weights, fp64 weights, fp64 activations.
mixed_float_dtypes = pytest.mark.parametrize(
    "x_dtype,param_dtype",
    [
        (torch.float32, torch.float64),
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float64, torch.float32),
    ],
)


def check_mixed_float_dtypes(op, x: torch.Tensor, want: torch.Tensor) -> None:
    """``op(x)`` on every backend that can run here returns x's dtype and ``want`` (a float64
    computation cast to x's dtype) to fp16-level tolerance (fp64 for fp64 x): the norms refuse
    most such mixes in PyTorch, and compute in fp32 (fp64 for fp64 x) instead."""
    from fastdiff.ops import use_backend

    tolerance = 1e-9 if x.dtype == torch.float64 else 2e-2
    backends = ["eager"]
    if DEVICE == "cuda" or (INTERPRET and x.dtype != torch.bfloat16):
        backends.append("triton")
    for backend in backends:
        with use_backend(backend):
            got = op(x)
        assert got.dtype == x.dtype, backend
        torch.testing.assert_close(got.double(), want.double(), atol=tolerance, rtol=tolerance)
