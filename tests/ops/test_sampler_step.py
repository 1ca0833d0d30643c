"""Fused CFG + sampler-step kernel against the sampling layer's own step (apply_plan_row)."""

from __future__ import annotations

import fastdiff.kernels.sampler_step as sampler_step_kernels
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdiff.ops import sampler_step, use_backend
from fastdiff.ops.sampler_step import sampler_step_eager, sampler_step_triton
from fastdiff.sampling import NoiseSchedule, make_plan
from tests.ops.helpers import (
    DEVICE,
    CallCounter,
    check_sampler_step,
    kernel_dtypes,
    sampler_step_reference,
)

PLANS = [
    pytest.param(("ddim", 0.0), id="ddim"),
    pytest.param(("ddim", 1.0), id="ddim-eta1"),
    pytest.param(("ddpm", 0.0), id="ddpm"),
    pytest.param(("euler", 0.0), id="euler"),
    pytest.param(("euler_ancestral", 0.0), id="euler_ancestral"),  # input scale and noise
    pytest.param(("dpmpp_2m", 0.0), id="dpmpp_2m"),
    pytest.param(("dpmpp_2m_sde", 0.0), id="dpmpp_2m_sde"),  # previous x0 and noise in one row
    pytest.param(("unipc", 0.0), id="unipc"),  # the x0 of two steps back as well
    pytest.param(("dpmpp_3m_sde", 0.0), id="dpmpp_3m_sde"),  # two x0 histories and noise
]

# A kernel that fell back after failing on first use would hide the failure: fail instead.
pytestmark = pytest.mark.filterwarnings("error:.*failed on first use:RuntimeWarning")


check_step = check_sampler_step


def device_plan(sampler, eta, steps=4, prediction_type="epsilon"):
    schedule = NoiseSchedule(beta_schedule="scaled_linear", prediction_type=prediction_type)
    plan = make_plan(schedule, sampler, steps=steps, eta=eta)
    return plan, plan.coefficients.to(DEVICE)


@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("plan_args", PLANS)
def test_whole_plan_matches_reference_steps(triton_backend, monkeypatch, plan_args, dtype):
    counter = CallCounter(monkeypatch, sampler_step_kernels, "sampler_step_forward")
    plan, table = device_plan(*plan_args)
    shape = (2, 4, 6, 5)
    x = (torch.randn(shape, device=DEVICE) * plan.init_noise_scale).to(dtype)
    x0_prev = torch.zeros_like(x)
    depth = plan.history_depth - 1  # older x0 estimates the plan reads (UniPC, 3M: 1)
    x0_older = torch.zeros((depth, *shape), device=DEVICE).to(dtype) if depth > 0 else None
    guidance = torch.tensor(7.5, device=DEVICE)
    for index in range(len(plan)):
        model_output = torch.randn((4, *shape[1:]), device=DEVICE).to(dtype)
        noise = torch.randn(shape, device=DEVICE).to(dtype)
        step = torch.tensor(index, device=DEVICE)
        out = sampler_step(x, model_output, table, step, x0_prev, guidance, noise, x0_older)
        row = plan.coefficients[index].tolist()
        what = f"{plan.sampler} step {index}"
        check_step(out, row, x, model_output, 7.5, x0_prev, noise, what, x0_older=x0_older)
        if x0_older is not None:
            x0_older = torch.cat([x0_prev[None], x0_older[:-1]])
        x, x0_prev = out
    assert counter.calls == len(plan)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_other_prediction_types(triton_backend, prediction_type):
    plan, table = device_plan("ddim", 0.0, prediction_type=prediction_type)
    x = torch.randn(1, 4, 5, 5, device=DEVICE)
    model_output = torch.randn(2, 4, 5, 5, device=DEVICE)
    out = sampler_step(x, model_output, table, 1, None, 3.0)
    check_step(out, plan.coefficients[1].tolist(), x, model_output, 3.0, None, None)


def test_without_guidance_and_with_a_single_row(triton_backend, monkeypatch):
    counter = CallCounter(monkeypatch, sampler_step_kernels, "sampler_step_forward")
    plan, table = device_plan("dpmpp_2m", 0.0)
    x, x0_prev = torch.randn(2, 3, 7, 9, device=DEVICE), torch.randn(2, 3, 7, 9, device=DEVICE)
    model_output = torch.randn(2, 3, 7, 9, device=DEVICE)  # [B]: no CFG, guidance unused
    out = sampler_step(x, model_output, table[2], None, x0_prev, 5.0)
    check_step(out, plan.coefficients[2].tolist(), x, model_output, 5.0, x0_prev, None)
    assert counter.calls == 1


def test_float_guidance_equals_tensor_guidance(triton_backend):
    _, table = device_plan("ddim", 0.0)
    x = torch.randn(2, 4, 3, 3, device=DEVICE)
    model_output = torch.randn(4, 4, 3, 3, device=DEVICE)
    by_float = sampler_step(x, model_output, table, 1, None, 4.0)
    by_tensor = sampler_step(x, model_output, table, 1, None, torch.tensor(4.0, device=DEVICE))
    for a, b in zip(by_float, by_tensor, strict=True):
        torch.testing.assert_close(a, b)


def test_channels_last_latents(triton_backend, monkeypatch):
    counter = CallCounter(monkeypatch, sampler_step_kernels, "sampler_step_forward")
    plan, table = device_plan("ddim", 0.0)
    channels_last = torch.channels_last
    x = torch.randn(2, 4, 5, 6, device=DEVICE).to(memory_format=channels_last)
    model_output = torch.randn(4, 4, 5, 6, device=DEVICE).to(memory_format=channels_last)
    out = sampler_step(x, model_output, table, 0, None, 7.5)
    check_step(out, plan.coefficients[0].tolist(), x, model_output, 7.5, None, None)
    assert out[0].is_contiguous(memory_format=channels_last)
    assert counter.calls == 1


@settings(max_examples=6, deadline=None)
@given(
    batch=st.integers(1, 3),
    numel=st.integers(1, 2500),
    guided=st.booleans(),
    index=st.integers(0, 3),
    guidance=st.floats(0.0, 12.0),
)
def test_random_sizes_property(batch, numel, guided, index, guidance):
    plan, table = device_plan("ddim", 0.5)
    x = torch.randn(batch, numel, device=DEVICE)
    model_output = torch.randn((2 * batch if guided else batch), numel, device=DEVICE)
    x0_prev, noise = torch.randn_like(x), torch.randn_like(x)
    with use_backend("triton"):
        out = sampler_step(x, model_output, table, index, x0_prev, guidance, noise)
    check_step(out, plan.coefficients[index].tolist(), x, model_output, guidance, x0_prev, noise)


test_random_sizes_property = pytest.mark.usefixtures("triton_backend")(test_random_sizes_property)


def test_mixed_layouts_fall_back_to_eager(triton_backend, monkeypatch):
    counter = CallCounter(monkeypatch, sampler_step_kernels, "sampler_step_forward")
    plan, table = device_plan("ddim", 0.0)
    x = torch.randn(2, 4, 5, 6, device=DEVICE)
    model_output = torch.randn(4, 4, 5, 6, device=DEVICE).to(memory_format=torch.channels_last)
    out = sampler_step(x, model_output, table, 0, None, 7.5)
    check_step(out, plan.coefficients[0].tolist(), x, model_output, 7.5, None, None)
    torch.testing.assert_close(out, sampler_step_eager(x, model_output, table, 0, None, 7.5))
    assert counter.calls == 0


def test_float64_state_falls_back_to_eager(triton_backend, monkeypatch):
    counter = CallCounter(monkeypatch, sampler_step_kernels, "sampler_step_forward")
    plan, table = device_plan("ddim", 0.0)
    x = torch.randn(1, 4, 3, 3, device=DEVICE, dtype=torch.float64)
    model_output = torch.randn(2, 4, 3, 3, device=DEVICE, dtype=torch.float64)
    out = sampler_step(x, model_output, table, 3, None, 2.0)
    want = sampler_step_reference(
        plan.coefficients[3].tolist(), x, model_output, 2.0, None, None, torch.float64
    )
    for a, b in zip(out, want, strict=True):
        torch.testing.assert_close(a, b)
    assert counter.calls == 0


def test_bad_arguments_raise():
    _, table = device_plan("ddim", 0.0)
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match="model_output shape"):
        sampler_step(x, torch.randn(3, 4, 3, 3), table, 0)
    with pytest.raises(ValueError, match="pass step"):
        sampler_step(x, torch.randn(2, 4, 3, 3), table)
    with pytest.raises(ValueError, match="coefficients must be"):
        sampler_step(x, torch.randn(2, 4, 3, 3), table[:, :5], 0)
    with pytest.raises(ValueError, match="noise shape"):
        sampler_step(x, torch.randn(2, 4, 3, 3), table, 0, noise=torch.randn(2, 4))
    # The kernels read one scale and the table row a step names, unchecked on the device:
    # a per-sample scale was applied as its first value, a step past the table read garbage.
    per_sample = torch.tensor([1.0, 7.5]).view(2, 1, 1, 1)
    with pytest.raises(ValueError, match=r"one-element tensor, got shape \(2, 1, 1, 1\)"):
        sampler_step(x, torch.randn(4, 4, 3, 3), table, 0, guidance_scale=per_sample)
    for step in (-1, 4, 100):
        with pytest.raises(IndexError, match=f"step {step} is outside the plan's 4 rows"):
            sampler_step(x, torch.randn(2, 4, 3, 3), table, step)


def test_gradients_for_the_table_or_scale_take_the_eager_path(triton_backend, monkeypatch):
    """The kernels have no backward: a table or guidance scale that wants a gradient goes to
    the eager path (it used to reach the kernel and fail in backward)."""
    counter = CallCounter(monkeypatch, sampler_step_kernels, "sampler_step_forward")
    plan, table = device_plan("ddim", 0.0)
    x = torch.randn(1, 4, 3, 3, device=DEVICE)
    model_output = torch.randn(2, 4, 3, 3, device=DEVICE)
    for wants_grad in ("table", "guidance"):
        coefficients = table.clone().requires_grad_(wants_grad == "table")
        guidance = torch.tensor(3.0, device=DEVICE, requires_grad=wants_grad == "guidance")
        x_next, _ = sampler_step(x, model_output, coefficients, 1, None, guidance)
        x_next.sum().backward()
        grad = coefficients.grad if wants_grad == "table" else guidance.grad
        assert grad is not None and bool(grad.abs().sum() > 0)
    assert counter.calls == 0


def test_fake_kernel_matches_real_output(triton_backend):
    _, table = device_plan("ddim", 0.0)
    x = torch.randn(2, 4, 3, 3, device=DEVICE)
    args = (
        x,
        torch.randn(4, 4, 3, 3, device=DEVICE),
        table,
        torch.tensor(1, device=DEVICE),
        torch.randn_like(x),
        torch.tensor(7.5, device=DEVICE),
        1.0,
        torch.randn_like(x),
        torch.randn_like(x),
    )
    torch.library.opcheck(sampler_step_triton, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(2, 4, 64, 64), (1, 4, 128, 128)], ids=["sd15", "sdxl"])
def test_sd_latents_on_gpu(monkeypatch, shape, dtype):
    counter = CallCounter(monkeypatch, sampler_step_kernels, "sampler_step_forward")
    plan, table = device_plan("ddim", 1.0, steps=10)
    x = torch.randn(shape, device=DEVICE).to(dtype)
    model_output = torch.randn((2 * shape[0], *shape[1:]), device=DEVICE).to(dtype)
    x0_prev, noise = torch.randn_like(x), torch.randn_like(x)
    with use_backend("triton"):
        out = sampler_step(x, model_output, table, 4, x0_prev, 7.5, noise)
    check_step(out, plan.coefficients[4].tolist(), x, model_output, 7.5, x0_prev, noise)
    assert counter.calls == 1  # the kernel ran, not a silent eager fallback


@pytest.mark.gpu
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "ddpm"])
def test_cuda_graph_replay_for_every_step(monkeypatch, sampler):
    """Capture one step, then replay it for each step with new inputs copied into static buffers:
    the step index and guidance live on the device, so every replay must use its own row."""
    counter = CallCounter(monkeypatch, sampler_step_kernels, "sampler_step_forward")
    plan, table = device_plan(sampler, 0.0, steps=6)
    shape = (2, 4, 32, 32)
    static_x = torch.randn(shape, device="cuda", dtype=torch.float16)
    static_model = torch.randn((4, *shape[1:]), device="cuda", dtype=torch.float16)
    static_prev = torch.zeros_like(static_x)
    static_noise = torch.randn_like(static_x)
    static_step = torch.zeros((), dtype=torch.int64, device="cuda")
    static_guidance = torch.tensor(7.5, device="cuda")
    with use_backend("triton"):
        args = (
            static_x,
            static_model,
            table,
            static_step,
            static_prev,
            static_guidance,
            static_noise,
        )
        sampler_step(*args)  # compile before capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_next, static_x0 = sampler_step(*args)
    assert counter.calls == 2  # warm-up and capture both launched the kernel (no eager fallback)
    x = torch.randn(shape, device="cuda", dtype=torch.float16)
    x0_prev = torch.zeros_like(x)
    for index in range(len(plan)):
        model_output = torch.randn((4, *shape[1:]), device="cuda", dtype=torch.float16)
        noise = torch.randn_like(x)
        guidance = 5.0 + index
        for static, value in (
            (static_x, x),
            (static_model, model_output),
            (static_prev, x0_prev),
            (static_noise, noise),
        ):
            static.copy_(value)
        static_step.fill_(index)
        static_guidance.fill_(guidance)
        graph.replay()
        out = (static_next.clone(), static_x0.clone())
        row = plan.coefficients[index].tolist()
        check_step(out, row, x, model_output, guidance, x0_prev, noise, f"replay {index}")
        x, x0_prev = out


@pytest.mark.gpu
def test_eager_path_is_capturable_in_a_cuda_graph():
    """The eager fallback reads the plan row by index_select (no host sync), so it can be
    captured too; each replay must still pick its own row."""
    plan, table = device_plan("ddim", 0.0, steps=4)
    x = torch.randn(1, 4, 8, 8, device="cuda")
    model_output = torch.randn(2, 4, 8, 8, device="cuda")
    step = torch.zeros((), dtype=torch.int64, device="cuda")
    guidance = torch.tensor(6.0, device="cuda")
    with use_backend("eager"):
        sampler_step(x, model_output, table, step, None, guidance)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            x_next, x0 = sampler_step(x, model_output, table, step, None, guidance)
    for index in range(len(plan)):
        step.fill_(index)
        graph.replay()
        row = plan.coefficients[index].tolist()
        check_step((x_next, x0), row, x, model_output, 6.0, None, None, f"eager replay {index}")


@pytest.mark.parametrize("layout", ["row-stride-11", "column-stride-2"])
def test_coefficient_table_views_with_other_strides(triton_backend, monkeypatch, layout):
    """A plan table that is a view: rows 11 apart (a [S, 11] buffer's first 10 columns), or
    columns 2 apart. The kernel must step through rows by the table's own row stride, and a
    table whose columns are not contiguous must not reach it; the buffer's other entries are
    garbage that would show if read."""
    counter = CallCounter(monkeypatch, sampler_step_kernels, "sampler_step_forward")
    plan, table = device_plan("dpmpp_2m_sde", 0.0)
    width = 11 if layout == "row-stride-11" else 20
    buffer = torch.full((len(plan), width), 1e3, dtype=table.dtype, device=DEVICE)
    coefficients = buffer[:, :10] if layout == "row-stride-11" else buffer[:, ::2]
    coefficients.copy_(table)
    x, x0_prev, noise = (torch.randn(2, 4, 5, 6, device=DEVICE) for _ in range(3))
    for index in range(len(plan)):
        model_output = torch.randn(4, 4, 5, 6, device=DEVICE)
        step = torch.tensor(index, device=DEVICE)
        out = sampler_step(x, model_output, coefficients, step, x0_prev, 7.5, noise)
        row = plan.coefficients[index].tolist()
        check_step(out, row, x, model_output, 7.5, x0_prev, noise, f"{layout} step {index}")
    if layout == "row-stride-11":  # read in place by the kernel, not copied or sent to eager
        assert counter.calls == len(plan)


@pytest.mark.parametrize("guided", [False, True], ids=["no-cfg", "cfg"])
def test_reference_matches_the_definition(guided):
    """sampler_step_reference, every fused kernel's oracle, against the step written out in
    float64 from the kernel's contract (m = u + w (c - u); x0 = c1 (c0 x) + c2 m; x_next =
    c3 x + c4 x0 + c5 x0_prev + c6 z + c7 x0_older[0] + c8 x0_older[1] + c9 x0_older[2]), with
    ten distinct non-zero coefficients."""
    row = [0.7, 1.3, -0.4, 0.9, 0.2, -0.6, 0.5, 0.3, -0.8, 0.45]
    x, x0_prev, noise = (torch.randn(2, 3, 4, device=DEVICE) for _ in range(3))
    x0_older = torch.randn(3, 2, 3, 4, device=DEVICE)
    model_output = torch.randn(4 if guided else 2, 3, 4, device=DEVICE)
    x_next, x0 = sampler_step_reference(
        row, x, model_output, 3.0, x0_prev, noise, x0_older=x0_older
    )
    c0, c1, c2, c3, c4, c5, c6, c7, c8, c9 = row
    model = model_output.double()
    if guided:
        uncond, cond = model.chunk(2)
        model = uncond + 3.0 * (cond - uncond)
    want_x0 = c1 * (c0 * x.double()) + c2 * model
    want_next = c3 * x.double() + c4 * want_x0 + c5 * x0_prev.double() + c6 * noise.double()
    older = x0_older.double()
    want_next = want_next + c7 * older[0] + c8 * older[1] + c9 * older[2]
    torch.testing.assert_close(x0.double(), want_x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_next.double(), want_next, atol=1e-5, rtol=1e-5)
