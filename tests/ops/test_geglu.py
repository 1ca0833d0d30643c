"""GEGLU Triton kernel against the fp32 reference (tolerance rule in helpers.py)."""

from __future__ import annotations

import math

import fastdiff.kernels.geglu as geglu_kernels
import fastdiff.kernels.gelu as gelu_kernels
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdiff.ops import geglu, geglu_reference, use_backend
from fastdiff.ops.geglu import geglu_eager, geglu_triton
from tests.ops.helpers import DEVICE, CallCounter, assert_within_tolerance, kernel_dtypes

EDGE_CASES = [
    pytest.param((2, 16, 2 * 320), id="sd-width-320"),
    pytest.param((1, 77, 2 * 40), id="77-tokens"),
    pytest.param((5, 2 * 33), id="odd-width"),
    pytest.param((3, 2), id="width-1"),
    pytest.param((2, 2, 3, 2 * 1100), id="wider-than-a-block"),
]


def check(x, what=""):
    out = geglu(x)
    assert_within_tolerance(out, geglu_reference(x), geglu_eager(x), what)
    return out


@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("shape", EDGE_CASES)
def test_edge_shapes(triton_backend, monkeypatch, shape, dtype):
    counter = CallCounter(monkeypatch, geglu_kernels, "geglu_forward")
    x = (torch.randn(shape, device=DEVICE) * 3).to(dtype)
    out = check(x, what=str(shape))
    assert out.shape == (*shape[:-1], shape[-1] // 2)
    assert counter.calls == 1


@pytest.mark.parametrize("dtype", [d for d in kernel_dtypes() if d.id != "fp32"])
@pytest.mark.parametrize("shape", EDGE_CASES)
def test_edge_shapes_with_the_polynomial_erf(triton_backend, monkeypatch, shape, dtype):
    """kernels/gelu.py's POLYNOMIAL_ERF (bench_geglu's fastdiff-polyerf rows), within the same
    tolerance rule."""
    monkeypatch.setattr(gelu_kernels, "POLYNOMIAL_ERF", True)
    test_edge_shapes(triton_backend, monkeypatch, shape, dtype)


def test_strided_rows_are_read_in_place(triton_backend, monkeypatch):
    counter = CallCounter(monkeypatch, geglu_kernels, "geglu_forward")
    x = torch.randn(4, 3, 64, device=DEVICE)[:, 1]
    check(x)
    assert counter.calls == 1


def test_transposed_input_falls_back_to_eager(triton_backend, monkeypatch):
    counter = CallCounter(monkeypatch, geglu_kernels, "geglu_forward")
    x = torch.randn(8, 6, device=DEVICE).t()
    torch.testing.assert_close(geglu(x), geglu_eager(x))
    assert counter.calls == 0


def test_odd_last_dimension_raises():
    with pytest.raises(ValueError, match="must be even"):
        geglu(torch.randn(2, 5))


@settings(max_examples=6, deadline=None)
@given(rows=st.integers(1, 30), width=st.integers(1, 300))
def test_random_shapes_property(rows, width):
    with use_backend("triton"):
        check(torch.randn(rows, 2 * width, device=DEVICE) * 3)


test_random_shapes_property = pytest.mark.usefixtures("triton_backend")(test_random_shapes_property)


def test_fake_kernel_matches_real_output(triton_backend):
    x = torch.randn(3, 5, 48, device=DEVICE)
    torch.library.opcheck(geglu_triton, (x,), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "shape",
    [(2, 4096, 2 * 1280), (2, 1024, 2 * 2560), (2, 4096, 2 * 2560)],
    ids=lambda shape: "x".join(map(str, shape)),
)
def test_sd_shapes_on_gpu(monkeypatch, shape, dtype):
    counter = CallCounter(monkeypatch, geglu_kernels, "geglu_forward")
    with use_backend("triton"):
        check((torch.randn(shape, device=DEVICE) * 3).to(dtype), what=str(shape))
    assert counter.calls == 1  # the kernel ran, not a silent eager fallback


def test_reference_matches_the_definition():
    """geglu_reference, every kernel test's oracle, against diffusers' GEGLU split written out
    in float64: ``hidden, gate = proj(x).chunk(2, dim=-1)``, ``hidden * gelu(gate)`` with the
    exact (erf) GELU. A swapped or tanh-approximated reference would make the tolerance rule's
    eager error large and every kernel test pass."""
    x = torch.randn(3, 5, 2 * 24, device=DEVICE) * 3
    hidden, gate = x.double()[..., :24], x.double()[..., 24:]
    truth = hidden * 0.5 * gate * (1.0 + torch.erf(gate / math.sqrt(2.0)))
    out = geglu_reference(x)
    assert out.dtype == x.dtype and out.shape == (3, 5, 24)
    torch.testing.assert_close(out.double(), truth, atol=1e-5, rtol=1e-5)


def test_reference_matches_diffusers_geglu():
    """The same against diffusers' own GEGLU module, its projection set to the identity: the
    value | gate order must be diffusers' so that its weights load unchanged."""
    activations = pytest.importorskip("diffusers.models.activations")
    module = activations.GEGLU(16, 8).to(DEVICE)
    with torch.no_grad():
        module.proj.weight.copy_(torch.eye(16))
        module.proj.bias.zero_()
        x = torch.randn(4, 16, device=DEVICE) * 3
        want = module(x)
    torch.testing.assert_close(geglu_reference(x), want, atol=1e-5, rtol=1e-5)
