"""The fused GEGLU projection (linear_geglu) against its fp32 reference (tolerance rule in
helpers.py), its fallbacks, and its backend choice."""

from __future__ import annotations

import fastdiff.kernels.gelu as gelu_kernels
import fastdiff.kernels.linear_geglu as linear_geglu_kernels
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdiff.ops import linear_geglu, linear_geglu_reference, use_backend
from fastdiff.ops.autoselect import linear_geglu_key, preferred_backend
from fastdiff.ops.geglu import geglu_reference
from fastdiff.ops.linear_geglu import linear_geglu_eager, linear_geglu_triton
from tests.ops.helpers import DEVICE, CallCounter, assert_within_tolerance, kernel_dtypes

# (x shape, inner, bias): x's last dimension is the input features K.
EDGE_CASES = [
    pytest.param((2, 16, 320), 64, True, id="sd-width-320"),
    pytest.param((1, 77, 40), 24, True, id="77-tokens-k-and-inner-below-a-block"),
    pytest.param((3, 70, 96), 80, True, id="k-and-inner-past-a-block"),
    pytest.param((5, 33), 17, False, id="odd-sizes-no-bias"),
    pytest.param((1, 8), 1, True, id="one-row-inner-1"),
    pytest.param((2, 3, 130, 16), 136, True, id="rows-past-a-block-4d"),
]


def make(shape, inner, bias, dtype=torch.float32):
    depth = shape[-1]
    x = (torch.randn(shape, device=DEVICE) * 2).to(dtype)
    weight = (torch.randn(2 * inner, depth, device=DEVICE) / depth**0.5).to(dtype)
    b = torch.randn(2 * inner, device=DEVICE).to(dtype) if bias else None
    return x, weight, b


def check(x, weight, bias, what=""):
    out = linear_geglu(x, weight, bias)
    want = linear_geglu_reference(x, weight, bias)
    assert_within_tolerance(out, want, linear_geglu_eager(x, weight, bias), what)
    return out


@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("shape, inner, bias", EDGE_CASES)
def test_edge_shapes(triton_backend, monkeypatch, shape, inner, bias, dtype):
    counter = CallCounter(monkeypatch, linear_geglu_kernels, "linear_geglu_forward")
    out = check(*make(shape, inner, bias, dtype), what=str(shape))
    assert out.shape == (*shape[:-1], inner)
    assert counter.calls == 1


@pytest.mark.parametrize("dtype", [d for d in kernel_dtypes() if d.id != "fp32"])
@pytest.mark.parametrize("shape, inner, bias", EDGE_CASES)
def test_edge_shapes_with_the_polynomial_erf(
    triton_backend, monkeypatch, shape, inner, bias, dtype
):
    """kernels/gelu.py's POLYNOMIAL_ERF (bench_linear_geglu's fastdiff-polyerf rows), within
    the same tolerance rule."""
    monkeypatch.setattr(gelu_kernels, "POLYNOMIAL_ERF", True)
    test_edge_shapes(triton_backend, monkeypatch, shape, inner, bias, dtype)


@pytest.mark.parametrize("config", sorted(linear_geglu_kernels.CONFIGS))
def test_every_config_computes_the_same(triton_backend, monkeypatch, config):
    """The tile shapes the benchmark's variant rows time, each on a shape with partial tiles."""
    monkeypatch.setattr(linear_geglu_kernels, "config_override", config)
    counter = CallCounter(monkeypatch, linear_geglu_kernels, "linear_geglu_forward")
    check(*make((2, 150, 72), 140, True, torch.float16), what=config)
    assert counter.calls == 1


def test_value_and_gate_halves_are_not_swapped(triton_backend):
    """With the gate rows zero, gelu(gate + bias) is a known constant per column: the output is
    value * gelu(b_gate), which a kernel that swapped the halves (or read one twice) misses."""
    x, weight, bias = make((4, 24), 20, True)
    weight[20:] = 0
    value = x @ weight[:20].t() + bias[:20]
    want = value * torch.nn.functional.gelu(bias[20:])
    torch.testing.assert_close(linear_geglu(x, weight, bias), want, atol=1e-5, rtol=1e-5)


def test_strided_rows_are_read_in_place(triton_backend, monkeypatch):
    counter = CallCounter(monkeypatch, linear_geglu_kernels, "linear_geglu_forward")
    x = torch.randn(4, 3, 32, device=DEVICE)[:, 1]
    _, weight, bias = make((1, 32), 16, True)
    check(x, weight, bias)
    assert counter.calls == 1


@pytest.mark.parametrize(
    "layout",
    ["transposed-x", "transposed-weight", "strided-bias", "no-input-features"],
)
def test_inputs_the_kernel_does_not_take_run_in_two_steps(triton_backend, monkeypatch, layout):
    counter = CallCounter(monkeypatch, linear_geglu_kernels, "linear_geglu_forward")
    x, weight, bias = make((6, 8), 4, True)
    if layout == "transposed-x":
        x = torch.randn(8, 6, device=DEVICE).t()
    elif layout == "transposed-weight":
        weight = weight.t().contiguous().t()
    elif layout == "strided-bias":
        bias = torch.randn(16, device=DEVICE)[::2]
    else:
        x, weight = x[:, :0], weight[:, :0]
    out = linear_geglu(x, weight, bias)
    torch.testing.assert_close(out, linear_geglu_eager(x, weight, bias))
    assert counter.calls == 0


@pytest.mark.parametrize(
    "x_shape, weight_shape, bias_shape, match",
    [
        ((4, 8), (7, 8), None, "even number of rows"),
        ((4, 8), (6, 9), None, "takes 9 input features"),
        ((4, 8), (6, 8), (5,), r"bias has shape \(5,\), expected \(6,\)"),
        ((4, 8), (6, 8, 1), None, "weight"),
    ],
)
def test_bad_shapes_raise(x_shape, weight_shape, bias_shape, match):
    bias = None if bias_shape is None else torch.randn(bias_shape)
    with pytest.raises(ValueError, match=match):
        linear_geglu(torch.randn(x_shape), torch.randn(weight_shape), bias)


def test_mixed_dtypes_raise():
    with pytest.raises(ValueError, match="weight is torch.float16 on cpu, x is torch.float32"):
        linear_geglu(torch.randn(4, 8), torch.randn(6, 8).half())


@settings(max_examples=6, deadline=None)
@given(
    rows=st.integers(1, 70), depth=st.integers(1, 90), inner=st.integers(1, 70), bias=st.booleans()
)
def test_random_shapes_property(rows, depth, inner, bias):
    with use_backend("triton"):
        check(*make((rows, depth), inner, bias), what=f"{rows}x{depth}->{inner}")


test_random_shapes_property = pytest.mark.usefixtures("triton_backend")(test_random_shapes_property)


def test_fake_kernel_matches_real_output(triton_backend):
    x, weight, bias = make((3, 5, 16), 8, True)
    torch.library.opcheck(
        linear_geglu_triton, (x, weight, bias), test_utils=("test_schema", "test_faketensor")
    )


def test_eager_backend_is_the_two_steps(monkeypatch):
    counter = CallCounter(monkeypatch, linear_geglu_kernels, "linear_geglu_forward")
    x, weight, bias = make((5, 12), 6, True)
    with use_backend("eager"):
        out = linear_geglu(x, weight, bias)
    assert torch.equal(out, linear_geglu_eager(x, weight, bias))
    assert counter.calls == 0


def test_gradients_flow_through_the_two_steps():
    x, weight, bias = make((5, 12), 6, True)
    weight.requires_grad_(True)
    with use_backend("triton"):
        linear_geglu(x, weight, bias).sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


def test_auto_runs_the_fused_kernel_only_where_it_was_timed_faster():
    x, weight = torch.randn(2, 4096, 320).half(), torch.randn(2560, 320).half()
    key = linear_geglu_key(x, weight)
    assert key == "8192x320x2560|fp16"
    assert preferred_backend("linear_geglu", key, table={}) == "eager"
    faster = {f"linear_geglu|{key}": {"triton": 0.030, "eager": 0.050}}
    slower = {f"linear_geglu|{key}": {"triton": 0.060, "eager": 0.050}}
    assert preferred_backend("linear_geglu", key, table=faster) == "triton"
    assert preferred_backend("linear_geglu", key, table=slower) == "eager"


@pytest.mark.gpu
@pytest.mark.parametrize("config", sorted(linear_geglu_kernels.CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "rows, depth, inner",
    [(8192, 320, 1280), (2048, 640, 2560), (512, 1280, 5120), (154, 2048, 5120)],
    ids=lambda size: str(size),
)
def test_sd_shapes_on_gpu(monkeypatch, rows, depth, inner, dtype, config):
    monkeypatch.setattr(linear_geglu_kernels, "config_override", config)
    counter = CallCounter(monkeypatch, linear_geglu_kernels, "linear_geglu_forward")
    x, weight, bias = make((rows, depth), inner, True, dtype)
    with use_backend("triton"):
        check(x, weight, bias, what=f"{rows}x{depth}->{inner} {config}")
    assert counter.calls == 1  # the kernel ran, not a silent two-step fallback


def test_reference_matches_diffusers_geglu():
    """The reference against diffusers' GEGLU module with random weights: its projection's
    first half of rows is the value, as here, so its weights load unchanged."""
    activations = pytest.importorskip("diffusers.models.activations")
    module = activations.GEGLU(16, 8).to(DEVICE)
    x = torch.randn(4, 16, device=DEVICE) * 2
    with torch.no_grad():
        want = module(x)
        got = linear_geglu_reference(x, module.proj.weight, module.proj.bias)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    projection = torch.nn.functional.linear(x, module.proj.weight, module.proj.bias)
    torch.testing.assert_close(got, geglu_reference(projection))


def lora_like(layer):  # as LoRA patches attach themselves
    original = layer.forward
    layer.forward = lambda *args, **kwargs: original(*args, **kwargs) + 0.5


def doubling_hook(layer):
    layer.register_forward_hook(lambda module, inputs, out: out * 2)


@pytest.mark.parametrize("patch", [None, lora_like, doubling_hook], ids=["plain", "lora", "hook"])
def test_the_feed_forward_fuses_only_a_plain_projection(triton_backend, monkeypatch, patch):
    """GEGLU (diffusers' key ``proj``) runs linear_geglu on a plain projection, and a patched
    one as it is, its output then through the GEGLU kernel."""
    import fastdiff.kernels.geglu as geglu_kernels

    from fastdiff.models.transformer import GEGLU

    module = GEGLU(24, 40).to(DEVICE)
    x = torch.randn(2, 9, 24, device=DEVICE)
    fused = CallCounter(monkeypatch, linear_geglu_kernels, "linear_geglu_forward")
    separate = CallCounter(monkeypatch, geglu_kernels, "geglu_forward")
    if patch is not None:
        patch(module.proj)
    with torch.no_grad():
        out = module(x)
        want = geglu_reference(module.proj(x))  # the (patched) projection, then the activation
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert (fused.calls, separate.calls) == ((1, 0) if patch is None else (0, 1))


def test_autocast_runs_the_two_steps(triton_backend, monkeypatch):
    """Under torch.autocast the projection is autocast as nn.Linear's is (fp32 weights with
    bfloat16 activations here): the op runs the two steps rather than refusing the dtype mix, and
    the GEGLU module gives what diffusers' layout gives under autocast."""
    from fastdiff.models.transformer import GEGLU

    fused = CallCounter(monkeypatch, linear_geglu_kernels, "linear_geglu_forward")
    module = GEGLU(16, 8).to(DEVICE)
    x = torch.randn(3, 16, device=DEVICE)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = module(x)
        want = geglu_reference(module.proj(x))
    assert out.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(out, want)
    assert fused.calls == 0
