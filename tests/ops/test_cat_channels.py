"""Channels-last concatenation kernel against torch.cat: a copy, so equal bit for bit, with
torch.cat's output layout; other inputs go to torch.cat."""

from __future__ import annotations

import fastdiff.kernels.cat_channels as cat_kernels
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdiff.ops import cat_channels, cat_channels_reference, use_backend
from fastdiff.ops.autoselect import cat_channels_key, preferred_backend
from tests.ops.helpers import DEVICE, CallCounter, kernel_dtypes

EDGE_CASES = [
    pytest.param((2, 32, 4, 4), 32, id="sd-like-equal-halves"),
    pytest.param((2, 64, 3, 5), 32, id="unequal-channels"),
    pytest.param((1, 24, 2, 3), 40, id="channels-not-a-power-of-two"),
    pytest.param((2, 3, 4, 2), 5, id="odd-channels"),
    pytest.param((1, 200, 2, 2), 136, id="wider-than-a-channel-block"),
    pytest.param((3, 8, 33, 9), 8, id="more-rows-than-a-block"),
]


def nhwc(shape, dtype):
    values = torch.randn(shape, device=DEVICE) * 100
    return values.to(dtype).contiguous(memory_format=torch.channels_last)


def check(a, b):
    out = cat_channels(a, b)
    want = cat_channels_reference(a, b)
    assert out.shape == want.shape and out.dtype == want.dtype
    assert torch.equal(out, want)
    if out.numel():
        assert out.stride() == want.stride()
    return out


@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("shape, channels_b", EDGE_CASES)
def test_edge_shapes_equal_torch_cat(triton_backend, monkeypatch, shape, channels_b, dtype):
    counter = CallCounter(monkeypatch, cat_kernels, "cat_channels_forward")
    a = nhwc(shape, dtype)
    b = nhwc((shape[0], channels_b, *shape[2:]), dtype)
    out = check(a, b)
    assert counter.calls == 1
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_every_element_lands_in_its_place(triton_backend):
    """Distinct values (their own flat index) on both sides: a swapped or shifted block shows."""
    a = torch.arange(2 * 24 * 5 * 7, dtype=torch.float32, device=DEVICE).view(2, 5, 7, 24)
    b = -1 - torch.arange(2 * 40 * 5 * 7, dtype=torch.float32, device=DEVICE).view(2, 5, 7, 40)
    check(a.permute(0, 3, 1, 2), b.permute(0, 3, 1, 2))


@pytest.mark.parametrize(
    "case",
    ["nchw", "mixed-layouts", "one-by-one-map", "one-channel", "empty", "mixed-dtypes", "sliced"],
)
def test_other_inputs_go_to_torch_cat(triton_backend, monkeypatch, case):
    counter = CallCounter(monkeypatch, cat_kernels, "cat_channels_forward")
    a, b = nhwc((2, 8, 3, 3), torch.float32), nhwc((2, 16, 3, 3), torch.float32)
    if case == "nchw":
        a, b = a.contiguous(), b.contiguous()
    elif case == "mixed-layouts":
        b = b.contiguous()
    elif case == "one-by-one-map":
        a, b = nhwc((2, 8, 1, 1), torch.float32), nhwc((2, 16, 1, 1), torch.float32)
    elif case == "one-channel":
        a = nhwc((2, 1, 3, 3), torch.float32)
    elif case == "empty":  # no channels: both layouts at once
        a = nhwc((2, 0, 3, 3), torch.float32)
    elif case == "mixed-dtypes":
        b = b.half()
    else:  # channels-last but not dense: every second channel of a wider map
        a = nhwc((2, 16, 3, 3), torch.float32)[:, ::2]
    check(a, b)
    assert counter.calls == 0


def test_gradients_go_through_torch_cat(triton_backend, monkeypatch):
    counter = CallCounter(monkeypatch, cat_kernels, "cat_channels_forward")
    a = nhwc((2, 8, 3, 3), torch.float32).requires_grad_(True)
    b = nhwc((2, 16, 3, 3), torch.float32)
    cat_channels(a, b).sum().backward()
    assert counter.calls == 0 and torch.equal(a.grad, torch.ones_like(a))


@pytest.mark.parametrize(
    "a_shape, b_shape, match",
    [
        ((2, 8, 3, 3), (1, 8, 3, 3), "batch, height and width"),
        ((2, 8, 3, 3), (2, 8, 3, 4), "batch, height and width"),
        ((2, 8, 3), (2, 8, 3), r"two \(B, C, H, W\) tensors"),
    ],
)
def test_bad_inputs_name_the_shapes(a_shape, b_shape, match):
    with pytest.raises(ValueError, match=match):
        cat_channels(torch.zeros(a_shape), torch.zeros(b_shape))
    with pytest.raises(ValueError, match="two tensors"):
        cat_channels(torch.zeros(a_shape), [1, 2])


def test_auto_keeps_torch_cat_where_unmeasured():
    a, b = torch.zeros(2, 640, 32, 32).half(), torch.zeros(2, 320, 32, 32).half()
    a, b = (t.contiguous(memory_format=torch.channels_last) for t in (a, b))
    key = cat_channels_key(a, b)
    assert key == "2x960x32x32|fp16|nhwc"
    assert preferred_backend("cat_channels", key, table={}) == "eager"
    table = {f"cat_channels|{key}": {"triton": 0.004, "eager": 0.009}}
    assert preferred_backend("cat_channels", key, table=table) == "triton"


@settings(max_examples=12, deadline=None)
@given(
    batch=st.integers(1, 2),
    channels_a=st.integers(2, 70),
    channels_b=st.integers(2, 70),
    height=st.integers(1, 6),
    width=st.integers(2, 6),
)
def test_random_shapes(batch, channels_a, channels_b, height, width):
    from tests.ops.helpers import INTERPRET

    if not (INTERPRET or torch.cuda.is_available()):
        pytest.skip("triton kernels need a GPU or TRITON_INTERPRET=1")
    with use_backend("triton"):
        check(
            nhwc((batch, channels_a, height, width), torch.float16),
            nhwc((batch, channels_b, height, width), torch.float16),
        )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "dims",
    [(2, 1280, 1280, 8, 8), (2, 1280, 640, 32, 32), (2, 640, 320, 64, 64), (2, 3, 5, 7, 9)],
    ids=["sd15-8x8", "sd15-32x32", "sd15-64x64", "odd"],
)
def test_sd_shapes_on_gpu(monkeypatch, dims, dtype):
    """Bit-exact at the up blocks' shapes on the GPU, the kernel itself running."""
    counter = CallCounter(monkeypatch, cat_kernels, "cat_channels_forward")
    batch, channels_a, channels_b, height, width = dims
    with use_backend("triton"):
        check(
            nhwc((batch, channels_a, height, width), dtype),
            nhwc((batch, channels_b, height, width), dtype),
        )
    assert counter.calls == 1
