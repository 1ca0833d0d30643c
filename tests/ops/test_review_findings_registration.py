"""Review of the ops' custom-op registrations and of the direct-launch bypass: each test failed
before its fix (fastdiff/ops/backend.py, conv3x3.py, cat_channels.py)."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode

from fastdiff.ops import geglu, group_norm, layer_norm, use_backend
from tests.ops.helpers import needs_triton

conv3x3_module = importlib.import_module("fastdiff.ops.conv3x3")
cat_channels_module = importlib.import_module("fastdiff.ops.cat_channels")


class RecordFunctions(TorchFunctionMode):
    """A torch function mode that records the functions it sees and runs them unchanged."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_torch_function_modes_see_the_custom_op(triton_backend):
    """``may_launch_directly`` probed dispatch modes but not torch function modes, so a
    TorchFunctionMode (which sees ``fastdiff.group_norm.default`` when the custom op is called)
    saw nothing of a triton-backend group_norm: the launcher ran as a plain Python call."""
    x = torch.randn(2, 8, 3, 3)
    with RecordFunctions() as mode:
        out = group_norm(x, 4)
    assert "fastdiff.group_norm.default" in mode.seen, mode.seen
    assert torch.equal(out, group_norm(x, 4))


FORWARD_AD_CASES = [
    pytest.param(lambda t: group_norm(t, 4), (2, 8, 3, 3), id="group_norm"),
    pytest.param(layer_norm, (3, 16), id="layer_norm"),
    pytest.param(geglu, (3, 16), id="geglu"),
]


@pytest.mark.parametrize(("op", "shape"), FORWARD_AD_CASES)
@pytest.mark.parametrize("mode", ["dual_tensor", "func_jvp"])
def test_forward_mode_ad_keeps_its_tangent(triton_backend, op, shape, mode):
    """``needs_autograd`` looked at ``requires_grad`` only; a forward-AD dual tensor (or
    ``torch.func.jvp``'s input) does not require grad, so the op took the triton kernel, whose
    custom op returns no tangent: forward_ad gave None, jvp a silent all-zero tangent. The
    eager path (what the op now runs) propagates it."""
    primal = torch.randn(shape)
    tangent = torch.randn_like(primal)
    with use_backend("eager"):
        _, expected = torch.func.jvp(op, (primal,), (tangent,))
    if mode == "func_jvp":
        _, got = torch.func.jvp(op, (primal,), (tangent,))
    else:
        with forward_ad.dual_level():
            got = forward_ad.unpack_dual(op(forward_ad.make_dual(primal, tangent))).tangent
    assert got is not None
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def _metadata(tensor: torch.Tensor) -> tuple:
    return tuple(tensor.shape), tensor.dtype, tuple(tensor.stride()), tensor.device.type


@needs_triton
@pytest.mark.parametrize("op_name", ["conv3x3", "cat_channels"])
def test_fake_strides_match_the_kernel_on_one_pixel_maps(op_name):
    """On a 1x1 map the fakes of conv3x3 and cat_channels returned NCHW strides, (N, 1, 1, 1):
    ``new_empty(...).contiguous(memory_format=channels_last)`` is a no-op on a tensor that is
    both layouts, while the launchers allocate channels-last, (N, 1, N, N). The fake must give
    what the kernel gives."""
    x = torch.randn(1, 4, 1, 1)
    if op_name == "conv3x3":
        custom_op = conv3x3_module.conv3x3_triton
        args = (x, torch.randn(6, 4, 3, 3), torch.randn(6))
    else:
        custom_op = cat_channels_module.cat_channels_triton
        args = (x, torch.randn(1, 3, 1, 1))
    real = custom_op(*args)
    with FakeTensorMode() as fake_mode:
        fake = custom_op(*(fake_mode.from_tensor(arg) for arg in args))
    assert _metadata(fake) == _metadata(real)
