"""Inputs at the edge of what the kernels support, on the triton backend: each either runs a
kernel that returns what the fp32 reference returns (values, non-finite values included, shape,
dtype and memory format) or goes to the eager path, never to a different result."""

from __future__ import annotations

import fastdiff.kernels.conv3x3 as conv3x3_kernels
import fastdiff.kernels.group_norm as group_norm_kernels
import pytest
import torch

from fastdiff.ops import (
    attention,
    attention_reference,
    conv3x3,
    conv3x3_reference,
    group_norm,
    group_norm_reference,
    sampler_step,
)
from tests.ops.helpers import DEVICE, CallCounter, sampler_step_reference


@pytest.mark.parametrize(
    "path, shape, groups",
    [
        ("single-pass", (2, 8, 3, 5), 4),
        ("split", (1, 8, 3, 5), 2),
        ("split2", (1, 8, 3, 5), 2),
    ],
)
def test_group_norm_of_a_group_holding_an_inf_is_nan(
    triton_backend, monkeypatch, path, shape, groups
):
    """The reference's variance of a group holding an inf is NaN, so is its whole output; the
    kernels clamped that NaN variance to 0 (a NaN-dropping max) and returned infs instead."""
    if path != "single-pass":
        monkeypatch.setattr(group_norm_kernels, "SINGLE_PASS_MAX_GROUP", 0)
    if path == "split2":
        monkeypatch.setattr(group_norm_kernels, "SPLIT_LAUNCHES", 2)
    x = torch.randn(shape, device=DEVICE)
    x[0, 1, 1, 2] = float("inf")  # not a channel's first element (the kernels' shift)
    x[-1, -1, 2, 3] = float("-inf")
    weight = torch.randn(shape[1], device=DEVICE)
    bias = torch.randn(shape[1], device=DEVICE)
    for silu in (False, True):
        out = group_norm(x, groups, weight, bias, silu=silu)
        want = group_norm_reference(x, groups, weight, bias, silu=silu)
        torch.testing.assert_close(out, want, equal_nan=True)


def test_conv3x3_keeps_pytorchs_layout_for_a_one_channel_map(triton_backend):
    """An NCHW map of one channel is also channels-last contiguous: PyTorch's convolution (and
    the reference) return NCHW for it, and so must the op, whichever backend runs it."""
    x = torch.randn(2, 1, 4, 3, device=DEVICE)
    weight = torch.randn(6, 1, 3, 3, device=DEVICE)
    bias = torch.randn(6, device=DEVICE)
    out = conv3x3(x, weight, bias)
    want = conv3x3_reference(x, weight, bias)
    torch.testing.assert_close(out, want)
    assert out.stride() == want.stride()
    assert out.view(2, 6, 12).shape == (2, 6, 12)  # what code written for NCHW does next


def test_conv3x3_still_runs_the_kernel_on_strictly_channels_last_maps(triton_backend, monkeypatch):
    counter = CallCounter(monkeypatch, conv3x3_kernels, "conv3x3_forward")
    x = torch.randn(2, 3, 4, 3, device=DEVICE).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(6, 3, 3, 3, device=DEVICE)
    out = conv3x3(x, weight)
    want = conv3x3_reference(x, weight)
    torch.testing.assert_close(out, want)
    assert out.stride() == want.stride() and counter.calls == 1


@pytest.mark.parametrize("state_dtype", [torch.float64, torch.float32])
def test_sampler_step_keeps_the_state_shape_whatever_the_guidance_tensor_shape(
    triton_backend, state_dtype
):
    """A one-element guidance tensor of more dimensions than the state: the kernel reads its
    value, the eager path (fp64 states) broadcast the state to the guidance's dimensions."""
    x = torch.randn(3, device=DEVICE, dtype=state_dtype)
    model_output = torch.randn(6, device=DEVICE, dtype=state_dtype)
    row = torch.randn(10, device=DEVICE)
    row[5:] = 0
    guidance = torch.tensor([[2.5]], device=DEVICE)
    x_next, x0 = sampler_step(x, model_output, row, guidance_scale=guidance)
    want = sampler_step_reference(row.tolist(), x, model_output, 2.5, None, None, state_dtype)
    assert x_next.shape == x0.shape == x.shape
    torch.testing.assert_close((x_next, x0), want)


def reserved_buffer(elements: int) -> torch.Tensor:
    """fp16 memory for a view whose offsets pass 2**31 elements: 8 GiB reserved, of which the
    tests write and the kernels read a few pages (on CPU the rest is never committed)."""
    try:
        return torch.empty(elements, dtype=torch.float16, device=DEVICE)
    except RuntimeError:  # the system would not reserve that much (out of memory included)
        pytest.skip(f"cannot reserve {elements} fp16 elements")


# A view's third row (channel) at 2 * (2**30 + 16) elements from its start: an int32 product
# wraps to 2**31 + 32 - 2**32, the start 2**31 elements into the buffer puts that in the buffer.
WIDE_STRIDE = 2**30 + 16
VIEW_START = 2**31
WRAPPED = VIEW_START + 2 * WIDE_STRIDE - 2**32  # where the wrapped offset of row 2 points


def wide_view(buffer: torch.Tensor, shape: tuple, stride_dim: int, columns: int):
    """A view of ``shape`` starting at VIEW_START whose dim ``stride_dim`` (size 3) steps
    WIDE_STRIDE elements, with random values; the buffer holds 1000 where the wrapped offset
    of its last row points."""
    stride = [0] * len(shape)
    stride[stride_dim] = WIDE_STRIDE
    stride[-1] = 1
    view = buffer.as_strided(shape, stride, storage_offset=VIEW_START)
    rows = torch.randn(3, columns, device=DEVICE).half()
    for row in range(3):
        start = VIEW_START + row * WIDE_STRIDE
        buffer[start : start + columns] = rows[row]
    buffer[WRAPPED : WRAPPED + columns] = 1000.0
    return view


def test_group_norm_of_a_view_wider_than_int32_offsets(triton_backend):
    """Three channels WIDE_STRIDE apart: six elements, so the per-sample size check passed it,
    but the kernels' int32 channel offset of the third wrapped around and read other memory."""
    buffer = reserved_buffer(VIEW_START + 2 * WIDE_STRIDE + 16)
    x = wide_view(buffer, (1, 3, 1, 2), 1, 2)
    out = group_norm(x, 1)
    torch.testing.assert_close(out, group_norm_reference(x, 1, None, None))


def test_attention_of_a_query_view_wider_than_int32_offsets(triton_backend):
    """Three query rows WIDE_STRIDE apart (a slice of a projection past 2**31 elements): the
    kernel's int32 row offset of the third wrapped around and read other memory."""
    buffer = reserved_buffer(VIEW_START + 2 * WIDE_STRIDE + 16)
    q = wide_view(buffer, (1, 1, 3, 16), 2, 16)
    k = torch.randn(1, 1, 5, 16, device=DEVICE).half()
    v = torch.randn(1, 1, 5, 16, device=DEVICE).half()
    out = attention(q, k, v)
    torch.testing.assert_close(out, attention_reference(q, k, v), atol=2e-3, rtol=2e-3)
