"""compile_ahead (fastdiff/kernels/__init__.py): a pass in which the launchers compile their
kernels instead of running them, all at once in threads. The compile itself is checked for sm_90
in test_triton_sm90.py (a U-Net's second forward must compile nothing); here the launch logic."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import fastdiff.kernels as kernels
import fastdiff.kernels.attention as attention_kernels
import fastdiff.kernels.group_norm as group_norm_kernels
import pytest
import torch
import triton

from fastdiff.ops import backend as ops_backend
from fastdiff.ops import compile_ahead, group_norm, group_norm_reference, use_backend
from tests.ops.helpers import INTERPRET


class FakeKernel:
    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append(("launch", grid, args, kwargs))

    def run(self, *args, grid, warmup, **kwargs):
        self.calls.append(("compile", grid, args, {**kwargs, "warmup": warmup}))


@pytest.fixture
def compiled_ahead(monkeypatch):
    """compile_ahead as on a GPU machine (it is a no-op under the interpreter)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    used = []

    class Mode:
        def __init__(self, pool, ignore_errors):
            used.append(("mode", ignore_errors))

        def __enter__(self):
            used.append("enter")

        def __exit__(self, *exc):
            used.append("exit")

    monkeypatch.setattr(kernels, "_async_compile_mode", lambda: Mode)
    return used


def test_a_launch_runs_the_kernel_outside_compile_ahead():
    kernel, out = FakeKernel(), torch.ones(3)
    kernels.launch(kernel, (4,), out, 7, BLOCK=16, outputs=(out,))
    assert kernel.calls == [("launch", (4,), (out, 7), {"BLOCK": 16})]
    assert out.tolist() == [1.0, 1.0, 1.0]


def test_inside_compile_ahead_a_launch_compiles_and_zeroes_its_outputs(compiled_ahead):
    kernel, out, source = FakeKernel(), torch.ones(3), torch.ones(3)
    with kernels.compile_ahead(threads=2):
        assert kernels.compiling_ahead()
        kernels.launch(kernel, (4,), source, out, BLOCK=16, outputs=(out,))
    assert not kernels.compiling_ahead()
    assert kernel.calls == [("compile", (4,), (source, out), {"BLOCK": 16, "warmup": True})]
    assert out.tolist() == [0.0, 0.0, 0.0] and source.tolist() == [1.0, 1.0, 1.0]
    assert compiled_ahead == [("mode", True), "enter", "exit"]


def test_the_pass_adds_its_forward_and_wait_seconds_to_timing(compiled_ahead, monkeypatch):
    """``timing`` splits a pass into the code inside (forward_s) and the wait when leaving for
    the compilations still running (wait_s), added up over passes; entering the pass's pools
    counts in neither. Under the interpreter (no pass) it is left alone."""
    clock = iter([0.0, 1.0, 5.0, 7.0, 10.0, 10.5, 11.0, 11.25])
    monkeypatch.setattr(kernels.time, "perf_counter", lambda: next(clock))
    timing: dict = {}
    with kernels.compile_ahead(threads=2, timing=timing):
        pass
    assert timing == {"forward_s": 4.0, "wait_s": 2.0}
    with pytest.raises(RuntimeError, match="boom"):  # an error inside still counts
        with kernels.compile_ahead(threads=2, timing=timing):
            raise RuntimeError("boom")
    assert timing == {"forward_s": 4.5, "wait_s": 2.25}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with kernels.compile_ahead(threads=2, timing=timing):
        pass
    assert timing == {"forward_s": 4.5, "wait_s": 2.25}


def test_one_thread_compiles_in_place_and_the_flag_resets_after_an_error(compiled_ahead):
    with pytest.raises(RuntimeError, match="boom"), kernels.compile_ahead(threads=1):
        assert kernels.compiling_ahead()
        raise RuntimeError("boom")
    assert not kernels.compiling_ahead()
    assert compiled_ahead == []  # no background threads for one


def test_a_nested_compile_ahead_is_part_of_the_outer_one(compiled_ahead):
    with kernels.compile_ahead(threads=2):
        with kernels.compile_ahead(threads=2):
            assert kernels.compiling_ahead()
        assert kernels.compiling_ahead()  # the inner exit did not end the pass
    assert compiled_ahead == [("mode", True), "enter", "exit"]


def test_without_async_compile_the_pass_compiles_serially(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(kernels, "_async_compile_mode", lambda: None)
    kernel = FakeKernel()
    with kernels.compile_ahead(threads=4):
        kernels.launch(kernel, (1,), BLOCK=2)
    assert [call[0] for call in kernel.calls] == ["compile"]


def test_prepare_launcher_builds_each_signatures_launcher_once_and_leaves_failures(
    monkeypatch,
):
    """prepare_launcher hands the driver's launcher class the kernel's source and metadata,
    once per argument-type signature (the launcher's C source depends on nothing else); a
    driver without one (compile-only) is skipped, and a launcher that fails to build does not
    fail the pass: the kernel's first launch builds it again and raises there."""
    from triton.runtime import driver

    built = []

    class Driver:
        def launcher_cls(self, src, metadata):
            built.append((src.name, metadata))
            if src.name == "broken":
                raise RuntimeError("cc: not found")

    def kernel(name, *types):
        source = type("Source", (), {"name": name, "signature": dict(enumerate(types))})()
        return type("Kernel", (), {"src": source, "metadata": "meta"})()

    monkeypatch.setattr(kernels, "_launchers_started", set())
    monkeypatch.setattr(driver, "_active", Driver())
    kernels.prepare_launcher(kernel("a", "*fp16", "i32", "constexpr"))
    kernels.prepare_launcher(kernel("a-other-size", "*fp16", "i32", "constexpr"))  # same types
    kernels.prepare_launcher(kernel("broken", "*fp16", "i64"))
    kernels.prepare_launcher(None)  # AsyncCompileMode's result for a failed compile
    assert built == [("a", "meta"), ("broken", "meta")]
    monkeypatch.setattr(driver, "_active", object())  # a compile-only driver: no launcher
    kernels.prepare_launcher(kernel("b", "*fp32"))
    assert len(built) == 2


def test_the_threaded_pass_builds_each_launcher_in_the_thread_that_compiled_its_kernel(
    monkeypatch,
):
    """The executor compile_ahead hands Triton's AsyncCompileMode runs each compilation and
    then prepare_launcher on its result, in the same pool thread, before the future is done."""
    import threading

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    executors, built = [], []

    class Mode:
        def __init__(self, executor, ignore_errors):
            executors.append(executor)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    monkeypatch.setattr(kernels, "_async_compile_mode", lambda: Mode)
    monkeypatch.setattr(
        kernels, "prepare_launcher", lambda kernel: built.append((kernel, threading.get_ident()))
    )
    with kernels.compile_ahead(threads=2):
        future = executors[0].submit(lambda: ("kernel", threading.get_ident()))
        kernel = future.result()
    assert kernel[0] == "kernel" and built == [(kernel, kernel[1])]
    assert kernel[1] != threading.get_ident()


def test_the_triton_in_use_has_async_compile_mode():
    """Both Triton versions fastdiff runs on (3.6 on the GPU machine, 3.9 here) have it: a
    Triton without it would silently compile one kernel after another."""
    pytest.importorskip("triton")
    assert kernels._async_compile_mode() is not None


@pytest.mark.skipif(not INTERPRET, reason="checks the interpreter's behaviour")
def test_under_the_interpreter_compile_ahead_runs_the_kernels():
    """Nothing to compile there: the pass is a plain run, with real results."""
    x = torch.randn(2, 8, 4, 4)
    with use_backend("triton"), compile_ahead():
        assert not kernels.compiling_ahead()
        out = group_norm(x, 4, None, None, silu=True)
    torch.testing.assert_close(out, group_norm_reference(x, 4, None, None, silu=True))


def test_a_compiled_ahead_single_pass_kernel_is_not_yet_known_to_work(monkeypatch):
    """The single-pass GroupNorm kernel falls back to the split reduction when it fails at its
    first use, but raises once it has worked: a launch that only compiled must not count as
    having worked."""
    monkeypatch.setattr(group_norm_kernels, "_single_pass_state", "untried")
    monkeypatch.setattr(group_norm_kernels, "launch", lambda *args, **kwargs: None)
    monkeypatch.setattr(group_norm_kernels, "compiling_ahead", lambda: True)
    x = torch.randn(2, 8, 4, 4)
    group_norm_kernels.group_norm_forward(x, 4, None, None, 1e-5, False)
    assert group_norm_kernels._single_pass_state == "untried"
    monkeypatch.setattr(group_norm_kernels, "compiling_ahead", lambda: False)
    group_norm_kernels.group_norm_forward(x, 4, None, None, 1e-5, False)
    assert group_norm_kernels._single_pass_state == "works"


def test_the_ops_compile_ahead_enters_the_kernels_pass(compiled_ahead, monkeypatch):
    """fastdiff.ops.compile_ahead (what CudaGraphBackend enters before its warm-up) is the
    kernels' pass where Triton is installed, and a no-op where it is not."""
    with compile_ahead():
        assert kernels.compiling_ahead()
    assert compiled_ahead == [("mode", True), "enter", "exit"]
    monkeypatch.setattr(ops_backend, "triton_available", lambda: False)
    with compile_ahead():
        assert not kernels.compiling_ahead()


def record_launches(monkeypatch) -> list:
    calls = []

    def fake_launch(kernel, grid, *args, outputs=(), **kwargs):
        calls.append((kernel, outputs, kwargs))

    monkeypatch.setattr(attention_kernels, "launch", fake_launch)
    monkeypatch.setattr(attention_kernels, "compiling_ahead", lambda: True)
    monkeypatch.setattr(attention_kernels, "_lone_configs", {})
    return calls


GPU_CONFIGS = [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
    for m, n, w, s in attention_kernels._GPU_SHAPES + attention_kernels._FP32_SHAPES
]


def test_compiled_ahead_an_autotuned_attention_compiles_each_pruned_candidate(monkeypatch):
    """Inside compile_ahead the autotuner is not launched (it would time candidates on skipped
    launches): each candidate the pruning keeps for the shape is compiled, none of the others,
    with the options in the order the autotuner's timing launches pass them (Triton's cache key),
    zeroing the output."""
    monkeypatch.setenv("FASTDIFF_AUTOTUNE", "1")
    monkeypatch.setattr(attention_kernels.attention_forward_kernel, "configs", GPU_CONFIGS)
    calls = record_launches(monkeypatch)
    q, k, v = (torch.randn(1, 2, 256, 64, dtype=torch.float16) for _ in range(3))
    out = attention_kernels.attention_forward(q, k, v)
    named = {"q_ptr": q, "N_QUERIES": 256, "N_KEYS": 256}
    candidates = attention_kernels._prune(GPU_CONFIGS, named, BLOCK_D=64, BLOCK_DT=0)
    assert 1 < len(candidates) < len(GPU_CONFIGS)
    assert len(calls) == len(candidates)
    for (kernel, outputs, options), config in zip(calls, candidates, strict=True):
        assert kernel is attention_kernels.attention_forward_kernel.fn
        assert outputs == (out,)
        wanted = config.all_kwargs()
        assert list(options.items())[-len(wanted) :] == list(wanted.items())


def test_compiled_ahead_a_lone_attention_config_compiles_that_one(monkeypatch):
    """fp32 (one spill-free config): the launch compiles the kernel it would run, directly."""
    monkeypatch.setattr(attention_kernels.attention_forward_kernel, "configs", GPU_CONFIGS)
    calls = record_launches(monkeypatch)
    q, k, v = (torch.randn(1, 2, 24, 64) for _ in range(3))
    out = attention_kernels.attention_forward(q, k, v)
    kernel, options = attention_kernels.lone_config(q, 24, 24, 64, 0)
    assert kernel is attention_kernels.attention_forward_kernel.fn
    assert [(c[0], c[1]) for c in calls] == [(kernel, (out,))]
    assert {name: calls[0][2][name] for name in options} == options


@pytest.mark.parametrize("channels", [8, 1024], ids=["single-pass", "split-reduction"])
def test_compiled_ahead_group_norm_zeroes_the_tensor_it_returns(monkeypatch, channels):
    """Launches that only compile leave their outputs unwritten: GroupNorm's returned tensor is
    among the outputs some launch zeroes, on both of its paths."""
    import fastdiff.kernels.group_norm_split as group_norm_split

    monkeypatch.setattr(group_norm_kernels, "_single_pass_state", "untried")
    zeroed = []

    def fake_launch(kernel, grid, *args, outputs=(), **kwargs):
        zeroed.extend(tensor.data_ptr() for tensor in outputs)

    monkeypatch.setattr(group_norm_kernels, "launch", fake_launch)
    monkeypatch.setattr(group_norm_split, "launch", fake_launch)
    monkeypatch.setattr(group_norm_kernels, "compiling_ahead", lambda: True)
    x = torch.randn(1, channels, 32, 32)
    y = group_norm_kernels.group_norm_forward(x, 4, None, None, 1e-5, False)
    assert y.data_ptr() in zeroed


NEEDS_CUDA_BACKEND = pytest.mark.skipif(
    not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists(),
    reason="no Triton CUDA backend",
)


def run_script(script: str, cache_dir, *args: str):
    """``script`` (it compiles for sm_90 through benchmarks/triton_sm90.py) in a fresh process
    without the interpreter and with a Triton cache of its own; its last line, parsed as JSON."""
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache_dir)
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


LAUNCHERS_SCRIPT = """
import json, sys, threading
sys.path.insert(0, "benchmarks")
import triton_sm90  # compile_only(): launches compile for sm_90, nothing runs
import torch
from triton.runtime import driver
from fastdiff.kernels import compile_ahead
from fastdiff.kernels.geglu import geglu_forward

def types(src):
    return " ".join(map(str, src.signature.values()))

built = []
with triton_sm90.compile_only() as produced:
    driver.active.launcher_cls = lambda src, metadata: built.append(
        [types(src), threading.current_thread() is threading.main_thread()]
    )
    with compile_ahead(threads=2):
        for rows, width in ((4, 16), (4, 32), (1, 64)):  # one row: another signature
            geglu_forward(torch.randn(rows, 2 * width))
    built_in_pass = list(built)
    for rows, width in ((4, 16), (4, 32), (1, 64)):  # the kernels, compiled (in memory)
        geglu_forward(torch.randn(rows, 2 * width))
needed = {types(k.src) for _, k in produced if k is not None and not hasattr(k, "result")}
print(json.dumps({"built": built_in_pass, "needed": sorted(needed)}))
"""


@NEEDS_CUDA_BACKEND
def test_leaving_the_pass_every_kernel_has_its_launcher_built_in_a_thread(tmp_path):
    """Triton 3.6 compiles a C launcher at each kernel signature's first launch, one after
    another in the warm-up run after the pass. The pass builds it before it ends, off the main
    thread, once per argument-type signature, in the thread that compiled the kernel (through
    Triton's AsyncCompileMode)."""
    report = run_script(LAUNCHERS_SCRIPT, tmp_path)
    built = sorted(types for types, _ in report["built"])
    assert built == report["needed"] and len(built) == 2, report
    assert not any(on_main for _, on_main in report["built"]), report
