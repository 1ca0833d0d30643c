"""compile_ahead (fastdiff/kernels/__init__.py): a pass in which the launchers compile their
kernels instead of running them, all at once in threads. The compile itself is checked for sm_90
in test_triton_sm90.py (a U-Net's second forward must compile nothing); here the launch logic."""

from __future__ import annotations

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


def call_hook(data: str, jit_function="jit"):
    """What Triton's JIT passes its jit_cache_hook for one compilation."""
    from triton import knobs

    info = type("Info", (), {"module": "fastdiff.kernels.m", "name": "k", "jit_function": None})()
    info.jit_function = jit_function
    return knobs.runtime.jit_cache_hook(
        key="key", repr="k[...]", fn=info, compile={"specialization_data": data}
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


def test_a_dead_worker_is_reported_not_waited_for(monkeypatch):
    """A worker that exits (here: a Python that fails at once) answers each request with an
    error, which leaves the kernel to the parent, instead of hanging the pass."""
    from fastdiff.kernels import compile_processes

    monkeypatch.setattr(compile_processes.sys, "executable", "/bin/false")
    pool = compile_processes.Pool(1)
    try:
        error = pool.submit('{"module": "m"}').result(timeout=30)
    finally:
        pool.close()
    assert error.startswith("worker not ready: worker exited (status 1)")


def test_a_worker_that_cannot_start_is_reported_not_raised(monkeypatch, tmp_path):
    """The backend starts the workers when it is built: a Python that cannot be run must not
    fail optimize(); its kernels go to the parent."""
    from fastdiff.kernels import compile_processes

    monkeypatch.setattr(compile_processes.sys, "executable", str(tmp_path / "no-python"))
    pool = compile_processes.Pool(2)
    try:
        errors = [pool.submit("{}").result(timeout=30) for _ in range(3)]
    finally:
        pool.close()
    assert all(e.startswith("worker not ready: worker could not start: ") for e in errors)


def test_a_silent_worker_is_killed_after_the_timeout(monkeypatch, tmp_path):
    """A worker stuck in its imports (or in a compiler) is killed when the timeout passes; each
    of its requests then fails at once with the reason, leaving those kernels to the parent."""
    from fastdiff.kernels import compile_processes

    stuck = tmp_path / "stuck.sh"
    stuck.write_text("#!/bin/sh\nexec sleep 60\n")
    stuck.chmod(0o755)
    monkeypatch.setattr(compile_processes.sys, "executable", str(stuck))
    monkeypatch.setattr(compile_processes, "READY_TIMEOUT_S", 0.5)
    pool = compile_processes.Pool(1)
    try:
        first = pool.submit('{"module": "m"}').result(timeout=30)
        second = pool.submit('{"module": "m"}').result(timeout=5)
    finally:
        pool.close()
    assert first == second == "worker not ready: worker killed after 0.5 s without an answer"
