"""CUDA C++ fused CFG + sampler step against the sampling layer's own step (apply_plan_row on
combine_guidance), with the tolerance rule; inside a CUDA graph replayed for every step. GPU only
(skips without the extension unless FASTDIFF_REQUIRE_CUDA_EXTENSION=1, see
test_cuda_group_norm.py)."""

from __future__ import annotations

import functools
import os

import pytest
import torch

import fastdiff.ops.cuda_extension as cuda_extension
from fastdiff.ops import sampler_step, use_backend
from fastdiff.sampling import NoiseSchedule, make_plan
from tests.ops.cuda_errors import assert_errors, run_error_cases
from tests.ops.helpers import check_sampler_step, kernel_dtypes

pytestmark = pytest.mark.gpu

PLANS = [
    pytest.param(("ddim", 0.0), id="ddim"),
    pytest.param(("ddim", 1.0), id="ddim-eta1"),
    pytest.param(("ddpm", 0.0), id="ddpm"),
    pytest.param(("euler", 0.0), id="euler"),
    pytest.param(("euler_ancestral", 0.0), id="euler_ancestral"),  # input scale and noise
    pytest.param(("dpmpp_2m", 0.0), id="dpmpp_2m"),
    pytest.param(("dpmpp_2m_sde", 0.0), id="dpmpp_2m_sde"),  # previous x0 and noise in one row
    pytest.param(("unipc", 0.0), id="unipc"),  # the x0 of two steps back as well
]


@pytest.fixture(autouse=True)
def extension():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not cuda_extension.available():
        message = f"CUDA extension unavailable: {cuda_extension.unavailable_reason()}"
        if os.environ.get("FASTDIFF_REQUIRE_CUDA_EXTENSION") == "1":
            pytest.fail(message)
        pytest.skip(message)


def plan_table(sampler, eta, steps=4, dtype=torch.float64):
    plan = make_plan(NoiseSchedule(beta_schedule="scaled_linear"), sampler, steps=steps, eta=eta)
    return plan, plan.coefficients.to("cuda", dtype)


check_step = functools.partial(check_sampler_step, same_layout=True)


def run_op(x, model_output, table, step, x0_prev, guidance, noise, x0_older=None):
    guidance_tensor = guidance if isinstance(guidance, torch.Tensor) else None
    value = 1.0 if guidance_tensor is not None else float(guidance)
    args = (x, model_output, table, step, x0_prev, guidance_tensor, value, noise, x0_older)
    assert cuda_extension.supports_sampler_step(*args)
    return cuda_extension.sampler_step(*args)


@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("plan_args", PLANS)
@pytest.mark.parametrize(
    "shape", [(2, 4, 6, 5), (1, 3, 5, 7), (2, 4, 64, 64)], ids=["vector", "odd-tail", "sd15"]
)
def test_whole_plan_matches_reference_steps(plan_args, dtype, shape):
    plan, table = plan_table(*plan_args)
    x = (torch.randn(shape, device="cuda") * plan.init_noise_scale).to(dtype)
    x0_prev = torch.zeros_like(x)
    depth = plan.history_depth - 1  # older x0 estimates the plan reads
    x0_older = torch.zeros((depth, *shape), device="cuda").to(dtype) if depth > 0 else None
    guidance = torch.tensor(7.5, device="cuda")
    for index in range(len(plan)):
        model_output = torch.randn((2 * shape[0], *shape[1:]), device="cuda").to(dtype)
        noise = torch.randn(shape, device="cuda").to(dtype)
        step = torch.tensor(index, device="cuda")
        out = run_op(x, model_output, table, step, x0_prev, guidance, noise, x0_older)
        row = plan.coefficients[index].tolist()
        what = f"{plan.sampler} {index}"
        check_step(out, row, x, model_output, 7.5, x0_prev, noise, what, x0_older=x0_older)
        if x0_older is not None:
            x0_older = torch.cat([x0_prev[None], x0_older[:-1]])
        x, x0_prev = out


def test_channels_last_mixed_dtypes_single_row_and_no_guidance():
    plan, table = plan_table("dpmpp_2m", 0.0, dtype=torch.float32)
    layout = torch.channels_last
    x = torch.randn(2, 4, 9, 7, device="cuda").to(memory_format=layout)
    x0_prev = torch.randn_like(x)
    model_output = torch.randn(4, 4, 9, 7, device="cuda").half().to(memory_format=layout)
    out = run_op(x, model_output, table[2], None, x0_prev, 3.0, None)
    check_step(out, plan.coefficients[2].tolist(), x, model_output, 3.0, x0_prev, None, "cl")
    unguided = model_output[:2]
    out = run_op(x, unguided, table, torch.tensor(1, device="cuda"), None, 1.0, None)
    check_step(out, plan.coefficients[1].tolist(), x, unguided, 1.0, None, None, "no cfg")


@pytest.mark.parametrize(
    ("shape", "dtype", "guided"),
    [
        pytest.param((1, 4, 3, 1), torch.float32, True, id="fp32-guided-12"),
        pytest.param((1, 3, 5, 7), torch.float16, False, id="fp16-unguided-105"),
        pytest.param((3, 1, 1, 3), torch.bfloat16, False, id="bf16-unguided-9"),
    ],
)
def test_vector_body_with_scalar_tail(shape, dtype, guided):
    # Every pointer 16-byte aligned but numel not a multiple of 8: 8-wide chunks, then a tail.
    plan, table = plan_table("dpmpp_2m", 0.0)
    x = torch.randn(shape, device="cuda").to(dtype)
    x0_prev = torch.randn_like(x)
    batch = 2 * shape[0] if guided else shape[0]
    model_output = torch.randn((batch, *shape[1:]), device="cuda").to(dtype)
    out = run_op(x, model_output, table, torch.tensor(2, device="cuda"), x0_prev, 4.0, None)
    row = plan.coefficients[2].tolist()
    check_step(out, row, x, model_output, 4.0, x0_prev, None, f"{shape} {dtype}")


def test_backend_cuda_routes_sampler_step_to_the_extension(monkeypatch):
    original = cuda_extension.sampler_step
    calls = []
    monkeypatch.setattr(cuda_extension, "sampler_step", lambda *a: calls.append(1) or original(*a))
    plan, table = plan_table("ddim", 0.0)
    x = torch.randn(2, 4, 8, 8, device="cuda").half()
    model_output = torch.randn(4, 4, 8, 8, device="cuda").half()
    with use_backend("cuda"):
        out = sampler_step(x, model_output, table, 2, None, 5.0)
    assert calls == [1]
    check_step(out, plan.coefficients[2].tolist(), x, model_output, 5.0, None, None, "dispatch")


def test_out_of_range_step_reads_the_nearest_row():
    plan, table = plan_table("ddim", 0.0)
    x = torch.randn(1, 4, 4, 4, device="cuda")
    model_output = torch.randn(2, 4, 4, 4, device="cuda")
    out = run_op(x, model_output, table, torch.tensor(99, device="cuda"), None, 2.0, None)
    check_step(out, plan.coefficients[-1].tolist(), x, model_output, 2.0, None, None, "clamp")


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "ddpm"])
def test_captured_graph_replays_every_step(sampler):
    plan, table = plan_table(sampler, 0.0, steps=5)
    shape = (2, 4, 16, 16)
    x = torch.randn(shape, device="cuda").half()
    x0_prev = torch.zeros_like(x)
    model_output = torch.randn((4, *shape[1:]), device="cuda").half()
    noise = torch.randn(shape, device="cuda").half()
    step = torch.zeros((), dtype=torch.int64, device="cuda")
    guidance = torch.tensor(7.5, device="cuda")
    args = (x, model_output, table, step, x0_prev, guidance, 1.0, noise)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        cuda_extension.sampler_step(*args)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_next, graph_x0 = cuda_extension.sampler_step(*args)
    for index in range(len(plan)):
        fresh = torch.randn((4, *shape[1:]), device="cuda").half()
        model_output.copy_(fresh)
        noise.copy_(torch.randn(shape, device="cuda").half())
        step.fill_(index)
        guidance.fill_(7.5 - index)  # the guidance scale may change per step too
        inputs = (x.clone(), model_output.clone(), x0_prev.clone(), noise.clone())
        graph.replay()
        out = (graph_next.clone(), graph_x0.clone())
        row = plan.coefficients[index].tolist()
        x_in, model_in, prev_in, noise_in = inputs
        what = f"{sampler} replay {index}"
        check_step(out, row, x_in, model_in, 7.5 - index, prev_in, noise_in, what)
        x.copy_(out[0])
        x0_prev.copy_(out[1])


ERROR_CASES = """
from fastdiff.sampling import NoiseSchedule, make_plan

plan = make_plan(NoiseSchedule(beta_schedule="scaled_linear"), "ddim", steps=4)
table = plan.coefficients.to("cuda")
x = torch.randn(2, 4, 4, 4, device="cuda")
model_output = torch.randn(4, 4, 4, 4, device="cuda")
step = torch.tensor(0, device="cuda")


def op(
    x=x, model_output=model_output, table=table, step=step, x0_prev=None, noise=None, older=None
):
    return cuda_extension.sampler_step(
        x, model_output, table, step, x0_prev, None, 2.0, noise, older
    )


check("cpu", lambda: op(x=x.cpu()))
check("double", lambda: op(x=x.double()))
check("model shape", lambda: op(model_output=model_output[:3]))
check("model layout", lambda: op(model_output=model_output.to(memory_format=torch.channels_last)))
check("x0_prev dtype", lambda: op(x0_prev=x.half()))
check("noise shape", lambda: op(noise=x[:1]))
check("x0_older shape", lambda: op(older=x[None, :1]))
check("x0_older depth", lambda: op(older=torch.zeros(4, *x.shape, device="cuda")))
check("table shape", lambda: op(table=table[:, :9]))
check("no step", lambda: op(step=None))
check("int32 step", lambda: op(step=step.int()))
check("cpu table", lambda: op(table=table.cpu()))
"""


def test_argument_errors_name_the_argument():
    assert_errors(
        run_error_cases(ERROR_CASES),
        {
            "cpu": ("RuntimeError", "x must be a CUDA tensor"),
            "double": ("RuntimeError", "x has dtype Double"),
            "model shape": ("ValueError", "model_output has shape [3, 4, 4, 4]"),
            "model layout": ("RuntimeError", "model_output must share x's dense layout"),
            "x0_prev dtype": ("RuntimeError", "x0_prev has dtype Half but x has dtype Float"),
            "noise shape": ("ValueError", "noise has shape [1, 4, 4, 4]"),
            "x0_older shape": ("ValueError", "x0_older has shape [1, 1, 4, 4, 4]"),
            "x0_older depth": ("ValueError", "expected [K, *x.shape] with K in [1, 3]"),
            "table shape": ("ValueError", "coefficients must be a [S, 10] table or one [10] row"),
            "no step": ("ValueError", "pass step with a [S, 10] coefficient table"),
            "int32 step": ("RuntimeError", "step must be one int64 element, got Int"),
            "cpu table": ("RuntimeError", "coefficients must be a CUDA tensor"),
        },
    )
