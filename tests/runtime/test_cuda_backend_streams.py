"""CudaGraphBackend's stream and device handling, on CPU, against a model of torch.cuda.

The model reproduces what matters of PyTorch (torch/cuda/__init__.py StreamContext,
torch/cuda/graphs.py graph): an op runs on the current stream *of its tensor's device*; only
launches on the capturing stream enter the graph; ``torch.cuda.graph`` creates its default capture
stream once, on the device current at that moment; and its ``__exit__`` ends the capture before it
restores the stream, so when the body raised, capture_end's own error replaces the body's and the
capture stream stays current.
"""

from __future__ import annotations

import contextlib
import gc

import pytest
import torch

import fastdiff.runtime.graphs as graphs


class FakeCuda:
    def __init__(self, devices: int = 2):
        self.device = 0
        self.defaults = {index: FakeStream(self, index) for index in range(devices)}
        self.current = dict(self.defaults)
        self.capturing = None
        self.invalidated = False
        self.captured: list[int] = []
        self.missed: list[int] = []  # launches during a capture that did not enter the graph
        self.destroyed: list[bool] = []  # per graph destroyed: whether during a capture

    def index(self, device) -> int:
        if device is None:
            return self.device
        device = torch.device(device) if not isinstance(device, int) else device
        return device if isinstance(device, int) else (device.index or 0)

    # what an op on a tensor of ``device`` does
    def launch(self, device: int) -> None:
        if self.capturing is not None:
            into = self.captured if self.current[device] is self.capturing else self.missed
            into.append(device)

    def host_read(self) -> None:
        if self.capturing is not None:
            self.invalidated = True
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    def destroy_graph(self) -> None:
        # CUDAGraph's reset: cudaGraphExecDestroy, which a capturing stream does not permit;
        # PyTorch only warns, and the capture fails at its end
        self.destroyed.append(self.capturing is not None)
        if self.capturing is not None:
            self.invalidated = True

    def set_stream(self, stream) -> None:
        self.current[stream.device] = stream
        self.device = stream.device


class FakeStream:
    def __init__(self, cuda: FakeCuda, device: int):
        self.cuda, self.device = cuda, device

    def wait_stream(self, other) -> None:
        pass


class FakeStreamContext:  # torch.cuda.StreamContext
    def __init__(self, cuda: FakeCuda, stream):
        self.cuda, self.stream = cuda, stream

    def __enter__(self):
        self.src_prev = self.cuda.current[self.cuda.device]
        if self.src_prev.device != self.stream.device:
            self.dst_prev = self.cuda.current[self.stream.device]
        self.cuda.set_stream(self.stream)

    def __exit__(self, *args):
        if self.src_prev.device != self.stream.device:
            self.cuda.set_stream(self.dst_prev)
        self.cuda.set_stream(self.src_prev)


def install(monkeypatch, cuda: FakeCuda) -> None:
    class CUDAGraph:
        def capture_begin(self, stream):
            cuda.capturing = stream

        def capture_end(self):
            cuda.capturing = None
            if cuda.invalidated:
                cuda.invalidated = False
                raise RuntimeError(
                    "CUDA error: operation failed due to a previous error during capture"
                )

        def replay(self):
            pass

    class graph:  # torch.cuda.graph
        default_capture_stream = None

        def __init__(self, cuda_graph, pool=None, stream=None, capture_error_mode="global"):
            if stream is None and graph.default_capture_stream is None:
                graph.default_capture_stream = FakeStream(cuda, cuda.device)
            self.capture_stream = stream if stream is not None else graph.default_capture_stream
            self.stream_ctx = FakeStreamContext(cuda, self.capture_stream)
            self.cuda_graph = cuda_graph

        def __enter__(self):
            self.stream_ctx.__enter__()
            self.cuda_graph.capture_begin(self.capture_stream)

        def __exit__(self, *args):
            self.cuda_graph.capture_end()
            self.stream_ctx.__exit__(*args)

    @contextlib.contextmanager
    def device(value):
        previous, cuda.device = cuda.device, cuda.index(value)
        try:
            yield
        finally:
            cuda.device = previous

    patches = {
        "Stream": lambda device=None: FakeStream(cuda, cuda.index(device)),
        "current_stream": lambda device=None: cuda.current[cuda.index(device)],
        "stream": lambda stream: FakeStreamContext(cuda, stream),
        "device": device,
        "synchronize": lambda device=None: None,
        "empty_cache": lambda: None,
        "memory_reserved": lambda device=None: 0,
        "CUDAGraph": CUDAGraph,
        "graph": graph,
    }
    for name, value in patches.items():
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(graphs, "recover_from_failed_capture", lambda device: None)


def watch_the_pass(monkeypatch) -> list:
    """Replace the compile-ahead pass with a context that does nothing but mark itself: the
    returned list is non-empty exactly while code runs inside the pass."""
    inside: list = []

    @contextlib.contextmanager
    def ahead(timing=None):
        inside.append(True)
        try:
            yield
        finally:
            inside.pop()

    monkeypatch.setattr(graphs, "ops_compile_ahead", ahead)
    return inside


def test_capture_on_a_pipeline_device_that_is_not_the_current_one(monkeypatch):
    """A pipeline on cuda:1 while cuda:0 is current (or after an earlier capture created
    torch.cuda.graph's default capture stream on cuda:0): every kernel must enter the graph."""
    cuda = FakeCuda()
    install(monkeypatch, cuda)
    backend = graphs.CudaGraphBackend(device="cuda:1")
    backend.capture(lambda: cuda.launch(1), lambda: None)
    assert cuda.captured == [1] and cuda.missed == []
    assert cuda.current == cuda.defaults and cuda.device == 0


def test_failed_capture_names_the_first_error_and_restores_the_stream(monkeypatch):
    cuda = FakeCuda()
    install(monkeypatch, cuda)
    cache = graphs.GraphCache(graphs.CudaGraphBackend(device="cuda:0"))
    key = graphs.GraphKey("step", 1, 8, 8, torch.float16)

    def build():
        def body():
            cuda.launch(0)
            cuda.host_read()

        return None, body, lambda: None

    with pytest.raises(RuntimeError):
        cache.get(key, build)
    assert "not permitted when stream is capturing" in cache.failed(key)
    assert cuda.current == cuda.defaults and cuda.device == 0  # eager work goes on as before


@pytest.mark.parametrize("ahead", [None, True, False], ids=["default", "on", "off"])
def test_the_compile_ahead_pass_runs_first_and_only_when_asked(monkeypatch, ahead):
    """By default (what optimize() builds) one pass inside fastdiff.ops.compile_ahead() runs
    before the warm-up runs, its inputs reset first like theirs; compile_ahead=False leaves the
    warm-up runs and the capture alone."""
    cuda = FakeCuda()
    install(monkeypatch, cuda)
    events = []

    @contextlib.contextmanager
    def spy(timing=None):
        events.append("enter")
        yield
        events.append("exit")

    monkeypatch.setattr(graphs, "ops_compile_ahead", spy)
    options = {} if ahead is None else {"compile_ahead": ahead}
    backend = graphs.CudaGraphBackend(warmup_runs=2, device="cuda:0", **options)
    backend.capture(lambda: events.append("body"), lambda: events.append("prepare"))
    runs = ["prepare", "body"] * 3  # two warm-up runs, then the capture
    assert events == (["enter", "prepare", "body", "exit"] if ahead is not False else []) + runs


def test_a_body_that_fails_in_the_compile_ahead_pass_is_still_captured(monkeypatch):
    """The pass only gives the compiler a head start: a body that fails on its zeroed tensors
    (here: raises whenever the pass is on) still warms up and is captured, and the pass's
    context is left before the warm-up runs."""
    cuda = FakeCuda()
    install(monkeypatch, cuda)
    events, inside = [], watch_the_pass(monkeypatch)

    def body():
        if inside:
            raise ValueError("index out of range on zeros")
        events.append("body")

    backend = graphs.CudaGraphBackend(warmup_runs=2, device="cuda:0")
    graph, _ = backend.capture(body, lambda: events.append("prepare"))
    runs = ["prepare", "body"] * 3  # two warm-up runs and the capture, after the failed pass
    assert graph is not None and events == ["prepare", *runs] and inside == []


@pytest.mark.parametrize("fails", [False, True], ids=["also", "also-fails"])
def test_also_runs_once_in_the_compile_ahead_pass_after_the_body(monkeypatch, fails):
    """``also`` (what follows the graph: the VAE decode after the denoising loop) runs inside
    the pass, after the body, so its kernels compile with the body's; it is not warmed up or
    captured, and when it fails there the body is still warmed up and captured."""
    cuda = FakeCuda()
    install(monkeypatch, cuda)
    events, inside = [], watch_the_pass(monkeypatch)

    def also():
        events.append(("also", bool(inside)))
        if fails:
            raise torch.cuda.OutOfMemoryError("the decoder, on zeros")

    backend = graphs.CudaGraphBackend(warmup_runs=2, device="cuda:0")
    graph, _ = backend.capture(lambda: events.append("body"), lambda: None, also=also)
    assert graph is not None and events == ["body", ("also", True), "body", "body", "body"]
    off = graphs.CudaGraphBackend(warmup_runs=1, device="cuda:0", compile_ahead=False)
    events.clear()
    off.capture(lambda: events.append("body"), lambda: None, also=also)
    assert events == ["body", "body"]  # no pass, no also


@pytest.mark.parametrize("ahead", [True, False], ids=["compile-ahead", "no-pass"])
def test_a_capture_times_its_phases(monkeypatch, ahead):
    """last_phases: the compile-ahead pass (when on), the warm-up runs and the capture, each
    timed apart (GraphCache keeps them with the entry; the benchmarks print them), and the
    seconds the passes since the last capture (a probe's, this one's) waited for compilers."""
    cuda = FakeCuda()
    install(monkeypatch, cuda)

    @contextlib.contextmanager
    def timed_pass(timing=None):  # each pass waits 3 s for its compilers
        yield
        timing["wait_s"] = timing.get("wait_s", 0.0) + 3.0

    monkeypatch.setattr(graphs, "ops_compile_ahead", timed_pass)
    clock = iter(range(0, 1000, 10))
    monkeypatch.setattr(graphs.time, "perf_counter", lambda: next(clock))
    backend = graphs.CudaGraphBackend(warmup_runs=2, device="cuda:0", compile_ahead=ahead)
    backend.first_run(lambda: None)  # a probe's pass, as GraphedCall's build makes
    backend.capture(lambda: None, lambda: None)
    phases = {"warmup_runs_s": 10, "graph_capture_s": 10}
    ahead_phases = {"compile_ahead_s": 10, "compile_wait_s": 6.0}
    assert backend.last_phases == ({**ahead_phases, **phases} if ahead else phases)
    backend.capture(lambda: None, lambda: None)  # the next capture counts its own pass only
    assert backend.last_phases.get("compile_wait_s") == (3.0 if ahead else None)


def test_the_compile_ahead_default_follows_the_environment(monkeypatch):
    """FASTDIFF_COMPILE_AHEAD=0 turns the pass off where the backend is built without the
    argument (optimize(), the benchmarks); an explicit argument wins."""
    monkeypatch.delenv("FASTDIFF_COMPILE_AHEAD", raising=False)
    assert graphs.CudaGraphBackend().compile_ahead is True
    monkeypatch.setenv("FASTDIFF_COMPILE_AHEAD", "0")
    assert graphs.CudaGraphBackend().compile_ahead is False
    assert graphs.CudaGraphBackend(compile_ahead=True).compile_ahead is True
    monkeypatch.setenv("FASTDIFF_COMPILE_AHEAD", "1")
    assert graphs.CudaGraphBackend().compile_ahead is True


@pytest.mark.parametrize("ahead", [True, False], ids=["compile-ahead", "no-pass"])
def test_graphed_calls_probe_runs_inside_the_compile_ahead_pass(monkeypatch, ahead):
    """GraphedCall runs its function once before the capture to learn the output's shape. That
    first call is where every Triton kernel would compile, one by one, so with compile_ahead it
    runs inside the pass too (on the H200 the probe outside it took 18.5 of SD1.5's 18.8 s of
    first call, and capture()'s pass found nothing left to compile). The probe's output only
    shapes the static buffer: the graph's output is the captured call's."""
    from fastdiff.runtime.graphed_call import GraphedCall
    from fastdiff.runtime.optimize import describe_phases

    cuda = FakeCuda()
    install(monkeypatch, cuda)
    inside, calls = watch_the_pass(monkeypatch), []

    def fn(x):
        calls.append("ahead" if inside else "run")
        return torch.zeros_like(x) if inside else x * 2  # the pass's launches write nothing

    backend = graphs.CudaGraphBackend(warmup_runs=1, device="cuda:0", compile_ahead=ahead)
    graphed = GraphedCall(fn, graphs.GraphCache(backend), kind="vae")
    x = torch.arange(4.0)
    assert torch.equal(graphed(x), x * 2)  # the captured call's output, not the probe's zeros
    # probe, capture()'s own pass, one warm-up run, the capture
    expected = ["ahead", "ahead", "run", "run"] if ahead else ["run", "run", "run"]
    assert calls == expected and inside == []
    row = graphed.cache.report()[0]
    assert describe_phases(row).startswith(" (build ")  # the probe's time, reported first
    assert ("compile_ahead_s" in row) == ahead


def test_a_probe_that_fails_inside_the_pass_runs_again_outside(monkeypatch):
    """As with capture()'s pass: a function that fails on the pass's zeroed values (here,
    whenever the pass is on) runs plainly instead, which raises any real error."""
    cuda = FakeCuda()
    install(monkeypatch, cuda)
    inside = watch_the_pass(monkeypatch)
    backend = graphs.CudaGraphBackend(device="cuda:0")

    def fn():
        if inside:
            raise ValueError("index out of range on zeros")
        return "ran"

    assert backend.first_run(fn) == "ran" and inside == []

    def fails_on_zeros():  # any exception, not only a ValueError
        if inside:
            raise RuntimeError("CUDA error: device-side assert on an index read from zeros")
        return "ran"

    assert backend.first_run(fails_on_zeros) == "ran"
    with pytest.raises(ZeroDivisionError):
        backend.first_run(lambda: 1 / 0)


def test_the_probe_runs_on_the_backends_device(monkeypatch):
    """The probe's pass runs with the backend's device current, as capture()'s does: Triton
    compiles each kernel for the current device, so a probe
    on cuda:0 for a pipeline on cuda:1 would leave cuda:1's kernels to compile again later."""
    cuda = FakeCuda()
    install(monkeypatch, cuda)
    inside, seen = watch_the_pass(monkeypatch), []
    backend = graphs.CudaGraphBackend(device="cuda:1")
    backend.first_run(lambda: seen.append((bool(inside), cuda.device)))
    assert seen == [(True, 1)] and cuda.device == 0


class DroppedGraph:
    """A captured graph in a reference cycle, as a dropped pipeline's are (the pipeline and
    its runtime refer to each other): only the garbage collector frees it."""

    def __init__(self, cuda: FakeCuda):
        self.cuda, self.cycle = cuda, self

    def __del__(self):
        self.cuda.destroy_graph()


def test_the_garbage_collector_cannot_free_a_graph_during_a_capture(monkeypatch):
    """On the H200 (2026-11-28) a step graph's capture failed ("operation failed due to a
    previous error during capture", and CUDAGraph's "operation not permitted when stream is
    capturing (function reset)") after earlier tests had dropped their pipelines: the
    collector ran during the capture and destroyed their graphs. Here the collector would run at
    the body's first allocations; the capture holds it off, and the graph is freed after."""
    cuda = FakeCuda()
    install(monkeypatch, cuda)

    def body():
        if cuda.capturing is not None:
            DroppedGraph(cuda)  # garbage now; the collector's next run frees it
            [[] for _ in range(100)]  # allocations that start a run when the collector is on

    backend = graphs.CudaGraphBackend(warmup_runs=1, device="cuda:0", compile_ahead=False)
    thresholds = gc.get_threshold()
    gc.set_threshold(1)
    try:
        graph, _ = backend.capture(body, lambda: None)
        assert graph is not None and gc.isenabled()
    finally:
        gc.set_threshold(*thresholds)
    gc.collect()
    assert cuda.destroyed == [False]  # freed, but not during the capture


def test_the_garbage_collector_is_on_again_after_a_failed_capture_and_off_if_it_was(monkeypatch):
    cuda = FakeCuda()
    install(monkeypatch, cuda)
    backend = graphs.CudaGraphBackend(warmup_runs=0, device="cuda:0", compile_ahead=False)
    seen = []

    def fails():
        seen.append(gc.isenabled())
        cuda.host_read()

    with pytest.raises(graphs.GraphCaptureError):
        backend.capture(fails, lambda: None)
    assert seen == [False] and gc.isenabled()
    gc.disable()  # a caller's own choice is left as it was
    try:
        backend.capture(lambda: seen.append(gc.isenabled()), lambda: None)
        assert seen == [False, False] and not gc.isenabled()
    finally:
        gc.enable()
