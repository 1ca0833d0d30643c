"""The split-reduction 3x3 convolution (conv3x3) against its fp32 reference (tolerance rule in
helpers.py), its fallbacks, its split of the reduction, and the ResNet blocks that call it."""

from __future__ import annotations

import fastdiff.kernels.conv3x3 as conv3x3_kernels
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdiff import ops
from fastdiff.ops import conv3x3, conv3x3_reference, use_backend
from fastdiff.ops.autoselect import conv3x3_key, preferred_backend
from fastdiff.ops.conv3x3 import conv3x3_eager, conv3x3_triton
from tests.ops.helpers import DEVICE, CallCounter, assert_within_tolerance, kernel_dtypes

# (batch, in channels, height, width, out channels, bias)
EDGE_CASES = [
    pytest.param((1, 8, 4, 4, 16, True), id="split-reduction"),
    pytest.param((2, 70, 5, 3, 33, False), id="odd-channels-not-square-no-bias"),
    pytest.param((1, 16, 1, 1, 8, True), id="one-pixel-all-padding"),
    pytest.param((2, 24, 1, 9, 12, True), id="one-row-image"),
    pytest.param((2, 8, 16, 16, 8, True), id="many-tiles-one-part"),
    pytest.param((2, 64, 8, 8, 128, True), id="sd-8x8-like"),
]


def make(shape, dtype=torch.float32, weight_layout=torch.contiguous_format):
    batch, channels, height, width, out_channels, bias = shape
    x = torch.randn(batch, channels, height, width, device=DEVICE).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(out_channels, channels, 3, 3, device=DEVICE) / (9 * channels) ** 0.5
    weight = weight.to(dtype).contiguous(memory_format=weight_layout)
    b = torch.randn(out_channels, device=DEVICE).to(dtype) if bias else None
    return x, weight, b


def check(x, weight, bias, what=""):
    out = conv3x3(x, weight, bias)
    assert_within_tolerance(
        out, conv3x3_reference(x, weight, bias), conv3x3_eager(x, weight, bias), what
    )
    return out


@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("shape", EDGE_CASES)
def test_edge_shapes(triton_backend, monkeypatch, shape, dtype):
    counter = CallCounter(monkeypatch, conv3x3_kernels, "conv3x3_forward")
    out = check(*make(shape, dtype), what=str(shape))
    assert out.shape == (shape[0], shape[4], shape[2], shape[3])
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert counter.calls == 1


@pytest.mark.parametrize("programs", [1, 3, 1000])
def test_every_split_of_the_reduction_gives_the_same_result(triton_backend, monkeypatch, programs):
    """One part (the first kernel writes the output), a few, and one column block a part."""
    monkeypatch.setattr(conv3x3_kernels, "programs_available", lambda device: programs)
    launched = []
    launch = conv3x3_kernels.launch

    def spy(kernel, grid, *args, **kwargs):
        launched.append((kernel.fn.__name__, grid))
        return launch(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(conv3x3_kernels, "launch", spy)
    check(*make((1, 40, 3, 5, 24, True)), what=f"{programs} programs")
    # fp32 tiles of 64 x 32: one tile; 9 taps x 2 channel blocks of 32 = 18 column blocks
    parts = {1: 1, 3: 3, 1000: 18}[programs]
    assert launched[0] == ("conv3x3_kernel", (1, 1, parts))
    assert [name for name, _ in launched[1:]] == ([] if parts == 1 else ["conv3x3_sum_kernel"])


def test_split_count():
    assert conv3x3_kernels.split_count(tiles=10, blocks=180, programs=132) == 13
    assert conv3x3_kernels.split_count(tiles=40, blocks=180, programs=132) == 3
    assert conv3x3_kernels.split_count(tiles=200, blocks=180, programs=132) == 1
    assert conv3x3_kernels.split_count(tiles=1, blocks=18, programs=1000) == 18
    assert conv3x3_kernels.split_count(tiles=1, blocks=18, programs=4) == 4  # 5, 5, 5, 3 blocks


def test_weights_of_any_layout_are_read_in_place(triton_backend, monkeypatch):
    counter = CallCounter(monkeypatch, conv3x3_kernels, "conv3x3_forward")
    for layout in (torch.contiguous_format, torch.channels_last):
        check(*make((2, 12, 4, 4, 10, True), weight_layout=layout), what=str(layout))
    assert counter.calls == 2


def test_a_weight_without_output_channels_raises_as_pytorch_does(triton_backend):
    x, _, _ = make((1, 4, 3, 3, 1, False))
    with pytest.raises(RuntimeError, match="expected weight to be at least 1"):
        conv3x3(x, torch.randn(0, 4, 3, 3, device=DEVICE))


@pytest.mark.parametrize("case", ["nchw-input", "too-many-pixels", "strided-bias", "fp64"])
def test_inputs_the_kernel_does_not_take_run_pytorchs(triton_backend, monkeypatch, case):
    counter = CallCounter(monkeypatch, conv3x3_kernels, "conv3x3_forward")
    x, weight, bias = make((1, 4, 4, 4, 6, True))
    if case == "nchw-input":
        x = x.contiguous()
    elif case == "too-many-pixels":
        side = int(conv3x3_kernels.MAX_ROWS**0.5) + 1
        x, weight, bias = make((1, 4, side, side, 6, True))
    elif case == "strided-bias":
        bias = torch.randn(12, device=DEVICE)[::2]
    else:
        x, weight, bias = x.double(), weight.double(), bias.double()
    torch.testing.assert_close(conv3x3(x, weight, bias), conv3x3_eager(x, weight, bias))
    assert counter.calls == 0


@pytest.mark.parametrize(
    "x_shape, weight_shape, bias_shape, match",
    [
        ((1, 4, 5, 5), (6, 4, 1, 1), None, r"weight \(N, C, 3, 3\)"),
        ((4, 5, 5), (6, 4, 3, 3), None, r"x \(B, C, H, W\)"),
        ((1, 4, 5, 5), (6, 3, 3, 3), None, "takes 3 input channels"),
        ((1, 4, 5, 5), (6, 4, 3, 3), (5,), r"bias has shape \(5,\), expected \(6,\)"),
    ],
)
def test_bad_shapes_raise(x_shape, weight_shape, bias_shape, match):
    bias = None if bias_shape is None else torch.randn(bias_shape)
    with pytest.raises(ValueError, match=match):
        conv3x3(torch.randn(x_shape), torch.randn(weight_shape), bias)


@settings(max_examples=6, deadline=None)
@given(
    batch=st.integers(1, 2),
    channels=st.integers(1, 40),
    height=st.integers(1, 7),
    width=st.integers(1, 7),
    out_channels=st.integers(1, 40),
    bias=st.booleans(),
)
def test_random_shapes_property(batch, channels, height, width, out_channels, bias):
    shape = (batch, channels, height, width, out_channels, bias)
    with use_backend("triton"):
        check(*make(shape), what=str(shape))


test_random_shapes_property = pytest.mark.usefixtures("triton_backend")(test_random_shapes_property)


def test_fake_kernel_matches_real_output(triton_backend):
    x, weight, bias = make((1, 8, 3, 3, 6, True))
    torch.library.opcheck(
        conv3x3_triton, (x, weight, bias), test_utils=("test_schema", "test_faketensor")
    )


def test_autocast_and_gradients_run_pytorchs(triton_backend, monkeypatch):
    counter = CallCounter(monkeypatch, conv3x3_kernels, "conv3x3_forward")
    x, weight, bias = make((1, 8, 4, 4, 6, True))
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = conv3x3(x, weight, bias)
    assert out.dtype == torch.bfloat16
    weight.requires_grad_(True)
    conv3x3(x, weight, bias).sum().backward()
    assert weight.grad is not None and counter.calls == 0


def test_auto_runs_the_kernel_only_where_it_was_timed_faster():
    x = torch.empty(2, 1280, 8, 8, dtype=torch.float16).contiguous(
        memory_format=torch.channels_last
    )
    key = conv3x3_key(x, torch.empty(1280, 1280, 3, 3))
    assert key == "2x1280x8x8|fp16|nhwc|out1280"
    assert preferred_backend("conv3x3", key, table={}) == "eager"
    faster = {f"conv3x3|{key}": {"triton": 0.012, "eager": 0.023}}
    assert preferred_backend("conv3x3", key, table=faster) == "triton"


@pytest.mark.parametrize("fold", [False, True], ids=["plain", "folded"])
def test_resnet_blocks_run_their_3x3_convolutions_through_the_op(monkeypatch, fold):
    """conv1 and conv2 of a ResNet block go through ops.conv3x3 (whose eager path is PyTorch's
    convolution: the same numbers), folded or not; a hooked conv is called as it is."""
    from fastdiff.models.resnet import ResnetBlock2D

    block = ResnetBlock2D(8, 16, 12, groups=4, eps=1e-5).eval()
    block.fold_biases = fold
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    temb = torch.randn(2, 12)
    calls = CallCounter(monkeypatch, ops, "conv3x3")
    with torch.no_grad():
        out = block(x, temb)
        assert calls.calls == 2
        block.conv2.register_forward_hook(lambda module, inputs, output: output * 2)
        hooked = block(x, temb)
    assert calls.calls == 3  # conv1 only: the hooked conv2 ran as a layer
    assert not torch.allclose(out, hooked)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "shape",
    [(2, 1280, 8, 8, 1280, True), (2, 2560, 8, 8, 1280, True), (2, 1280, 16, 16, 1280, True)],
    ids=lambda shape: "x".join(map(str, shape[:4])) + f"->{shape[4]}",
)
def test_sd_shapes_on_gpu(monkeypatch, shape, dtype):
    counter = CallCounter(monkeypatch, conv3x3_kernels, "conv3x3_forward")
    with use_backend("triton"):
        check(*make(shape, dtype), what=str(shape))
    assert counter.calls == 1  # the kernel ran, not a silent fallback
