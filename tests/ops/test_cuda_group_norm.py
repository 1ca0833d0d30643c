"""CUDA C++ kernels (csrc/) against the same references and tolerance rule as the Triton kernels.

GPU only. Without the extension these tests skip with the loader's reason, unless
FASTDIFF_REQUIRE_CUDA_EXTENSION=1 (set by benchmarks/gpu_check_cuda.sh): then they fail, so a
broken build cannot pass as skipped.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import fastdiff.ops.cuda_extension as cuda_extension
from fastdiff.ops import group_norm, group_norm_reference, use_backend
from fastdiff.ops.cuda_support import group_norm_launch_plan
from fastdiff.ops.group_norm import group_norm_eager
from tests.ops.cuda_errors import assert_errors, run_error_cases
from tests.ops.helpers import FLOOR, assert_within_tolerance, kernel_dtypes

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def extension():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not cuda_extension.available():
        message = f"CUDA extension unavailable: {cuda_extension.unavailable_reason()}"
        if os.environ.get("FASTDIFF_REQUIRE_CUDA_EXTENSION") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return cuda_extension


SHAPES = [
    pytest.param((2, 640, 32, 32), 32, id="sd-640x32x32"),
    pytest.param((2, 1280, 16, 16), 32, id="sd-1280x16x16"),
    pytest.param((2, 1280, 8, 8), 32, id="sd-1280x8x8"),
    pytest.param((2, 960, 16, 16), 32, id="cg30-vec2"),
    pytest.param((1, 15, 5, 7), 5, id="odd-channels"),
    pytest.param((2, 6, 4, 4), 1, id="groups-1"),
    pytest.param((2, 6, 4, 4), 6, id="groups-C"),
    pytest.param((1, 8, 7, 9), 4, id="hw-not-pow2"),
    pytest.param((3, 64, 1, 1), 32, id="one-pixel"),
]


def make_inputs(shape, dtype, channels_last, affine=True, scale=2.0, offset=0.0):
    x = (torch.randn(shape, device="cuda") * scale + offset).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = torch.randn(shape[1], device="cuda").to(dtype) if affine else None
    bias = torch.randn(shape[1], device="cuda").to(dtype) if affine else None
    return x, weight, bias


def check_group_norm(x, groups, weight, bias, silu, eps=1e-5, what=""):
    assert cuda_extension.supports_group_norm(x, groups, weight, bias, eps, silu), what
    out = cuda_extension.group_norm(x, groups, weight, bias, eps, silu)
    reference = group_norm_reference(x, groups, weight, bias, eps, silu)
    eager = group_norm_eager(x, groups, weight, bias, eps, silu)
    assert_within_tolerance(out, reference, eager, what)
    assert out.stride() == x.stride(), f"{what}: output must keep the input's memory format"


@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize(("shape", "groups"), SHAPES)
def test_group_norm_edge_shapes(shape, groups, channels_last, dtype):
    x, weight, bias = make_inputs(shape, dtype, channels_last)
    if dtype == torch.float32 and shape[1] // groups * x[0, 0].numel() > 16384:
        # fp32 fits half as many elements per thread as fp16: 1024 threads x 16.
        assert not cuda_extension.supports_group_norm(x, groups, weight, bias)
        return
    for silu in (False, True):
        check_group_norm(x, groups, weight, bias, silu, what=f"{shape} g={groups} silu={silu}")


@pytest.mark.parametrize("shape", [(2, 8, 11), (4, 8), (1, 4, 3, 3, 3)], ids=["3d", "2d", "5d"])
def test_group_norm_other_ranks(shape):
    x, weight, bias = make_inputs(shape, torch.float16, channels_last=False)
    check_group_norm(x, 2 if shape[1] % 2 == 0 else 1, weight, bias, True, what=str(shape))


def test_group_norm_large_mean():
    # Statistics around a pivot, then the centred second moment: accurate where E[x^2] - E[x]^2
    # in fp32 loses about 1e-3 of a unit variance under a mean of 300. Judged in float64 against
    # a float64 GroupNorm: in fp32 the eager result is the reference (group_norm_reference computes
    # in fp32), and both round the mean of 300 to fp32 (about 1.5e-5, times the weight).
    x, weight, bias = make_inputs((2, 64, 16, 16), torch.float32, True, scale=1.0, offset=300.0)
    out = cuda_extension.group_norm(x, 8, weight, bias)
    exact = F.group_norm(x.double(), 8, weight.double(), bias.double())
    error = (out.double() - exact).abs().max().item()
    eager_error = (group_norm_eager(x, 8, weight, bias).double() - exact).abs().max().item()
    floor = FLOOR[torch.float32] * exact.abs().max().item()
    assert error <= 2 * eager_error + floor, (error, eager_error, floor)


def test_group_norm_without_affine_and_fp32_params_on_fp16():
    x, _, _ = make_inputs((2, 320, 16, 16), torch.float16, True, affine=False)
    check_group_norm(x, 32, None, None, True, what="no affine")
    check_group_norm(x, 32, torch.randn(320, device="cuda").half(), None, False, what="no bias")
    # fp32 parameters on fp16 input: eager PyTorch on CUDA wants one dtype, so its error is
    # measured with the parameters rounded to fp16 (what an fp16 model holds).
    weight = torch.randn(320, device="cuda")
    bias = torch.randn(320, device="cuda")
    assert cuda_extension.supports_group_norm(x, 32, weight, bias)
    out = cuda_extension.group_norm(x, 32, weight, bias, 1e-5, True)
    reference = group_norm_reference(x, 32, weight, bias, 1e-5, True)
    eager = group_norm_eager(x, 32, weight.half(), bias.half(), 1e-5, True)
    assert_within_tolerance(out, reference, eager, "fp32 weight on fp16 x")


def test_group_norm_misaligned_input_uses_the_scalar_path():
    storage = torch.randn(2 * 640 * 8 * 8 + 1, device="cuda").half()
    x = storage[1:].view(2, 640, 8, 8)  # 2 bytes past a 16-byte boundary
    assert group_norm_launch_plan(x, 32).vec == 1
    weight = torch.randn(640, device="cuda").half()
    check_group_norm(x, 32, weight, None, True, what="misaligned")


def test_group_norm_empty_batch():
    x = torch.randn(0, 32, 4, 4, device="cuda").half()
    out = cuda_extension.group_norm(x, 8)
    assert out.shape == x.shape


def test_python_support_rule_matches_the_launcher():
    cases = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for shape, groups in [
            ((2, 640, 32, 32), 32),
            ((2, 1280, 32, 32), 32),
            ((2, 960, 32, 32), 32),
            ((2, 320, 64, 64), 32),
            ((1, 15, 5, 7), 5),
            ((2, 2048, 2, 2), 1),
            ((2, 1920, 16, 16), 32),
        ]:
            for channels_last in (False, True):
                x = torch.empty(shape, device="cuda", dtype=dtype)
                if channels_last:
                    x = x.to(memory_format=torch.channels_last)
                cases.append((x, groups))
    storage = torch.empty(2 * 640 * 8 * 8 + 1, device="cuda", dtype=torch.float16)
    cases.append((storage[1:].view(2, 640, 8, 8), 32))
    for x, groups in cases:
        native = list(torch.ops.fastdiff_cuda.group_norm_plan(x, groups))
        mirrored = list(group_norm_launch_plan(x, groups))
        assert [int(v) for v in mirrored] == native, f"{tuple(x.shape)} {x.dtype} {x.stride()}"


def test_group_norm_too_large_group_is_refused_and_dispatch_falls_back(monkeypatch):
    x, weight, bias = make_inputs((2, 1280, 32, 32), torch.float16, False)
    assert not cuda_extension.supports_group_norm(x, 32, weight, bias)
    calls = []
    monkeypatch.setattr(
        cuda_extension, "group_norm", lambda *a: calls.append(a) or pytest.fail("not supported")
    )
    with use_backend("cuda"):
        out = group_norm(x, 32, weight, bias, 1e-5, True)
    assert not calls
    reference = group_norm_reference(x, 32, weight, bias, 1e-5, True)
    assert_within_tolerance(out, reference, group_norm_eager(x, 32, weight, bias, 1e-5, True))


def test_backend_cuda_routes_group_norm_to_the_extension(monkeypatch):
    original = cuda_extension.group_norm
    calls = []

    def counting(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(cuda_extension, "group_norm", counting)
    x, weight, bias = make_inputs((2, 640, 16, 16), torch.float16, True)
    with use_backend("cuda"):
        out = group_norm(x, 32, weight, bias, 1e-5, True)
    assert len(calls) == 1
    reference = group_norm_reference(x, 32, weight, bias, 1e-5, True)
    assert_within_tolerance(out, reference, group_norm_eager(x, 32, weight, bias, 1e-5, True))


ERROR_CASES = """
x = torch.randn(2, 8, 4, 4, device="cuda").half()
weight, bias = torch.randn(8, device="cuda").half(), torch.randn(8, device="cuda").half()
big = torch.randn(2, 1280, 32, 32, device="cuda").half()
op = cuda_extension.group_norm
check("cpu", lambda: op(x.cpu(), 4, weight.cpu(), bias.cpu()))
check("double", lambda: op(x.double(), 4, weight, bias))
check("groups", lambda: op(x, 3, weight, bias))
check("weight shape", lambda: op(x, 4, weight[:4], bias))
check("bias device", lambda: op(x, 4, weight, bias.cpu()))
check("layout", lambda: op(x.transpose(2, 3), 4, weight, bias))
check("param dtypes", lambda: op(x, 4, weight.float(), bias))
check("too large", lambda: op(big, 32))
"""


def test_group_norm_argument_errors_name_the_argument():
    assert_errors(
        run_error_cases(ERROR_CASES),
        {
            "cpu": ("RuntimeError", "x must be a CUDA tensor, got device cpu"),
            "double": ("RuntimeError", "x has dtype Double; allowed: float32, float16, bfloat16"),
            "groups": ("ValueError", "num_groups=3 must divide the 8 channels of x"),
            "weight shape": ("ValueError", "weight has shape [4], expected (8,)"),
            "bias device": ("RuntimeError", "bias must be a CUDA tensor, got device cpu"),
            "layout": ("RuntimeError", "x must be contiguous (NCHW) or channels_last (NHWC)"),
            "param dtypes": (
                "RuntimeError",
                "weight (Float) and bias (Half) must have the same dtype",
            ),
            "too large": ("RuntimeError", "does not fit the register-resident kernel"),
        },
    )
