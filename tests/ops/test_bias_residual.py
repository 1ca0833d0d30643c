"""The ResNet block's end, x + h + bias in one pass, against the fp32 reference (tolerance rule
in helpers.py); other inputs go to PyTorch's two additions."""

from __future__ import annotations

import fastdiff.kernels.bias_residual as bias_residual_kernels
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdiff.ops import bias_residual, bias_residual_reference, use_backend
from fastdiff.ops.autoselect import group_norm_key, preferred_backend
from fastdiff.ops.bias_residual import bias_residual_eager
from tests.ops.helpers import DEVICE, INTERPRET, CallCounter, assert_within_tolerance, kernel_dtypes

EDGE_CASES = [
    pytest.param((2, 32, 4, 4), id="sd-like"),
    pytest.param((1, 24, 3, 5), id="channels-not-a-power-of-two"),
    pytest.param((2, 3, 4, 2), id="odd-channels"),
    pytest.param((1, 200, 2, 3), id="wider-than-a-channel-block"),
    pytest.param((3, 8, 33, 9), id="more-rows-than-a-block"),
]


def nhwc(shape, dtype, scale=1.0):
    values = torch.randn(shape, device=DEVICE) * scale
    return values.to(dtype).contiguous(memory_format=torch.channels_last)


def inputs(shape, dtype):
    x, h = nhwc(shape, dtype, 3.0), nhwc(shape, dtype, 3.0)
    bias = (torch.randn(shape[1], device=DEVICE) * 3).to(dtype)
    return x, h, bias


def check(x, h, bias, what=""):
    out = bias_residual(x, h, bias)
    eager = bias_residual_eager(x, h, bias)
    assert_within_tolerance(out, bias_residual_reference(x, h, bias), eager, what)
    assert out.stride() == eager.stride(), f"{what}: layout {out.stride()} != {eager.stride()}"
    return out


@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("shape", EDGE_CASES)
def test_edge_shapes(triton_backend, monkeypatch, shape, dtype):
    counter = CallCounter(monkeypatch, bias_residual_kernels, "bias_residual_forward")
    out = check(*inputs(shape, dtype), what=str(shape))
    assert counter.calls == 1
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_each_term_counts_once(triton_backend):
    """Distinct magnitudes per term: a dropped, doubled or misplaced one shows exactly."""
    shape = (2, 24, 3, 5)
    x = nhwc(shape, torch.float32).round()
    h = nhwc(shape, torch.float32).round() * 1000
    bias = torch.arange(24, dtype=torch.float32, device=DEVICE) * 1e5  # sums exact in fp32
    assert torch.equal(bias_residual(x, h, bias), x + h + bias[None, :, None, None])


@pytest.mark.parametrize(
    "case", ["nchw", "mixed-layouts", "one-by-one-map", "mixed-dtypes", "strided-bias"]
)
def test_other_inputs_go_to_pytorch(triton_backend, monkeypatch, case):
    counter = CallCounter(monkeypatch, bias_residual_kernels, "bias_residual_forward")
    x, h, bias = inputs((2, 8, 3, 3), torch.float32)
    if case == "nchw":
        x, h = x.contiguous(), h.contiguous()
    elif case == "mixed-layouts":
        h = h.contiguous()
    elif case == "one-by-one-map":
        x, h, bias = inputs((2, 8, 1, 1), torch.float32)
    elif case == "mixed-dtypes":
        h = h.half()
    else:
        bias = torch.randn(16, device=DEVICE)[::2]
    out = bias_residual(x, h, bias)
    torch.testing.assert_close(out, bias_residual_eager(x, h, bias))
    assert counter.calls == 0


def test_gradients_go_through_pytorch(triton_backend, monkeypatch):
    counter = CallCounter(monkeypatch, bias_residual_kernels, "bias_residual_forward")
    x, h, bias = inputs((2, 8, 3, 3), torch.float32)
    bias.requires_grad_(True)
    bias_residual(x, h, bias).sum().backward()
    assert counter.calls == 0 and torch.equal(bias.grad, torch.full_like(bias, 18.0))


@pytest.mark.parametrize(
    "shapes, match",
    [
        (((2, 8, 3, 3), (2, 8, 3, 4), (8,)), "one .B, C, H, W. shape"),
        (((2, 8, 3), (2, 8, 3), (8,)), "one .B, C, H, W. shape"),
        (((2, 8, 3, 3), (2, 8, 3, 3), (4,)), r"bias has shape \(4,\), expected \(8,\)"),
    ],
)
def test_bad_inputs_name_the_shapes(shapes, match):
    with pytest.raises(ValueError, match=match):
        bias_residual(*(torch.zeros(shape) for shape in shapes))
    with pytest.raises(ValueError, match="expects tensors"):
        bias_residual(torch.zeros(2, 8, 3, 3), torch.zeros(2, 8, 3, 3), 1.0)


def test_auto_keeps_pytorch_where_unmeasured():
    x = torch.zeros(2, 320, 64, 64).half().contiguous(memory_format=torch.channels_last)
    key = group_norm_key(x)
    assert preferred_backend("bias_residual", key, table={}) == "eager"
    table = {f"bias_residual|{key}": {"triton": 0.004, "eager": 0.012}}
    assert preferred_backend("bias_residual", key, table=table) == "triton"


@settings(max_examples=12, deadline=None)
@given(
    batch=st.integers(1, 2),
    channels=st.integers(2, 70),
    height=st.integers(1, 6),
    width=st.integers(2, 6),
)
def test_random_shapes(batch, channels, height, width):
    if not (INTERPRET or torch.cuda.is_available()):
        pytest.skip("triton kernels need a GPU or TRITON_INTERPRET=1")
    with use_backend("triton"):
        check(*inputs((batch, channels, height, width), torch.float16))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "shape",
    [(2, 320, 64, 64), (2, 1280, 8, 8), (1, 128, 512, 512), (2, 3, 5, 7)],
    ids=["sd15-64x64", "sd15-8x8", "vae-512", "odd"],
)
def test_model_shapes_on_gpu(monkeypatch, shape, dtype):
    counter = CallCounter(monkeypatch, bias_residual_kernels, "bias_residual_forward")
    with use_backend("triton"):
        check(*inputs(shape, dtype), what=str(shape))
    assert counter.calls == 1
