"""Kernels launched without PyTorch's dispatch where nothing watches (``launch_kernel_op``), and
through their custom ops wherever something does: torch.compile, torch.jit.trace, dispatch modes
(FakeTensorMode), the profiler, tensor subclasses."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastdiff.ops import group_norm
from fastdiff.ops.backend import may_launch_directly

# (``fastdiff.ops.group_norm`` the attribute is the function; this is its module)
group_norm_module = importlib.import_module("fastdiff.ops.group_norm")


class RecordOps(TorchDispatchMode):
    """A dispatch mode that records the ops it sees and runs them unchanged."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


class Marked(torch.Tensor):
    """A tensor subclass with no behaviour of its own."""


@pytest.fixture
def inputs():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 4, 4, generator=generator)
    weight = torch.randn(8, generator=generator)
    bias = torch.randn(8, generator=generator)
    return x, weight, bias


@pytest.fixture
def custom_op_calls(monkeypatch) -> list[int]:
    """Counts the calls that reach the group_norm custom op (the direct path never does)."""
    calls: list[int] = []
    custom_op = group_norm_module.group_norm_triton

    def counting(*args):
        calls.append(1)
        return custom_op(*args)

    monkeypatch.setattr(group_norm_module, "group_norm_triton", counting)
    return calls


def test_plain_tensors_launch_directly(triton_backend, inputs, custom_op_calls):
    x, weight, bias = inputs
    out = group_norm(x, 4, weight, bias, silu=True)
    assert custom_op_calls == []
    with RecordOps():
        watched = group_norm(x, 4, weight, bias, silu=True)
    assert custom_op_calls == [1]
    assert torch.equal(out, watched)  # the same launcher on the same arguments


def test_dispatch_modes_see_the_custom_op(triton_backend, inputs):
    x, weight, bias = inputs
    with RecordOps() as mode:
        group_norm(x, 4, weight, bias)
    assert any(name.startswith("fastdiff.group_norm") for name in mode.seen), mode.seen


def test_fake_tensors_reach_the_fake_kernel(triton_backend, inputs):
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, weight, bias = inputs
    with FakeTensorMode() as mode:
        fake = group_norm(mode.from_tensor(x), 4, mode.from_tensor(weight), None)
    assert fake.shape == x.shape and fake.dtype == x.dtype


def test_profiler_tables_name_the_custom_op(triton_backend, inputs, custom_op_calls):
    x, weight, bias = inputs
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        group_norm(x, 4, weight, bias)
    assert custom_op_calls == [1]
    assert any(event.name == "fastdiff::group_norm" for event in profile.events())


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:DeprecationWarning")
def test_jit_trace_records_the_custom_op(triton_backend, inputs):
    x, weight, bias = inputs

    def forward(values):
        return group_norm(values, 4, weight, bias)

    traced = torch.jit.trace(forward, (x,), check_trace=False)
    assert "fastdiff::group_norm" in str(traced.graph)
    other = torch.randn_like(x)
    assert torch.equal(traced(other), forward(other))


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_torch_compile_graphs_hold_the_custom_op(triton_backend, inputs):
    x, weight, bias = inputs
    targets: list[str] = []

    def record_graph(graph_module, example_inputs):
        targets.extend(str(node.target) for node in graph_module.graph.nodes)
        return graph_module.forward

    torch._dynamo.reset()
    compiled = torch.compile(
        lambda values: group_norm(values, 4, weight, bias), backend=record_graph
    )
    out = compiled(x)
    assert any(target.startswith("fastdiff.group_norm") for target in targets), targets
    assert torch.equal(out, group_norm(x, 4, weight, bias))


def test_subclasses_and_watchers_keep_the_custom_op(inputs):
    x, weight, _ = inputs
    assert may_launch_directly((x, 4, weight, None, 1e-5, False))
    assert may_launch_directly((x, torch.nn.Parameter(weight)))
    assert not may_launch_directly((x.as_subclass(Marked), weight))
    with RecordOps():
        assert not may_launch_directly((x,))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        assert not may_launch_directly((x,))
    assert not torch.func.vmap(lambda row: torch.tensor(may_launch_directly((row,))))(x).any()


class OnSecondGpu:
    """Stands in for a tensor on cuda:1 (this machine may have no GPU at all)."""

    is_cuda = True
    device = torch.device("cuda", 1)

    def get_device(self) -> int:
        return 1


@pytest.mark.parametrize("current", [0, 1])
def test_kernels_run_with_their_tensors_device_current(monkeypatch, current):
    """Triton launches on the current device: a tensor on cuda:1 while cuda:0 is current gets
    cuda:1 made current around its launch (a wrong GPU otherwise), and no switch when it
    already is."""
    from contextlib import contextmanager

    from fastdiff.ops.backend import launch_kernel_op

    made_current = []

    @contextmanager
    def switch_to(device):
        made_current.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "device", switch_to)
    seen = []
    result = launch_kernel_op(
        None, lambda *args: seen.append(list(made_current)) or args, OnSecondGpu()
    )
    assert isinstance(result[0], OnSecondGpu)
    assert seen == [[torch.device("cuda", 1)] if current == 0 else []]
