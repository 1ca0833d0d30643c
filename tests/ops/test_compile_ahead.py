"""compile_ahead (fastdiff/kernels/__init__.py): a pass in which the launchers compile their
kernels instead of running them, all at once in threads. The compile itself is checked for sm_90
in test_triton_sm90.py (a U-Net's second forward must compile nothing); here the launch logic."""

from __future__ import annotations

import importlib
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


# ---- worker processes (kernels/compile_processes.py) ------------------------------------------
# The compile in the workers is checked for sm_90 in test_triton_sm90.py; here the recording.


def call_hook(data: str, jit_function="jit", warmup: bool = True):
    """What Triton's JIT passes its jit_cache_hook for one compilation (``warmup``: a
    compile-only launch, as fastdiff.kernels.launch makes inside the pass)."""
    from triton import knobs

    info = type("Info", (), {"module": "fastdiff.kernels.m", "name": "k", "jit_function": None})()
    info.jit_function = jit_function
    return knobs.runtime.jit_cache_hook(
        key="key",
        repr="k[...]",
        fn=info,
        compile={"specialization_data": data},
        is_manual_warmup=warmup,
        already_compiled=False,
    )


def test_recording_takes_each_kernel_once_and_only_in_the_pass():
    """Inside the pass a compilation is recorded, handed to the workers the first time, and
    skipped (the hook returns True); where active() is false (another thread, or after the
    pass) it goes on as usual; the hook is removed after."""
    from fastdiff.kernels import compile_processes
    from triton import knobs

    active, submitted = [True], []
    with compile_processes.recording(lambda: active[0], submitted.append) as requests:
        assert call_hook("spec-a") is True and call_hook("spec-a") is True
        assert call_hook("spec-b") is True
        active[0] = False
        assert call_hook("spec-c") is None  # compiled and run as usual
    assert (
        [r.data for r in submitted] == ["spec-a", "spec-b"] == [r.data for r in requests.values()]
    )
    assert submitted[0].module == "fastdiff.kernels.m" and submitted[0].qualname == "k"
    message = submitted[0].message({"backend": "cuda", "arch": 90, "warp_size": 32})
    assert '"target": {"backend": "cuda", "arch": 90' in message
    assert knobs.runtime.jit_cache_hook is None


def test_recording_refuses_to_replace_another_hook_and_compile_ahead_then_uses_threads(
    compiled_ahead, monkeypatch
):
    from fastdiff.kernels import compile_processes
    from triton import knobs

    def theirs(**_):
        return None

    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", theirs)
    with pytest.raises(RuntimeError, match="another Triton jit_cache_hook"):
        with compile_processes.recording(lambda: True, lambda request: None):
            pass
    assert knobs.runtime.jit_cache_hook is theirs
    # compile_ahead with processes asked for leaves their hook alone and takes the threads.
    monkeypatch.setattr(compile_processes, "compiling", None)  # would fail if used
    with kernels.compile_ahead(threads=2, processes=4):
        assert kernels.compiling_ahead()
    assert compiled_ahead == [("mode", True), "enter", "exit"]
    assert knobs.runtime.jit_cache_hook is theirs


def test_compile_processes_setting(monkeypatch):
    from fastdiff.kernels import compile_processes

    monkeypatch.delenv("FASTDIFF_COMPILE_PROCESSES", raising=False)
    assert compile_processes.compile_processes() == 0  # threads, until measured on a GPU
    monkeypatch.setenv("FASTDIFF_COMPILE_PROCESSES", "8")
    assert compile_processes.compile_processes() == 8
    for bad in ("-1", "eight", "2.5"):
        monkeypatch.setenv("FASTDIFF_COMPILE_PROCESSES", bad)
        with pytest.raises(ValueError, match=f"FASTDIFF_COMPILE_PROCESSES must be .* got '{bad}'"):
            compile_processes.compile_processes()


def test_the_triton_in_use_supports_the_process_pass():
    from fastdiff.kernels import compile_processes

    assert compile_processes.supported()


REAL_START = importlib.import_module("fastdiff.kernels.compile_processes").start


class FakePool:
    """The workers as the pass sees them: each submitted message is kept, and its future is
    answered only when the test says (``answer``)."""

    def __init__(self):
        self.messages: list[str] = []
        self.futures: list = []

    def submit(self, message: str):
        from concurrent.futures import Future

        self.messages.append(message)
        self.futures.append(Future())
        return self.futures[-1]

    def answer(self, errors: list[str]) -> None:
        for future, error in zip(self.futures, errors, strict=True):
            future.set_result(error)


class FakeJit:
    """A JIT function's preload, recorded with whether every worker had answered by then."""

    def __init__(self, pool: FakePool, error: Exception | None = None):
        self.pool, self.error, self.loaded = pool, error, []

    def preload(self, data: str):
        self.loaded.append((data, all(future.done() for future in self.pool.futures)))
        if self.error is not None:
            raise self.error


@pytest.fixture
def process_pass(monkeypatch):
    """compile_ahead(processes=...) as on a GPU machine (sm_90), its workers a FakePool."""
    from fastdiff.kernels import compile_processes
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", None)
    target = GPUTarget("cuda", 90, 32)
    gpu = type("Driver", (), {"get_current_target": lambda self: target})()
    monkeypatch.setattr(driver, "_active", gpu)
    pool = FakePool()
    monkeypatch.setattr(compile_processes, "start", lambda size: pool)
    monkeypatch.setattr(compile_processes, "last_pass", {"kernels": 0, "failed": []})
    return pool


def test_the_process_pass_records_only_its_own_thread_and_cleans_up_after_an_error(
    process_pass,
):
    """With processes the pass installs the hook for the thread inside it only (a launch in
    another thread, whose context is not in the pass, compiles and runs as usual: skipping it
    would leave its outputs unwritten), sends each kernel with the GPU's target, and an error
    inside leaves neither the hook nor the flag behind."""
    import json
    import threading

    from triton import knobs

    with pytest.raises(RuntimeError, match="boom"):
        with kernels.compile_ahead(threads=2, processes=2):
            assert kernels.compiling_ahead() and knobs.runtime.jit_cache_hook is not None
            assert call_hook("spec-a") is True
            elsewhere = []
            thread = threading.Thread(target=lambda: elsewhere.append(call_hook("spec-b")))
            thread.start()
            thread.join()

            def own_threaded_pass():  # another thread inside a compile_ahead of its own
                token = kernels._compiling_ahead.set(True)
                elsewhere.append(call_hook("spec-c"))
                kernels._compiling_ahead.reset(token)

            thread = threading.Thread(target=own_threaded_pass)
            thread.start()
            thread.join()
            # A direct kernel[grid](...) inside the pass (not a compile-only launch) runs.
            elsewhere.append(call_hook("spec-d", warmup=False))
            assert elsewhere == [None, None, None]
            raise RuntimeError("boom")
    assert not kernels.compiling_ahead() and knobs.runtime.jit_cache_hook is None
    sent = [json.loads(message) for message in process_pass.messages]
    assert [m["data"] for m in sent] == ["spec-a"]
    assert sent[0]["target"] == {"backend": "cuda", "arch": 90, "warp_size": 32}


def test_the_process_pass_waits_for_the_workers_then_preloads_each_kernel(process_pass):
    """Leaving the pass waits for every worker's answer, then preloads each recorded kernel once
    (a preload before its worker is done would compile it in the parent); a kernel whose
    preload fails does not fail the pass (it raises again at its first launch), and the
    workers' errors are kept in last_pass."""
    import threading

    from fastdiff.kernels import compile_processes

    good, bad = FakeJit(process_pass), FakeJit(process_pass, RuntimeError("no such kernel"))
    with kernels.compile_ahead(threads=2, processes=2):
        assert call_hook("spec-a", good) is True and call_hook("spec-a", good) is True
        assert call_hook("spec-b", bad) is True
        threading.Timer(0.3, process_pass.answer, args=(["", "CompileError: x"],)).start()
    assert good.loaded == [("spec-a", True)] and bad.loaded == [("spec-b", True)]
    assert compile_processes.last_pass == {"kernels": 2, "failed": ["CompileError: x"]}
    assert not kernels.compiling_ahead()


def fake_worker_script(tmp_path, body: str) -> str:
    """An executable standing in for ``python -m fastdiff.kernels.compile_processes FD``: its
    third argument is the reply pipe's descriptor."""
    script = tmp_path / "worker.sh"
    script.write_text("#!/bin/bash\n" + body)
    script.chmod(0o755)
    return str(script)


@pytest.mark.parametrize(
    "script, reason",
    [
        (None, "worker not ready: worker could not start: "),
        ("exit 1\n", "worker not ready: worker exited (status 1)"),
        ("exec sleep 60\n", "worker not ready: worker killed after 0.5 s without an answer"),
        ("echo '\"ready\"' >&$3\nread line\nexit 3\n", "worker exited (status 3)"),
        ("exec 0<&-\necho '\"ready\"' >&$3\nsleep 1\n", "worker unavailable: "),
    ],
    ids=["cannot-start", "exits-at-once", "silent", "exits-while-compiling", "stops-reading"],
)
def test_a_failing_worker_is_reported_not_waited_for(monkeypatch, tmp_path, script, reason):
    """A worker that cannot start, exits, stays silent past the timeout (killed then: it would
    hold a core and its memory), exits while compiling or stops reading: its request gets the
    reason, which leaves the kernel to the parent, and it takes no more requests. Nothing raises
    into the pass (the backend starts the workers when it is built: optimize() must not fail)
    and nothing hangs it."""
    import signal

    from fastdiff.kernels import compile_processes

    executable = str(tmp_path / "no-python") if script is None else None
    executable = executable or fake_worker_script(tmp_path, script)
    monkeypatch.setattr(compile_processes.sys, "executable", executable)
    monkeypatch.setattr(compile_processes, "READY_TIMEOUT_S", 0.5)
    pool = compile_processes.Pool(1)
    (worker,) = pool.workers
    try:
        first = pool.submit('{"module": "m"}').result(timeout=30)
        second = pool.submit('{"module": "m"}').result(timeout=30)
    finally:
        pool.close()
    assert first.startswith(reason), first
    assert second == f"no compile worker left ({worker.dead})", second
    if script == "exec sleep 60\n":
        assert worker.process.wait(timeout=5) == -signal.SIGKILL


class FakeWorker:
    """A worker that compiles everything at once, without a process; ``fail`` makes it die
    at its next message, as a crashed compiler's worker does."""

    def __init__(self):
        self.closed, self.dead, self.fail, self.answered = False, None, False, 0

    def wait_ready(self) -> bool:
        return True

    def compile(self, message: str) -> str:
        self.answered += 1
        if self.fail:
            self.dead = "worker exited (status -11)"
        return self.dead or ""

    def close(self) -> None:
        self.closed = True


def test_start_keeps_enough_workers_and_grows_the_same_pool(monkeypatch):
    """The backend starts the workers when it is built and each pass asks for them again: the
    same pool comes back (their imports are not paid twice), grown in place, not replaced,
    where more workers are asked for (a pass in progress keeps submitting to it)."""
    from fastdiff.kernels import compile_processes

    monkeypatch.setattr(compile_processes, "Worker", FakeWorker)
    monkeypatch.setattr(compile_processes, "_pool", None)
    try:
        pool = compile_processes.start(2)
        assert compile_processes.start(2) is pool and compile_processes.start(1) is pool
        assert compile_processes.start(3) is pool and len(pool.workers) == 3
        assert not any(worker.closed for worker in pool.workers)
    finally:
        compile_processes.stop()


def test_a_dead_worker_gets_no_more_work_and_is_replaced(monkeypatch):
    """A dead worker answers at once, so handed back to the queue it would take nearly every
    message (each then left to the parent). It is not handed back: the live worker compiles the
    rest, start() replaces the dead one, and with none alive messages fail at once."""
    from fastdiff.kernels import compile_processes

    monkeypatch.setattr(compile_processes, "Worker", FakeWorker)
    monkeypatch.setattr(compile_processes, "_pool", None)
    try:
        pool = compile_processes.start(2)
        doomed, healthy = pool.workers
        doomed.fail = True
        pool.idle = [healthy, doomed]  # the doomed one is taken first
        errors = [pool.submit("m").result(timeout=10) for _ in range(6)]
        assert errors == ["worker exited (status -11)"] + [""] * 5
        assert doomed.answered == 1 and healthy.answered == 5 and pool.live() == 1
        assert compile_processes.start(2) is pool and pool.live() == 2  # one new worker
        for worker in pool.workers:
            worker.fail = True
        assert [pool.submit("m").result(timeout=10) for _ in range(3)][-1] == (
            "no compile worker left (worker exited (status -11))"
        )
    finally:
        compile_processes.stop()


def test_more_workers_asked_for_during_a_pass_do_not_break_it(process_pass, monkeypatch):
    """A pass in progress (here recording its kernels) while another thread asks for more
    workers (a backend built with a larger FASTDIFF_COMPILE_PROCESSES, or compile_ahead with
    ``processes``): the pass's later kernels still compile and every kernel is preloaded."""
    import threading

    from fastdiff.kernels import compile_processes

    monkeypatch.setattr(compile_processes, "Worker", FakeWorker)
    monkeypatch.setattr(compile_processes, "_pool", None)
    monkeypatch.setattr(compile_processes, "start", REAL_START)  # the fixture's is fake
    first, second = FakeJit(process_pass), FakeJit(process_pass)
    try:
        with compile_processes.compiling(1):
            call_hook("spec-a", first)
            grow = threading.Thread(target=compile_processes.start, args=(2,))
            grow.start()
            grow.join()
            call_hook("spec-b", second)
    finally:
        compile_processes.stop()
    assert [data for data, _ in first.loaded + second.loaded] == ["spec-a", "spec-b"]


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
    with compile_ahead(threads=2, processes=int(sys.argv[1])):
        for rows, width in ((4, 16), (4, 32), (1, 64)):  # one row: another signature
            geglu_forward(torch.randn(rows, 2 * width))
    built_in_pass = list(built)
    for rows, width in ((4, 16), (4, 32), (1, 64)):  # the kernels, compiled (in memory)
        geglu_forward(torch.randn(rows, 2 * width))
needed = {types(k.src) for _, k in produced if k is not None and not hasattr(k, "result")}
print(json.dumps({"built": built_in_pass, "needed": sorted(needed)}))
"""


@NEEDS_CUDA_BACKEND
@pytest.mark.parametrize("processes", [0, 1], ids=["threads", "processes"])
def test_leaving_either_pass_every_kernel_has_its_launcher_built_in_a_thread(tmp_path, processes):
    """Triton 3.6 compiles a C launcher at each kernel signature's first launch, one after
    another in the warm-up run after the pass. Both passes build it before they end, off the
    main thread, once per argument-type signature: the threaded one in the thread that
    compiled the kernel (through Triton's AsyncCompileMode), the process pass in threads after
    the parent loads the workers' kernels."""
    report = run_script(LAUNCHERS_SCRIPT, tmp_path, str(processes))
    built = sorted(types for types, _ in report["built"])
    assert built == report["needed"] and len(built) == 2, report
    assert not any(on_main for _, on_main in report["built"]), report


PARENT_LOADS_SCRIPT = """
import json, sys
sys.path.insert(0, "benchmarks")
import triton_sm90  # compile_only(): launches compile for sm_90, nothing runs
import torch
from triton import knobs
from fastdiff.kernels import compile_ahead, compile_processes
from fastdiff.kernels.geglu import geglu_forward

compiles = []  # one per compilation in this process: True where the disk cache had it
knobs.compilation.listener = lambda *, cache_hit, **_: compiles.append(cache_hit)
with triton_sm90.compile_only():
    with compile_ahead(threads=1, processes=1):
        for width in (16, 32, 64):
            geglu_forward(torch.randn(4, 2 * width))
    before = len(compiles)
    for width in (16, 32, 64):
        geglu_forward(torch.randn(4, 2 * width))
print(json.dumps({"compiles": compiles, "after": len(compiles) - before,
                  "last_pass": compile_processes.last_pass}))
"""


@NEEDS_CUDA_BACKEND
def test_the_parent_loads_each_kernel_the_workers_compiled_from_the_disk_cache(tmp_path):
    """The point of the workers: the parent compiles nothing itself. Each kernel the pass meets
    is compiled by a worker for sm_90 into the disk cache the parent reads (same cache
    directory, same cache key), and the parent's preload finds it there (a cache hit); the
    launches after find it in memory. A worker compiling into another cache, or a preload that
    does not wait for its worker, would pass every other check while the parent compiled each
    kernel again, one after another."""
    report = run_script(PARENT_LOADS_SCRIPT, tmp_path)
    assert report["last_pass"] == {"kernels": 3, "failed": []}, report
    assert report["compiles"] == [True, True, True] and report["after"] == 0, report
