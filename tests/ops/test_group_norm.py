"""GroupNorm(+SiLU) Triton kernel against the fp32 reference (tolerance rule in helpers.py)."""

from __future__ import annotations

import importlib
from unittest import mock

import fastdiff.kernels.group_norm as group_norm_kernels
import fastdiff.kernels.group_norm_split as group_norm_split_kernels
import fastdiff.kernels.group_norm_two_launch as group_norm_two_launch
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fastdiff.ops import group_norm, group_norm_reference, use_backend
from fastdiff.ops.group_norm import (
    MAX_CHANNELS_PER_GROUP,
    group_norm_eager,
    group_norm_triton,
    group_norm_triton_supports,
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
    pytest.param((2, 32, 8, 8), 8, id="sd-like"),
    pytest.param((1, 15, 5, 7), 5, id="odd-channels"),
    pytest.param((2, 6, 4, 4), 1, id="groups-1"),
    pytest.param((2, 6, 4, 4), 6, id="groups-C"),
    pytest.param((1, 8, 7, 9), 4, id="hw-not-pow2"),
    pytest.param((1, 4, 40, 40), 2, id="several-spatial-tiles"),
    pytest.param((1, 4, 64, 64), 1, id="single-pass-two-tiles"),
    pytest.param((2, 8, 11), 2, id="3d-input"),
    pytest.param((4, 8), 4, id="2d-input"),
    pytest.param((1, 4, 3, 3, 3), 2, id="5d-input"),
]

CHANNELS_LAST_CASES = [
    pytest.param((2, 32, 8, 8), 8, id="sd-like"),
    pytest.param((1, 15, 5, 7), 5, id="odd-channels"),
    pytest.param((2, 6, 3, 5), 1, id="groups-1"),
    pytest.param((2, 6, 4, 4), 6, id="groups-C"),
    pytest.param((1, 160, 4, 4), 32, id="wide-channels"),
]

# A kernel that fell back after failing on first use would hide the failure: fail instead.
pytestmark = pytest.mark.filterwarnings("error:.*failed on first use:RuntimeWarning")


@pytest.fixture(params=["default", "split", "split2"])
def kernel_path(request, monkeypatch):
    """Run a test through every launch path: the default choice (the single-pass kernel for the
    small groups of the CPU tests) and the split reduction (forced) in three launches and, where
    it takes the shape, in two."""
    if request.param in ("split", "split2"):
        monkeypatch.setattr(group_norm_kernels, "SINGLE_PASS_MAX_GROUP", 0)
    if request.param == "split2":
        monkeypatch.setattr(group_norm_kernels, "SPLIT_LAUNCHES", 2)
    return request.param


def make_inputs(shape, dtype, channels_last=False, affine=True, offset=0.0):
    x = (torch.randn(shape, device=DEVICE) * 2 + offset).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    channels = shape[1]
    weight = torch.randn(channels, device=DEVICE).to(dtype) if affine else None
    bias = torch.randn(channels, device=DEVICE).to(dtype) if affine else None
    return x, weight, bias


def check(x, groups, weight, bias, silu, eps=1e-5, what="", offset=None):
    out = group_norm(x, groups, weight, bias, eps, silu, offset=offset)
    reference = group_norm_reference(x, groups, weight, bias, eps, silu, offset=offset)
    eager = group_norm_eager(x, groups, weight, bias, eps, silu, offset=offset)
    assert_within_tolerance(out, reference, eager, what)
    assert out.stride() == x.stride(), "output must keep the input's memory format"
    return out


@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize(("shape", "groups"), EDGE_CASES)
def test_edge_shapes_nchw(triton_backend, kernel_path, monkeypatch, shape, groups, dtype):
    counter = CallCounter(monkeypatch, group_norm_kernels, "group_norm_forward")
    x, weight, bias = make_inputs(shape, dtype)
    check(x, groups, weight, bias, silu=True, what=f"{shape} g={groups}")
    assert counter.calls == 1


@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize(("shape", "groups"), CHANNELS_LAST_CASES)
def test_channels_last(triton_backend, kernel_path, monkeypatch, shape, groups, dtype):
    counter = CallCounter(monkeypatch, group_norm_kernels, "group_norm_forward")
    x, weight, bias = make_inputs(shape, dtype, channels_last=True)
    out = check(x, groups, weight, bias, silu=True, what=f"NHWC {shape}")
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert counter.calls == 1


def make_offset(x, per_sample=True, dtype=None, spread=3.0, centre=0.0):
    """An (N, C) or (C,) offset of channel-varying size (a time embedding plus a conv bias)."""
    shape = (x.shape[0], x.shape[1]) if per_sample else (x.shape[1],)
    offset = torch.randn(shape, device=x.device) * spread + centre
    return offset.to(dtype or x.dtype)


@pytest.mark.parametrize("per_sample", [True, False], ids=["offset-NC", "offset-C"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize(
    ("shape", "groups"),
    [*CHANNELS_LAST_CASES, pytest.param((1, 4, 40, 40), 2, id="several-spatial-tiles")],
)
def test_offset_is_added_before_normalizing(
    triton_backend, kernel_path, monkeypatch, shape, groups, dtype, channels_last, per_sample
):
    """group_norm(x, offset=t) against the references of x + t, on both launch paths."""
    counter = CallCounter(monkeypatch, group_norm_kernels, "group_norm_forward")
    x, weight, bias = make_inputs(shape, dtype, channels_last=channels_last)
    offset = make_offset(x, per_sample)
    what = f"{shape} g={groups} offset {tuple(offset.shape)}"
    out = check(x, groups, weight, bias, silu=True, what=what, offset=offset)
    assert counter.calls == 1
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_offset_of_another_dtype_and_strides(triton_backend, kernel_path, monkeypatch):
    """An fp32 offset with fp16 x, and an offset that is a strided view (a column slice)."""
    counter = CallCounter(monkeypatch, group_norm_kernels, "group_norm_forward")
    x, weight, bias = make_inputs((2, 12, 5, 6), torch.float16, channels_last=True)
    wide = torch.randn(2, 30, device=DEVICE) * 3
    for offset in (make_offset(x, dtype=torch.float32), wide[:, 3:27:2], wide[1, 0:24:2]):
        check(x, 4, weight, bias, silu=True, what=f"offset {offset.stride()}", offset=offset)
    assert counter.calls == 3


def test_offset_calls_skip_the_cuda_extension(triton_backend, monkeypatch):
    """The extension has no offset: where the backend picks it, calls with an offset take the
    Triton kernels (calls without one still go to the extension)."""
    group_norm_op = importlib.import_module("fastdiff.ops.group_norm")  # the module, not the op
    counter = CallCounter(monkeypatch, group_norm_kernels, "group_norm_forward")
    native_calls = []

    def native(*args):
        native_calls.append(args)
        return group_norm_eager(*args)

    monkeypatch.setattr(group_norm_op, "select_backend", lambda *args: "cuda")
    monkeypatch.setattr(group_norm_op, "cuda_extension_op", lambda op, *args: native)
    x, weight, bias = make_inputs((2, 8, 4, 4), torch.float32)
    check(x, 4, weight, bias, silu=True, offset=make_offset(x))
    assert (counter.calls, len(native_calls)) == (1, 0)
    group_norm(x, 4, weight, bias, silu=True)
    assert (counter.calls, len(native_calls)) == (1, 1)


def test_large_offsets_keep_fp32_statistics_accurate(triton_backend, kernel_path):
    # Offsets of about 3000 (and differing by channel) make |mean| >> std, as in the large-mean
    # test: the shift must move with the offset. Measured against a float64 computation.
    x, weight, bias = make_inputs((2, 8, 16, 16), torch.float32)
    offset = make_offset(x, spread=1.0, centre=3000.0)
    out = group_norm(x, 2, weight, bias, offset=offset)
    shifted = x.double() + offset.double()[:, :, None, None]
    truth = torch.nn.functional.group_norm(shifted, 2, weight.double(), bias.double())
    eager = group_norm_eager(x, 2, weight, bias, offset=offset)
    error = (out.double() - truth).abs().max().item()
    eager_error = (eager.double() - truth).abs().max().item()
    assert error <= 2 * eager_error + 1e-5 * truth.abs().max().item()


@pytest.mark.parametrize(
    "offset,message",
    [
        (torch.zeros(2, 4), r"offset has shape \(2, 4\), expected \(2, 8\) .* or \(8,\)"),
        (torch.zeros(1, 8), r"offset has shape \(1, 8\)"),
        (torch.zeros(2, 8, 1, 1), r"offset has shape \(2, 8, 1, 1\)"),
        (torch.zeros(8, dtype=torch.long), "offset must be a floating tensor, got torch.int64"),
        (torch.zeros(8, device="meta"), "offset is on meta, x on cpu"),
        (3.0, "offset has shape 3.0"),
    ],
)
def test_bad_offset_raises(offset, message):
    with pytest.raises(ValueError, match=message):
        group_norm(torch.randn(2, 8, 2, 2), 4, offset=offset)


@pytest.mark.parametrize("silu", [False, True], ids=["plain", "silu"])
@pytest.mark.parametrize("affine", [False, True], ids=["no-affine", "affine"])
def test_affine_and_silu_variants(triton_backend, kernel_path, affine, silu):
    x, weight, bias = make_inputs((2, 12, 5, 6), torch.float32, affine=affine)
    check(x, 3, weight, bias, silu=silu, eps=1e-6)


def test_weight_without_bias(triton_backend, kernel_path):
    x, weight, _ = make_inputs((2, 12, 5, 6), torch.float32)
    check(x, 4, weight, None, silu=False)


def test_large_mean_keeps_fp32_statistics_accurate(triton_backend, kernel_path):
    # |mean| >> std: a naive E[x^2] - E[x]^2 in fp32 loses the variance; shifted sums must not.
    # Here the fp32 reference itself rounds, so measure both against a float64 computation.
    x, weight, bias = make_inputs((2, 8, 16, 16), torch.float32, offset=3000.0)
    out = group_norm(x, 2, weight, bias)
    truth = torch.nn.functional.group_norm(x.double(), 2, weight.double(), bias.double())
    eager = group_norm_eager(x, 2, weight, bias)
    error = (out.double() - truth).abs().max().item()
    eager_error = (eager.double() - truth).abs().max().item()
    assert error <= 2 * eager_error + 1e-5 * truth.abs().max().item()


@pytest.mark.parametrize("silu", [False, True])
def test_reference_and_eager_are_accurate_in_channels_last_on_cpu(silu):
    """PyTorch's CPU GroupNorm for channels-last inputs loses the variance to cancellation
    (fp32, mean 1000: an error of 3): the reference, every kernel's oracle, and the CPU eager
    path compute in NCHW and return the input's layout."""
    x, weight, bias = make_inputs((2, 6, 32, 32), torch.float32, offset=1000.0)
    x = x.cpu().to(memory_format=torch.channels_last)
    weight, bias = weight.cpu(), bias.cpu()
    truth = F.group_norm(x.double().contiguous(), 3, weight.double(), bias.double())
    truth = F.silu(truth) if silu else truth
    for out in (
        group_norm_reference(x, 3, weight, bias, silu=silu),
        group_norm_eager(x, 3, weight, bias, silu=silu),
    ):
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert (out.double() - truth).abs().max().item() < 1e-3
    volume = x[:, :, None].expand(2, 6, 2, 32, 32).contiguous(memory_format=torch.channels_last_3d)
    for out in (
        group_norm_reference(volume, 3, weight, bias, silu=silu),
        group_norm_eager(volume, 3, weight, bias, silu=silu),
    ):
        assert out.is_contiguous(memory_format=torch.channels_last_3d)  # as F.group_norm's


@settings(max_examples=20, deadline=None)
@given(
    batch=st.integers(1, 3),
    groups=st.integers(1, 4),
    channels_per_group=st.integers(1, 5),
    height=st.integers(1, 9),
    width=st.integers(1, 9),
    channels_last=st.booleans(),
    silu=st.booleans(),
    offset=st.sampled_from([None, "per-sample", "per-channel"]),
    launches=st.sampled_from([1, 3, 2]),  # single-pass, split in three launches, in two
)
def test_random_shapes_property(
    batch, groups, channels_per_group, height, width, channels_last, silu, offset, launches
):
    assume(channels_per_group * height * width > 1)  # PyTorch rejects one value per group
    shape = (batch, groups * channels_per_group, height, width)
    x, weight, bias = make_inputs(shape, torch.float32, channels_last=channels_last)
    if offset is not None:
        offset = make_offset(x, per_sample=offset == "per-sample")
    max_group = group_norm_kernels.SINGLE_PASS_MAX_GROUP if launches == 1 else 0
    with (
        use_backend("triton"),
        mock.patch.object(group_norm_kernels, "SINGLE_PASS_MAX_GROUP", max_group),
        mock.patch.object(group_norm_kernels, "SPLIT_LAUNCHES", max(launches, 2)),
    ):
        check(x, groups, weight, bias, silu=silu, what=f"{shape} g={groups}", offset=offset)


test_random_shapes_property = pytest.mark.usefixtures("triton_backend")(test_random_shapes_property)


def test_unsupported_dtype_falls_back_to_eager(triton_backend, monkeypatch):
    counter = CallCounter(monkeypatch, group_norm_kernels, "group_norm_forward")
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64, device=DEVICE)
    out = group_norm(x, 4)
    torch.testing.assert_close(out, group_norm_eager(x, 4, None, None))
    assert counter.calls == 0


@pytest.mark.parametrize(
    "make_view",
    [
        # spatial strides (1, W): permuted
        pytest.param(lambda: torch.randn(2, 8, 5, 6, device=DEVICE).transpose(2, 3), id="permuted"),
        # strides (48, 8, 1) for a (6, 5) plane: rows do not follow each other
        pytest.param(lambda: torch.randn(2, 8, 6, 8, device=DEVICE)[..., :5], id="cropped"),
    ],
)
def test_unflattenable_layout_falls_back_to_eager(triton_backend, monkeypatch, make_view):
    """Spatial dims that no single stride walks (permuted, or a cropped view whose rows have gaps)
    must not reach the kernel (flat_strides is None), and must give the reference's numbers."""
    counter = CallCounter(monkeypatch, group_norm_kernels, "group_norm_forward")
    x = make_view()
    out = group_norm(x, 4, silu=True)
    torch.testing.assert_close(out, group_norm_reference(x, 4, None, None, silu=True))
    torch.testing.assert_close(out, group_norm_eager(x, 4, None, None, silu=True))
    assert counter.calls == 0 and group_norm_kernels.flat_strides(x) is None


def test_default_backend_on_cpu_is_eager(monkeypatch):
    monkeypatch.delenv("FASTDIFF_BACKEND", raising=False)
    counter = CallCounter(monkeypatch, group_norm_kernels, "group_norm_forward")
    group_norm(torch.randn(2, 8, 4, 4), 4)  # even under TRITON_INTERPRET=1: opt-in only
    assert counter.calls == 0


@pytest.mark.gpu
def test_default_backend_on_cuda_is_triton(monkeypatch):
    monkeypatch.delenv("FASTDIFF_BACKEND", raising=False)
    counter = CallCounter(monkeypatch, group_norm_kernels, "group_norm_forward")
    group_norm(torch.randn(2, 8, 4, 4, device="cuda"), 4)
    assert counter.calls == 1


@pytest.mark.parametrize("bad", [3, 0])
def test_bad_group_count_raises(bad):
    with pytest.raises(ValueError, match="num_groups"):
        group_norm(torch.randn(1, 8, 2, 2), bad)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(num_groups=4.0), "num_groups must be an int, got 4.0"),
        (dict(num_groups=True), "num_groups must be an int, got True"),
        (dict(eps=-1.0), "eps must be a finite number >= 0, got -1.0"),  # used to give NaN
        (dict(eps=float("nan")), "eps must be a finite number >= 0, got nan"),
    ],
)
def test_bad_group_count_type_and_eps_raise(kwargs, message):
    x = torch.ones(1, 8, 2, 2)  # zero variance: a negative eps would give NaN
    with pytest.raises(ValueError, match=message):
        group_norm(x, **{"num_groups": 4, **kwargs})


@mixed_float_dtypes
def test_weights_of_another_float_dtype_agree_on_every_backend(x_dtype, param_dtype):
    x = (torch.randn(2, 8, 5, 5) + 100.0).to(DEVICE, x_dtype)  # a mean that fp32 feels
    weight = torch.randn(8, device=DEVICE, dtype=param_dtype)
    bias = torch.randn(8, device=DEVICE, dtype=param_dtype)
    want = F.silu(F.group_norm(x.double(), 4, weight.double(), bias.double())).to(x_dtype)
    check_mixed_float_dtypes(lambda x: group_norm(x, 4, weight, bias, silu=True), x, want)


def test_integer_weights_raise():
    with pytest.raises(ValueError, match="weight must be a floating tensor, got torch.int64"):
        group_norm(torch.randn(1, 8, 2, 2), 4, torch.ones(8, dtype=torch.long))


def test_bad_backend_name_raises(monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", "tensorrt")
    with pytest.raises(ValueError, match="FASTDIFF_BACKEND.*allowed values"):
        group_norm(torch.randn(1, 8, 2, 2), 4)
    with pytest.raises(ValueError, match="allowed values"):
        with use_backend("tensorrt"):
            pass


def test_fake_kernel_matches_real_output(triton_backend):
    x, weight, bias = make_inputs((2, 8, 3, 5), torch.float16, channels_last=True)
    for offset in (None, make_offset(x)):
        torch.library.opcheck(
            group_norm_triton,
            (x, 4, weight, bias, 1e-5, True, offset),
            test_utils=("test_schema", "test_faketensor"),
        )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize(
    "shape",
    [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (2, 1280, 8, 8), (1, 512, 128, 128)],
    ids=lambda shape: "x".join(map(str, shape)),
)
def test_sd_shapes_on_gpu(kernel_path, monkeypatch, shape, channels_last, dtype):
    counter = CallCounter(monkeypatch, group_norm_kernels, "group_norm_forward")
    x, weight, bias = make_inputs(shape, dtype, channels_last=channels_last)
    with use_backend("triton"):
        check(x, 32, weight, bias, silu=True, eps=1e-6, what=f"{shape}")
    assert counter.calls == 1  # the kernel ran, not a silent eager fallback


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "shape",
    [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (2, 1280, 8, 8)],
    ids=lambda shape: "x".join(map(str, shape)),
)
def test_sd_shapes_with_offset_on_gpu(kernel_path, monkeypatch, shape, dtype):
    """The ResNet blocks' norm2 under fold_biases: channels-last, a (B, C) time-embedding offset."""
    counter = CallCounter(monkeypatch, group_norm_kernels, "group_norm_forward")
    x, weight, bias = make_inputs(shape, dtype, channels_last=True)
    offset = make_offset(x)
    with use_backend("triton"):
        check(x, 32, weight, bias, silu=True, eps=1e-5, what=f"{shape}", offset=offset)
    assert counter.calls == 1


def test_inputs_needing_gradients_take_the_differentiable_eager_path(triton_backend, monkeypatch):
    counter = CallCounter(monkeypatch, group_norm_kernels, "group_norm_forward")
    x, weight, bias = make_inputs((2, 8, 4, 4), torch.float32)
    weight.requires_grad_(True)
    group_norm(x, 4, weight, bias, silu=True).sum().backward()
    assert counter.calls == 0 and weight.grad is not None
    with torch.no_grad():  # inference with trainable parameters still runs the kernel
        group_norm(x, 4, weight, bias, silu=True)
    assert counter.calls == 1
    offset = make_offset(x).requires_grad_(True)  # a trainable time embedding
    group_norm(x, 4, weight, bias, silu=True, offset=offset).sum().backward()
    assert counter.calls == 1 and offset.grad is not None


def test_single_pass_failure_on_first_use_falls_back_to_split(triton_backend, monkeypatch):
    class FailingKernel:  # stands in for a kernel the installed compiler rejects
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("simulated compile failure")

            return launch

    monkeypatch.setattr(group_norm_kernels, "group_norm_single_pass_kernel", FailingKernel())
    monkeypatch.setattr(group_norm_kernels, "_single_pass_state", "untried")
    x, weight, bias = make_inputs((2, 8, 4, 4), torch.float32)
    with pytest.warns(RuntimeWarning, match="failed on first use"):
        check(x, 4, weight, bias, silu=True)
    assert group_norm_kernels._single_pass_state == "failed"
    check(x, 4, weight, bias, silu=True)  # later calls go straight to the split path


def test_single_pass_errors_after_a_successful_launch_propagate(triton_backend, monkeypatch):
    class FailingKernel:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("out of memory")

            return launch

    monkeypatch.setattr(group_norm_kernels, "group_norm_single_pass_kernel", FailingKernel())
    monkeypatch.setattr(group_norm_kernels, "_single_pass_state", "works")
    with pytest.raises(RuntimeError, match="out of memory"):
        group_norm(torch.randn(2, 8, 4, 4, device=DEVICE), 4)


class LaunchSpy:
    """Stands in for a Triton kernel: keeps each launch's (args, kwargs), then launches it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> None:
        self.kernel = getattr(module, name)
        self.launches: list[tuple[tuple, dict]] = []
        monkeypatch.setattr(module, name, self)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((args, kwargs))
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize("dtype", kernel_dtypes())
def test_single_pass_tiles_with_a_partial_tail(triton_backend, monkeypatch, dtype):
    """The single-pass kernel's tile loop when the group spans several tiles and the last one is
    partial (2500 = 2048 + 452 values per channel): the statistics must skip the tail's masked
    lanes, and the second pass must neither read nor write past each channel's end."""
    spy = LaunchSpy(monkeypatch, group_norm_kernels, "group_norm_single_pass_kernel")
    x, weight, bias = make_inputs((1, 4, 50, 50), dtype, offset=1.0)
    check(x, 1, weight, bias, silu=True, what="partial tail")
    check(x, 1, weight, bias, silu=False, what="partial tail, no silu")
    (args, kwargs), _ = spy.launches
    spatial, block_s = args[5], kwargs["BLOCK_S"]
    assert not kwargs["SINGLE_TILE"] and spatial > block_s and spatial % block_s != 0


@pytest.mark.parametrize("dtype", kernel_dtypes())
def test_split_path_with_several_samples_and_multi_tile_splits(triton_backend, monkeypatch, dtype):
    """The split reduction where each split covers several spatial tiles and there are several
    samples: each split must start at its own tiles, and the partial sums of (sample, split)
    must land where the finalize kernel reads them."""
    monkeypatch.setattr(group_norm_kernels, "SINGLE_PASS_MAX_GROUP", 0)
    # The CPU's count of 4 on every device: a GPU's 100+ would give one tile per split here.
    monkeypatch.setattr(group_norm_split_kernels, "multiprocessors", lambda device: 4)
    spy = LaunchSpy(monkeypatch, group_norm_split_kernels, "group_norm_partial_stats_kernel")
    x, weight, bias = make_inputs((2, 16, 48, 48), dtype, offset=1.0)
    check(x, 2, weight, bias, silu=True, what="split, 2 samples")
    ((args, _),) = spy.launches
    num_samples, splits, tiles_per_split = args[2], args[8], args[9]
    assert num_samples > 1 and splits > 1 and tiles_per_split > 1


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", kernel_dtypes())
def test_two_launch_split_where_blocks_straddle_groups(
    triton_backend, monkeypatch, channels_last, dtype
):
    """The two-launch split reduction where its blocks and the groups do not line up: 10-channel
    groups, so a statistics block holds three whole groups (the last block one) and a normalizing
    block's channels belong to two groups; several samples, and splits of several tiles. Each
    group's sums must land once in its row, and each channel must read its own group's row."""
    monkeypatch.setattr(group_norm_kernels, "SINGLE_PASS_MAX_GROUP", 0)
    monkeypatch.setattr(group_norm_kernels, "SPLIT_LAUNCHES", 2)
    monkeypatch.setattr(group_norm_split_kernels, "multiprocessors", lambda device: 2)
    stats = LaunchSpy(monkeypatch, group_norm_two_launch, "group_norm_group_stats_kernel")
    apply = LaunchSpy(monkeypatch, group_norm_two_launch, "group_norm_apply_group_stats_kernel")
    x, weight, bias = make_inputs((2, 40, 24, 24), dtype, channels_last, offset=1.0)
    offset = make_offset(x)
    check(x, 4, weight, bias, silu=True, what="two launches", offset=offset)
    check(x, 4, None, None, silu=False, what="two launches, no affine")
    (args, kwargs), _ = stats.launches
    splits, tiles_per_split = args[12], args[13]
    assert splits > 1 and tiles_per_split > 1
    assert kwargs["GROUPS_PER_BLOCK"] == 3  # 4 groups: blocks of 3 and 1
    (_, apply_kwargs), _ = apply.launches
    assert apply_kwargs["BLOCK_C"] % 10 != 0 and apply_kwargs["BLOCK_GT"] >= 2


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize(
    ("shape", "groups"),
    [
        pytest.param((1, 1024, 2, 1), 1024, id="one-channel-groups"),  # the lookup is capped
        pytest.param((2, 56, 6, 5), 8, id="7-channel-groups"),
        pytest.param((1, 200, 3, 3), 2, id="100-channel-groups"),
        pytest.param((1, 256, 3, 2), 2, id="128-channel-groups"),  # the widest it takes
    ],
)
def test_two_launch_split_with_gpu_split_counts(
    triton_backend, monkeypatch, shape, groups, channels_last
):
    """The two launches sized for an H200's 132 SMs (many splits: the MAX_SPLITS cap, more than
    one BLOCK_SPLIT), at group widths whose blocks line up with nothing."""
    monkeypatch.setattr(group_norm_kernels, "SINGLE_PASS_MAX_GROUP", 0)
    monkeypatch.setattr(group_norm_kernels, "SPLIT_LAUNCHES", 2)
    monkeypatch.setattr(group_norm_split_kernels, "multiprocessors", lambda device: 132)
    spy = LaunchSpy(monkeypatch, group_norm_two_launch, "group_norm_apply_group_stats_kernel")
    x, weight, bias = make_inputs(shape, torch.float32, channels_last, offset=1.0)
    check(x, groups, weight, bias, silu=True, what=f"{shape} g={groups}", offset=make_offset(x))
    ((_, kwargs),) = spy.launches
    assert kwargs["BLOCK_C"] * kwargs["BLOCK_GT"] <= group_norm_two_launch.MAX_LOOKUP


def test_samples_past_int32_indexing_run_eagerly():
    """A sample of 2**31 elements or more would overflow the kernels' int32 offsets (shapes on
    the meta device: nothing is allocated)."""
    largest = torch.empty((2, 128, 4096, 4095), device="meta")  # 2**31 - 2**19 per sample
    assert group_norm_triton_supports(largest, 32, None, None)
    too_big = torch.empty((1, 128, 4096, 4096), device="meta")  # 2**31 per sample
    assert not group_norm_triton_supports(too_big, 32, None, None)
    channels_last = too_big.to(memory_format=torch.channels_last)
    assert not group_norm_triton_supports(channels_last, 32, None, None)


def test_two_launch_split_leaves_wide_groups_to_three_launches(triton_backend, monkeypatch):
    """Groups wider than one statistics block (256 channels) take the three launches."""
    monkeypatch.setattr(group_norm_kernels, "SINGLE_PASS_MAX_GROUP", 0)
    monkeypatch.setattr(group_norm_kernels, "SPLIT_LAUNCHES", 2)
    three = LaunchSpy(monkeypatch, group_norm_split_kernels, "group_norm_finalize_kernel")
    two = LaunchSpy(monkeypatch, group_norm_two_launch, "group_norm_group_stats_kernel")
    x, weight, bias = make_inputs((1, 256, 4, 4), torch.float32)
    check(x, 1, weight, bias, silu=True, what="one 256-channel group")
    assert len(three.launches) == 1 and not two.launches
    check(x, 32, weight, bias, silu=True, what="8-channel groups")  # the group table is capped
    assert len(three.launches) == 1 and len(two.launches) == 1


def test_strided_weight_and_bias_match_the_reference(triton_backend, kernel_path):
    """Weight and bias that are strided views (every other element): the kernels index them
    with unit stride, so such parameters must not reach them as they are."""
    x = torch.randn(2, 8, 5, 6, device=DEVICE) * 2
    weight = torch.randn(16, device=DEVICE)[::2]
    bias = torch.randn(16, device=DEVICE)[::2]
    check(x, 4, weight, None, silu=False, what="strided weight")
    check(x, 4, None, bias, silu=False, what="strided bias")
    check(x, 4, weight, bias, silu=True, what="strided weight and bias")


@pytest.mark.parametrize("offset", [False, True], ids=["plain", "offset"])
def test_eps_is_used(triton_backend, kernel_path, offset):
    """A variance (1e-4) well below eps (1e-2): an eps the kernels ignored or replaced by the
    default 1e-5 would scale the output about 10x."""
    x = torch.randn(2, 8, 5, 6, device=DEVICE) * 1e-2
    weight, bias = torch.randn(8, device=DEVICE), torch.randn(8, device=DEVICE)
    add = make_offset(x, spread=1e-2) if offset else None
    check(x, 4, weight, bias, silu=False, eps=1e-2, what="eps 1e-2", offset=add)


def test_supports_refuses_groups_of_too_many_channels():
    """The finalize kernel holds one group's channels in registers: more than
    MAX_CHANNELS_PER_GROUP per group must go to the eager path."""
    limit = MAX_CHANNELS_PER_GROUP

    def supports(channels, groups):
        x = torch.empty(1, channels, 1, device="meta")
        return group_norm_triton_supports(x, groups, None, None)

    assert supports(limit, 1) and supports(2 * limit, 2)
    assert not supports(limit + 2, 1) and not supports(2 * limit, 1)


def group_norm_float64(x, groups, weight, bias, eps, silu, offset):
    """GroupNorm written out in float64 from its definition: the oracle of the reference."""
    values = x.double()
    per_channel = (-1, x.shape[1], *(1,) * (x.dim() - 2))
    if offset is not None:
        values = values + offset.double().reshape(per_channel)
    grouped = values.reshape(x.shape[0], groups, -1)
    mean = grouped.mean(dim=-1, keepdim=True)
    var = ((grouped - mean) ** 2).mean(dim=-1, keepdim=True)
    out = ((grouped - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    out = out * weight.double().reshape(per_channel) + bias.double().reshape(per_channel)
    return out * torch.sigmoid(out) if silu else out


@pytest.mark.parametrize("offset", [None, "per-sample", "per-channel"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("silu", [False, True], ids=["plain", "silu"])
def test_reference_matches_the_definition(silu, channels_last, offset):
    """group_norm_reference, every kernel test's oracle, against GroupNorm written out in
    float64 (eps 0.1 so that a reference that dropped eps would show): a wrong reference would
    make the tolerance rule's eager error large and every kernel test pass."""
    x, weight, bias = make_inputs((2, 6, 4, 5), torch.float32, channels_last=channels_last)
    add = None if offset is None else make_offset(x, per_sample=offset == "per-sample")
    out = group_norm_reference(x, 3, weight, bias, 0.1, silu, offset=add)
    truth = group_norm_float64(x, 3, weight, bias, 0.1, silu, add)
    assert out.dtype == x.dtype and out.stride() == x.stride()
    torch.testing.assert_close(out.double(), truth, atol=1e-5, rtol=1e-5)
