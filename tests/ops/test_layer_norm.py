"""LayerNorm Triton kernel against the fp32 reference (tolerance rule in helpers.py), alone and
after a residual addition (``add_layer_norm``: both outputs, the sum and its LayerNorm)."""

from __future__ import annotations

import fastdiff.kernels.layer_norm as layer_norm_kernels
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdiff.ops import (
    add_layer_norm,
    add_layer_norm_reference,
    layer_norm,
    layer_norm_reference,
    use_backend,
)
from fastdiff.ops.layer_norm import (
    add_layer_norm_eager,
    add_layer_norm_triton,
    layer_norm_eager,
    layer_norm_triton,
    layer_norm_triton_supports,
)
from tests.ops.helpers import (
    DEVICE,
    CallCounter,
    assert_within_tolerance,
    check_mixed_float_dtypes,
    kernel_dtypes,
    mixed_float_dtypes,
)

EDGE_CASES = [
    pytest.param((2, 16, 320), id="sd-width-320"),
    pytest.param((3, 77, 40), id="77-tokens"),
    pytest.param((5, 33), id="odd-width"),
    pytest.param((1, 1, 1), id="width-1"),
    pytest.param((2, 3, 4, 96), id="4d-input"),
]


def check(x, weight, bias, eps=1e-5, what="", residual=None):
    """layer_norm, or with ``residual`` add_layer_norm (both outputs; without a sum_bias or
    x_bias, with each and with both: four calls), against the references."""
    if residual is None:
        out = layer_norm(x, weight, bias, eps)
        reference = layer_norm_reference(x, weight, bias, eps)
        assert_within_tolerance(out, reference, layer_norm_eager(x, weight, bias, eps), what)
        return out
    sum_bias = torch.randn(x.shape[-1], device=x.device).to(x.dtype)
    x_bias = torch.randn(x.shape[-1], device=x.device).to(x.dtype)
    for extra, first in ((None, None), (None, x_bias), (sum_bias, x_bias), (sum_bias, None)):
        args = (x, residual, weight, bias, eps, extra, first)
        total, normed = add_layer_norm(*args)
        want_total, want_normed = add_layer_norm_reference(*args)
        eager_total, eager_normed = add_layer_norm_eager(*args)
        label = f"{what} {'with' if extra is not None else 'without'} sum_bias, "
        label += f"{'with' if first is not None else 'without'} x_bias"
        assert_within_tolerance(total, want_total, eager_total, f"{label}: sum")
        assert_within_tolerance(normed, want_normed, eager_normed, f"{label}: layer norm")
        assert total.is_contiguous() and normed.is_contiguous()
    return total - sum_bias, normed


def make(shape, dtype, affine=True, offset=0.0):
    x = (torch.randn(shape, device=DEVICE) + offset).to(dtype)
    width = shape[-1]
    weight = torch.randn(width, device=DEVICE).to(dtype) if affine else None
    bias = torch.randn(width, device=DEVICE).to(dtype) if affine else None
    return x, weight, bias


def residual_for(x, wanted: bool, offset=0.0):
    """A residual for ``x`` (of a larger scale, around -offset) when wanted, else None."""
    if not wanted:
        return None
    return (torch.randn(x.shape, device=x.device) * 3 - offset).to(x.dtype)


with_residual = pytest.mark.parametrize("residual", [False, True], ids=["alone", "residual"])


@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("shape", EDGE_CASES)
@with_residual
def test_edge_shapes(triton_backend, monkeypatch, shape, dtype, residual):
    counter = CallCounter(monkeypatch, layer_norm_kernels, "layer_norm_forward")
    x, weight, bias = make(shape, dtype)
    check(x, weight, bias, what=str(shape), residual=residual_for(x, residual))
    assert counter.calls == (4 if residual else 1)


@pytest.mark.parametrize("affine", [False, True], ids=["no-affine", "affine"])
@with_residual
def test_without_affine_and_large_mean(triton_backend, affine, residual):
    x, weight, bias = make((4, 64), torch.float32, affine=affine, offset=100.0)
    check(x, weight, bias, eps=1e-6, residual=residual_for(x, residual, offset=50.0))


@with_residual
def test_strided_rows_are_read_in_place(triton_backend, monkeypatch, residual):
    counter = CallCounter(monkeypatch, layer_norm_kernels, "layer_norm_forward")
    base = torch.randn(6, 2, 48, device=DEVICE)
    x = base[:, 1]  # rows with stride 96: a view, no copy
    rows = torch.randn(6, 80, device=DEVICE)[:, 16:64] if residual else None  # stride 80
    check(x, None, None, residual=rows)
    assert counter.calls == (4 if residual else 1)


def test_add_layer_norm_normalizes_the_sum(triton_backend):
    """Not x alone: x and the residual cancel to a constant row in one place."""
    x, weight, bias = make((3, 32), torch.float32)
    residual = residual_for(x, True)
    residual[1] = 5.0 - x[1]  # row 1 sums to 5 everywhere: its LayerNorm is the bias
    total, normed = check(x, weight, bias, residual=residual)
    torch.testing.assert_close(total[1], torch.full_like(total[1], 5.0))
    torch.testing.assert_close(normed[1], bias)


def test_add_layer_norm_gradients_take_the_eager_path(triton_backend, monkeypatch):
    counter = CallCounter(monkeypatch, layer_norm_kernels, "layer_norm_forward")
    x, weight, bias = make((4, 16), torch.float32)
    x.requires_grad_(True)
    total, normed = add_layer_norm(x, residual_for(x, True), weight, bias)
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
def test_add_layer_norm_bad_residual_raises(residual, message):
    with pytest.raises(ValueError, match=message):
        add_layer_norm(torch.randn(4, 16), residual)


@pytest.mark.parametrize("name", ["sum_bias", "x_bias"])
@pytest.mark.parametrize("extra", [torch.zeros(8), torch.zeros(16, dtype=torch.long)])
def test_add_layer_norm_bad_sum_or_x_bias_raises(name, extra):
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match=rf"{name} must be a floating \(16,\) tensor, got"):
        add_layer_norm(x, x, **{name: extra})


def test_add_layer_norm_eager_takes_an_x_bias_of_another_float_dtype():
    """The eager helper adds an fp32 x_bias to fp16 x as the linear layer would have: in x's
    dtype (the sum must not become fp32, which F.layer_norm's fp16 weights then refuse)."""
    x, weight, bias = make((4, 24), torch.float16)
    residual = residual_for(x, True)
    x_bias = torch.randn(24, device=DEVICE)
    total, normed = add_layer_norm_eager(x, residual, weight, bias, 1e-5, None, x_bias)
    assert total.dtype == normed.dtype == torch.float16
    want = add_layer_norm_eager(x, residual, weight, bias, 1e-5, None, x_bias.half())
    torch.testing.assert_close((total, normed), want)


def test_add_layer_norm_x_bias_is_added_before_the_norm(triton_backend):
    """x_bias joins x before anything else: LayerNorm of x + x_bias + residual, and the sum with
    it; a kernel that added it after normalizing, or to the sum only, misses."""
    x, weight, bias = make((6, 40), torch.float32)
    residual = residual_for(x, True)
    x_bias = torch.randn(40, device=DEVICE) * 5
    total, normed = add_layer_norm(x, residual, weight, bias, 1e-5, None, x_bias)
    want = x + x_bias + residual
    torch.testing.assert_close(total, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        normed, F.layer_norm(want, (40,), weight, bias), atol=1e-4, rtol=1e-4
    )


def test_transposed_input_falls_back_to_eager(triton_backend, monkeypatch):
    counter = CallCounter(monkeypatch, layer_norm_kernels, "layer_norm_forward")
    x = torch.randn(16, 8, device=DEVICE).t()  # column stride 8
    torch.testing.assert_close(layer_norm(x), layer_norm_eager(x, None, None))
    assert counter.calls == 0


def test_float64_falls_back_to_eager(triton_backend, monkeypatch):
    counter = CallCounter(monkeypatch, layer_norm_kernels, "layer_norm_forward")
    x = torch.randn(4, 8, device=DEVICE, dtype=torch.float64)
    torch.testing.assert_close(layer_norm(x), layer_norm_eager(x, None, None))
    assert counter.calls == 0


@mixed_float_dtypes
def test_weights_of_another_float_dtype_agree_on_every_backend(x_dtype, param_dtype):
    x = (torch.randn(3, 7, 40) + 100.0).to(DEVICE, x_dtype)  # a mean that fp32 feels
    weight = torch.randn(40, device=DEVICE, dtype=param_dtype)
    bias = torch.randn(40, device=DEVICE, dtype=param_dtype)
    want = F.layer_norm(x.double(), (40,), weight.double(), bias.double()).to(x_dtype)
    check_mixed_float_dtypes(lambda x: layer_norm(x, weight, bias), x, want)


def test_integer_weights_raise():
    with pytest.raises(ValueError, match="bias must be a floating tensor, got torch.int64"):
        layer_norm(torch.randn(2, 8), None, torch.ones(8, dtype=torch.long))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="weight has shape"):
        layer_norm(torch.randn(2, 8), torch.randn(4))
    # These were an IndexError from inside the check, and NaN rows with no error (as group_norm
    # already refused a negative eps).
    with pytest.raises(ValueError, match=r"at least one dimension, got \(\)"):
        layer_norm(torch.tensor(1.0))
    for eps in (-1e-3, float("nan"), "1e-5"):
        with pytest.raises(ValueError, match="layer_norm: eps must be a finite number >= 0"):
            layer_norm(torch.randn(2, 8), eps=eps)
        with pytest.raises(ValueError, match="layer_norm: eps must be a finite number >= 0"):
            add_layer_norm(torch.randn(2, 8), torch.randn(2, 8), eps=eps)


@settings(max_examples=6, deadline=None)
@given(
    rows=st.integers(1, 20), width=st.integers(2, 200), affine=st.booleans(), residual=st.booleans()
)
def test_random_shapes_property(rows, width, affine, residual):
    x, weight, bias = make((rows, width), torch.float32, affine=affine)
    with use_backend("triton"):
        check(x, weight, bias, residual=residual_for(x, residual))


test_random_shapes_property = pytest.mark.usefixtures("triton_backend")(test_random_shapes_property)


def test_fake_kernel_matches_real_output(triton_backend):
    x, weight, bias = make((3, 5, 24), torch.float32)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(layer_norm_triton, (x, weight, bias, 1e-5), test_utils=checks)
    residual = residual_for(x, True)
    for sum_bias, x_bias in ((None, None), (bias, None), (None, weight), (bias, weight)):
        args = (x, residual, weight, bias, 1e-5, sum_bias, x_bias)
        torch.library.opcheck(add_layer_norm_triton, args, test_utils=checks)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "shape",
    [(2, 4096, 320), (2, 1024, 640), (2, 4096, 640), (2, 1024, 1280), (2, 77, 2048)],
    ids=lambda shape: "x".join(map(str, shape)),
)
@with_residual
def test_sd_shapes_on_gpu(monkeypatch, shape, dtype, residual):
    counter = CallCounter(monkeypatch, layer_norm_kernels, "layer_norm_forward")
    x, weight, bias = make(shape, dtype)
    with use_backend("triton"):
        check(x, weight, bias, what=str(shape), residual=residual_for(x, residual))
    assert counter.calls == (4 if residual else 1)  # the kernel ran, not an eager fallback


def test_strided_weight_bias_and_sum_bias_match_the_reference(triton_backend):
    """Weight, bias and add_layer_norm's sum_bias as strided views (every other element): the
    kernel indexes them with unit stride, so such parameters must not reach it as they are."""
    x, _, _ = make((3, 5, 24), torch.float32)
    residual = residual_for(x, True)
    weight, bias, sum_bias, x_bias = (torch.randn(48, device=DEVICE)[::2] for _ in range(4))
    for w, b in ((weight, None), (None, bias), (weight, bias)):
        check(x, w, b, what=f"strided weight {w is not None}, bias {b is not None}")
    args = (x, residual, weight, bias, 1e-5, sum_bias, x_bias)
    for got, want, eager, name in zip(
        add_layer_norm(*args),
        add_layer_norm_reference(*args),
        add_layer_norm_eager(*args),
        ("sum", "layer norm"),
        strict=True,
    ):
        assert_within_tolerance(got, want, eager, f"strided parameters and sum_bias: {name}")
    contiguous = (x, residual, None, None, 1e-5, sum_bias)
    total, _ = add_layer_norm(*contiguous)
    want_total, _ = add_layer_norm_reference(*contiguous)
    assert_within_tolerance(total, want_total, add_layer_norm_eager(*contiguous)[0], "sum_bias")


@with_residual
def test_eps_is_used(triton_backend, residual):
    """A variance (1e-4) well below eps (1e-2): an eps the kernel ignored or replaced by the
    default 1e-5 would scale the output about 10x."""
    x, weight, bias = make((4, 40), torch.float32)
    x = x * 1e-2
    rows = x.flip(0) * 0.5 if residual else None
    check(x, weight, bias, eps=1e-2, what="eps 1e-2", residual=rows)


def test_supports_refuses_rows_longer_than_max_row():
    """One row must fit a program's registers: rows longer than MAX_ROW go to the eager path."""
    limit = layer_norm_kernels.MAX_ROW
    assert layer_norm_triton_supports(torch.empty(2, limit, device="meta"), None, None)
    assert not layer_norm_triton_supports(torch.empty(2, limit + 1, device="meta"), None, None)


def layer_norm_float64(x, weight, bias, eps):
    """LayerNorm over the last dimension written out in float64: the oracle of the reference."""
    values = x.double()
    mean = values.mean(dim=-1, keepdim=True)
    var = ((values - mean) ** 2).mean(dim=-1, keepdim=True)
    out = (values - mean) / torch.sqrt(var + eps)
    if weight is not None:
        out = out * weight.double()
    return out if bias is None else out + bias.double()


@pytest.mark.parametrize("affine", [False, True], ids=["no-affine", "affine"])
def test_references_match_the_definition(affine):
    """layer_norm_reference and add_layer_norm_reference, the kernel tests' oracles, against
    LayerNorm written out in float64 (eps 0.1 so that a reference that dropped eps would show):
    a wrong reference would make the tolerance rule's eager error large and every test pass."""
    x, weight, bias = make((3, 4, 24), torch.float32, affine=affine)
    close = dict(atol=1e-5, rtol=1e-5)  # fp32 rounding, far below any formula slip
    out = layer_norm_reference(x, weight, bias, 0.1)
    assert out.dtype == x.dtype
    torch.testing.assert_close(out.double(), layer_norm_float64(x, weight, bias, 0.1), **close)
    residual = residual_for(x, True)
    sum_bias = torch.randn(24, device=DEVICE)
    total, normed = add_layer_norm_reference(x, residual, weight, bias, 0.1, sum_bias)
    exact = x.double() + residual.double()
    torch.testing.assert_close(total.double(), exact + sum_bias.double(), **close)
    torch.testing.assert_close(
        normed.double(), layer_norm_float64(exact, weight, bias, 0.1), **close
    )
