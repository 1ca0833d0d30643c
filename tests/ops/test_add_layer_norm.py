"""add_layer_norm (a residual addition, then LayerNorm, in one kernel) against the fp32 reference:
both outputs, the sum and its LayerNorm, within the tolerance rule of helpers.py."""

from __future__ import annotations

import fastdiff.kernels.layer_norm as layer_norm_kernels
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdiff.ops import add_layer_norm, add_layer_norm_reference, use_backend
from fastdiff.ops.layer_norm import add_layer_norm_eager, add_layer_norm_triton
from tests.ops.helpers import DEVICE, CallCounter, assert_within_tolerance, kernel_dtypes


def make(shape, dtype, affine=True, offset=0.0):
    x = (torch.randn(shape, device=DEVICE) + offset).to(dtype)
    residual = (torch.randn(shape, device=DEVICE) * 3 - offset).to(dtype)
    width = shape[-1]
    weight = torch.randn(width, device=DEVICE).to(dtype) if affine else None
    bias = torch.randn(width, device=DEVICE).to(dtype) if affine else None
    return x, residual, weight, bias


def check(x, residual, weight, bias, eps=1e-5, what=""):
    total, normed = add_layer_norm(x, residual, weight, bias, eps)
    want_total, want_normed = add_layer_norm_reference(x, residual, weight, bias, eps)
    eager_total, eager_normed = add_layer_norm_eager(x, residual, weight, bias, eps)
    assert_within_tolerance(total, want_total, eager_total, f"{what} sum")
    assert_within_tolerance(normed, want_normed, eager_normed, f"{what} layer norm")
    assert total.is_contiguous() and normed.is_contiguous()
    return total, normed


@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize(
    "shape",
    [
        pytest.param((2, 16, 320), id="sd-width-320"),
        pytest.param((3, 77, 40), id="77-tokens"),
        pytest.param((5, 33), id="odd-width"),
        pytest.param((1, 1, 1), id="width-1"),
        pytest.param((2, 3, 4, 96), id="4d-input"),
    ],
)
def test_edge_shapes(triton_backend, monkeypatch, shape, dtype):
    counter = CallCounter(monkeypatch, layer_norm_kernels, "layer_norm_forward")
    check(*make(shape, dtype), what=str(shape))
    assert counter.calls == 1


@pytest.mark.parametrize("affine", [False, True], ids=["no-affine", "affine"])
def test_without_affine_and_large_mean(triton_backend, affine):
    check(*make((4, 64), torch.float32, affine=affine, offset=100.0), eps=1e-6)


def test_strided_rows_are_read_in_place(triton_backend, monkeypatch):
    """Token rows that are views (a slice of wider rows, as attention outputs can be)."""
    counter = CallCounter(monkeypatch, layer_norm_kernels, "layer_norm_forward")
    wide = torch.randn(2, 6, 80, device=DEVICE)
    residual = torch.randn(2, 6, 120, device=DEVICE)
    check(wide[..., 8:48], residual[..., 40:80], None, None, what="strided")
    assert counter.calls == 1


def test_the_layer_norm_is_of_the_sum(triton_backend):
    """Not of x alone: x and the residual cancel to a constant row in one place."""
    x, residual, weight, bias = make((3, 32), torch.float32)
    residual[1] = 5.0 - x[1]  # row 1 sums to 5 everywhere: its LayerNorm is the bias
    total, normed = check(x, residual, weight, bias)
    torch.testing.assert_close(total[1], torch.full_like(total[1], 5.0))
    torch.testing.assert_close(normed[1], bias)


@settings(max_examples=10, deadline=None)
@given(rows=st.integers(1, 20), width=st.integers(2, 200), affine=st.booleans())
def test_random_shapes_property(rows, width, affine):
    with use_backend("triton"):
        check(*make((rows, width), torch.float32, affine=affine))


test_random_shapes_property = pytest.mark.usefixtures("triton_backend")(test_random_shapes_property)


def test_fake_kernel_matches_real_output(triton_backend):
    x, residual, weight, bias = make((3, 5, 24), torch.float32)
    torch.library.opcheck(
        add_layer_norm_triton,
        (x, residual, weight, bias, 1e-5),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_gradients_take_the_eager_path(triton_backend, monkeypatch):
    counter = CallCounter(monkeypatch, layer_norm_kernels, "layer_norm_forward")
    x, residual, weight, bias = make((4, 16), torch.float32)
    x.requires_grad_(True)
    total, normed = add_layer_norm(x, residual, weight, bias)
    (total.sum() + normed.square().sum()).backward()
    assert counter.calls == 0 and x.grad is not None


@pytest.mark.parametrize(
    "residual,message",
    [
        (torch.zeros(4, 8), r"residual has shape \(4, 8\), expected x's \(4, 16\)"),
        (torch.zeros(4, 16, dtype=torch.float64), "residual is torch.float64 on cpu, x is"),
        (1.0, "residual has shape 1.0"),
    ],
)
def test_bad_residual_raises(residual, message):
    with pytest.raises(ValueError, match=message):
        add_layer_norm(torch.randn(4, 16), residual)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "shape",
    [(2, 4096, 320), (2, 1024, 640), (2, 256, 1280), (2, 4096, 640), (2, 1024, 1280)],
    ids=lambda shape: "x".join(map(str, shape)),
)
def test_sd_shapes_on_gpu(monkeypatch, shape, dtype):
    counter = CallCounter(monkeypatch, layer_norm_kernels, "layer_norm_forward")
    with use_backend("triton"):
        check(*make(shape, dtype), what=str(shape))
    assert counter.calls == 1  # the kernel ran, not a silent eager fallback
