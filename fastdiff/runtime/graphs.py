"""CUDA-graph capture and a bounded cache of captured graphs, one per shape key.

A captured graph replays a fixed sequence of kernels on fixed memory, so everything that changes
between calls (latents, embeddings, timesteps, plan coefficients, the step index) lives in static
device buffers that are refilled before a replay; see ``fastdiff.runtime.denoise``.

Capture is abstracted behind ``GraphBackend`` so the cache logic (keys, LRU bound, memory
accounting) and the static-buffer bodies are tested on CPU with ``EagerGraphBackend``, which
"replays" by calling the body again.
"""

from __future__ import annotations

import gc
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from fastdiff.ops import compile_ahead as ops_compile_ahead


@dataclass(frozen=True)
class GraphKey:
    """Everything that fixes a captured graph's kernels and buffer shapes.

    ``kind`` names the body ("loop": the whole denoising loop, "step": one denoising step replayed
    per step, "vae": VAE decode). ``steps`` is the number of unrolled steps for "loop" graphs and 1
    otherwise; ``sampler`` is part of the key for loop graphs because it decides whether noise
    buffers and the previous-x0 term exist. ``extra`` holds model-specific conditioning shapes.
    """

    kind: str
    batch: int
    height: int
    width: int
    dtype: torch.dtype
    guidance: bool = False
    steps: int = 1
    sampler: str = ""
    extra: tuple = ()

    def describe(self) -> str:
        parts = [self.kind, f"b{self.batch}", f"{self.height}x{self.width}", str(self.dtype)]
        parts[-1] = parts[-1].replace("torch.", "")
        if not self.kind.startswith("vae"):  # the decoder and encoder have no guidance or steps
            parts.append("cfg" if self.guidance else "nocfg")
            parts.append(f"{self.steps}step")
        if self.sampler:
            parts.append(self.sampler)
        return "/".join(parts)


class Replayable(Protocol):
    def replay(self) -> None: ...


class GraphBackend(Protocol):
    """Turns a body (a no-argument callable writing into static buffers) into a Replayable."""

    def capture(
        self,
        body: Callable[[], None],
        prepare: Callable[[], None],
        also: Callable[[], Any] | None = None,
    ) -> tuple[Replayable, int]:
        """Capture ``body``; return the replayable and the bytes its capture added (graph pool).
        ``also`` (given only to a backend whose ``compile_ahead`` is true): work that follows
        the graph, run after the body in the compile-ahead pass so its kernels compile with the
        body's; it is neither warmed up nor captured."""
        ...

    # Optional: ``first_run(fn) -> fn()'s result``, the call a body's builder makes before the
    # capture to learn the shapes of its outputs (GraphedCall's probe); GraphCache.first_run calls
    # ``fn`` directly when the backend has none.


class EagerReplay:
    """A "graph" that runs its body again on every replay: the CPU stand-in for a CUDA graph."""

    def __init__(self, body: Callable[[], None]):
        self.body = body

    def replay(self) -> None:
        self.body()


class EagerGraphBackend:
    """Runs bodies eagerly; used without CUDA and in tests of the cache and the buffer logic."""

    compile_ahead = False  # nothing to compile: GraphCache passes no ``also``

    def capture(
        self, body: Callable[[], None], prepare: Callable[[], None]
    ) -> tuple[EagerReplay, int]:
        return EagerReplay(body), 0


class CudaGraphBackend:
    """Captures bodies into ``torch.cuda.CUDAGraph`` objects, each with its own memory pool.

    Before capture the body runs ``warmup_runs`` times on a side stream: this lets cuDNN
    (``benchmark=True``) and Triton's autotuner pick their algorithms and allocates cuBLAS/cuDNN
    workspaces outside the capture, as PyTorch's CUDA-graph notes require. ``prepare`` resets the
    static inputs before each warm-up run (the body mutates them, e.g. the step index, and an index
    past the end of the plan would read out of bounds). With ``compile_ahead`` (the default;
    ``FASTDIFF_COMPILE_AHEAD=0`` turns it off where the argument is not given) one
    more pass runs first, inside ``fastdiff.ops.compile_ahead()``: each Triton kernel the body
    launches is compiled there, all of them at once in threads, rather than one after another
    at first launch (an SD1.5 U-Net: 44 distinct kernels, or 80 counting the attention
    autotuner's candidates, compiled for sm_90 on CPU).
    """

    def __init__(
        self,
        warmup_runs: int = 2,
        device: torch.device | str | None = None,
        compile_ahead: bool | None = None,
    ):
        self.warmup_runs = warmup_runs
        self.device = torch.device(device if device is not None else "cuda")
        if compile_ahead is None:  # on unless FASTDIFF_COMPILE_AHEAD=0
            compile_ahead = os.environ.get("FASTDIFF_COMPILE_AHEAD", "1") != "0"
        self.compile_ahead = compile_ahead
        # Seconds of the last capture's phases: the compile-ahead pass (Triton compilation),
        # the warm-up runs (autotuning, cuDNN's algorithm search, first-use allocations) and
        # the capture itself. GraphCache keeps them with the entry (report()).
        self.last_phases: dict[str, float] = {}
        # The compile-ahead passes since the last capture (a probe's and the capture's own):
        # their forward and wait seconds (fastdiff.kernels.compile_ahead's ``timing``).
        self._pass_timing: dict[str, float] = {}

    def first_run(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` for its outputs' shapes, before the capture (GraphedCall's probe). With
        ``compile_ahead`` it runs inside the compile-ahead pass, like capture()'s own: Triton
        kernels compile in threads and do not run, so the outputs' values are zeros where a
        kernel wrote them. Without this the probe compiled every kernel one by one, and
        capture()'s pass found nothing left to compile (SD1.5 U-Net on the H200, 2026-11-28:
        18.8 s of first call, 0.06 s of it in the pass). If ``fn`` fails inside the pass it runs
        again outside, which raises any real error."""
        if self.compile_ahead:
            with torch.cuda.device(self.device):
                ran, result = self._compile_ahead_pass(fn)
            if ran:
                return result
        return fn()

    def _compile_ahead_pass(self, fn: Callable[[], Any]) -> tuple[bool, Any]:
        """(True, ``fn()``) run inside ``fastdiff.ops.compile_ahead()`` and waited for; (False,
        None) when it raised: the pass is only a head start for the compiler, and ``fn`` fails
        on its zeroed tensors where it reads what the skipped kernels would have written (a
        real error is raised again by the plain runs that follow)."""
        try:
            with ops_compile_ahead(timing=self._pass_timing):
                result = fn()
        except Exception:
            return False, None
        finally:
            torch.cuda.synchronize(self.device)
        return True, result

    def capture(
        self,
        body: Callable[[], None],
        prepare: Callable[[], None],
        also: Callable[[], Any] | None = None,
    ) -> tuple[torch.cuda.CUDAGraph, int]:
        # Everything on self.device and one side stream of it: warm-up and capture. An op runs on
        # the current stream of its tensors' device, so capturing on torch.cuda.graph's default
        # stream (created once, on whichever device was current then) would leave a pipeline on
        # another device out of the graph; Triton launches on the current device.
        with torch.cuda.device(self.device):
            side = torch.cuda.Stream(device=self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            phases, begin = {}, time.perf_counter()
            with torch.cuda.stream(side), torch.no_grad():
                if self.compile_ahead:
                    # A pass in which every Triton kernel the body launches compiles, in threads,
                    # all at once, instead of one by one at its first launch below (its results
                    # are discarded like the warm-up runs': prepare() resets the inputs). Then
                    # ``also``'s kernels: the threads compile them while the body's finish.
                    self._compile_ahead_pass(lambda: (prepare(), body(), also and also()))
                    phases["compile_ahead_s"] = time.perf_counter() - begin
                    # Of the probe's pass (in the build phase) and this one: the seconds spent
                    # waiting for compilers after the forward; the rest ran the forward itself.
                    phases["compile_wait_s"] = self._pass_timing.get("wait_s", 0.0)
                    self._pass_timing = {}
                    begin = time.perf_counter()
                for _ in range(self.warmup_runs):
                    prepare()
                    body()
            torch.cuda.current_stream(self.device).wait_stream(side)
            torch.cuda.synchronize(self.device)
            phases["warmup_runs_s"] = time.perf_counter() - begin
            begin = time.perf_counter()
            # Return the warm-up's cached blocks first so the reserved-memory difference below is
            # the graph's own private pool, not allocator cache that any later call could reuse.
            torch.cuda.empty_cache()
            before = torch.cuda.memory_reserved(self.device)
            prepare()
            graph = torch.cuda.CUDAGraph()
            try:
                # The outer stream context restores the caller's stream even when
                # torch.cuda.graph.__exit__ raises (it ends the capture before restoring).
                with (
                    no_garbage_collection(),
                    torch.cuda.stream(side),
                    torch.no_grad(),
                    torch.cuda.graph(graph, stream=side),
                ):
                    body()
            except Exception as error:
                recover_from_failed_capture(self.device)
                raise GraphCaptureError(first_error(error)) from error
            torch.cuda.synchronize(self.device)
            phases["graph_capture_s"] = time.perf_counter() - begin
            self.last_phases = phases
            return graph, max(0, int(torch.cuda.memory_reserved(self.device)) - int(before))


def autocast_state(device_type: str) -> tuple:
    """What ``torch.autocast`` decides on the host for ops on ``device_type``: a graph replays
    the casts (and the lower-precision kernels) of the mode it was captured in, so its key has
    the mode: () when off, else ("autocast", dtype)."""
    if not torch.is_autocast_enabled(device_type):
        return ()
    return ("autocast", torch.get_autocast_dtype(device_type))


class WeightAddresses:
    """Where a model's parameters live, for graph keys: ``WeightAddresses(lambda: pipe.vae)()``.

    A captured graph reads the weights' memory directly. After the model is swapped, cast or
    moved (``pipe.vae = other_vae``, ``pipe.vae.to(torch.float32)``) a replay would still read
    the old model's weights, or memory freed since, and give a wrong image without an error.
    With this in the key the changed model captures graphs of its own. In-place updates keep
    the addresses, and the graphs replay them (``load_state_dict``, ``load_lora_weights``).

    The parameters are gathered again only when the model object or its first parameter
    object changes (walking a U-Net's modules takes about a millisecond of host time, reading
    the addresses of the parameters kept about 65 µs on the developer machine: once per
    generation). Replacing a submodule inside the model, or its buffers alone, is not seen: run
    ``optimize`` again, or ``pipe.runtime.cache.clear()``, after such surgery."""

    def __init__(self, model: Callable[[], Any]):
        self.model = model
        self.kept: tuple[int, tuple[torch.nn.Parameter, ...]] = (0, ())

    def __call__(self) -> tuple:
        model = self.model()
        if not isinstance(model, torch.nn.Module):
            return ()
        owner, parameters = self.kept
        first = next(model.parameters(), None)
        if owner != id(model) or (parameters[0] if parameters else None) is not first:
            parameters = tuple(model.parameters())
            self.kept = (id(model), parameters)
        # One number rather than hundreds in every key; a different model or placement
        # changes it (Python's tuple hash, 64 bits).
        return ("weights", id(model), hash(tuple(p.data_ptr() for p in parameters)))


@contextmanager
def normal_tensors():
    """Tensors made inside are normal ones, also under ``torch.inference_mode()`` (the caller's
    grad mode kept): a graph's static buffers outlive the call that builds them, and the next
    call, which may run outside inference mode, copies its inputs into them in place, which an
    inference tensor refuses there."""
    grad = torch.is_grad_enabled()
    with torch.inference_mode(False), torch.set_grad_enabled(grad):
        yield


@contextmanager
def no_garbage_collection():
    """Python's cyclic garbage collector held off for a capture. A pipeline and the runtime
    that optimized it refer to each other, so a dropped one (its graphs with it) is freed by
    the collector, whenever it next runs. Were that during a capture, destroying those graphs
    (cudaGraphExecDestroy) is an operation the capturing stream forbids, and the capture fails:
    "operation failed due to a previous error during capture" at the next kernel launch, and
    "operation not permitted when stream is capturing (function reset)" from CUDAGraph (seen on
    the H200, 2026-11-28, when a test's step graph was captured after the earlier tests'
    pipelines were dropped). The objects are collected after the capture instead."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class GraphCaptureError(RuntimeError):
    """A capture failed; the message names the error that broke it."""


def first_error(error: BaseException) -> str:
    """What broke a capture. When the body raises, torch.cuda.graph.__exit__ still ends the
    capture, and cudaStreamEndCapture's "operation failed due to a previous error during capture"
    replaces the body's own exception (left as its ``__context__``): name that one first."""

    def line(exception: BaseException) -> str:
        text = str(exception).strip().splitlines()
        return f"{type(exception).__name__}: {text[0] if text else ''}"

    body_error = error.__context__
    if body_error is None:
        return line(error)
    return f"{line(body_error)} (then, ending the capture: {line(error)})"


def recover_from_failed_capture(device: torch.device) -> None:
    """Undo what a failed capture leaves behind, so eager work can go on.

    When ``cudaStreamEndCapture`` reports an invalidated capture, PyTorch raises before it tells
    the CUDA RNG that capture is over, and every later ``torch.randn`` on the GPU then fails with
    "Offset increment outside graph capture encountered unexpectedly" (seen on our first H200
    run). A trivial capture that succeeds runs the missing epilogue.
    """
    try:
        torch.cuda.synchronize(device)
    except Exception:  # the error may be reported again here; the reset below is what matters
        pass
    try:
        # On a stream of ``device``: the default capture stream may belong to another GPU, and
        # the generator whose epilogue is missing is ``device``'s.
        with torch.cuda.device(device):
            scratch = torch.zeros(1, device=device)
            reset = torch.cuda.CUDAGraph()
            with no_garbage_collection():
                with torch.cuda.graph(reset, stream=torch.cuda.Stream(device=device)):
                    scratch.add_(1)
        torch.cuda.synchronize(device)
    except Exception as error:
        print(f"fastdiff.runtime: could not reset CUDA state after a failed capture ({error})")


def tensor_bytes(obj: Any) -> int:
    """Bytes held by the tensors in ``obj`` (a tensor, a dataclass/dict/list/tuple of them, or an
    object whose ``tensors()`` gives them), each storage counted once however many tensors
    view it."""
    storages: dict[int, int] = {}

    def visit(item: Any) -> None:
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(item, dict):
            for value in item.values():
                visit(value)
        elif isinstance(item, list | tuple):
            for value in item:
                visit(value)
        elif hasattr(item, "__dataclass_fields__"):
            for name in item.__dataclass_fields__:
                visit(getattr(item, name))
        elif callable(getattr(item, "tensors", None)):
            visit(item.tensors())

    visit(obj)
    return sum(storages.values())


@dataclass
class GraphEntry:
    """One captured graph with the buffers it reads and writes and what capturing it cost."""

    key: GraphKey
    graph: Replayable
    buffers: Any
    capture_seconds: float
    memory_bytes: int
    replays: int = 0
    # Where the capture's seconds went, when the backend says (CudaGraphBackend.last_phases).
    phases: dict = field(default_factory=dict)

    def replay(self) -> None:
        self.graph.replay()
        self.replays += 1


@dataclass
class CacheStats:
    captures: int = 0
    hits: int = 0
    evictions: int = 0
    failures: int = 0
    capture_seconds: float = 0.0
    failed_keys: dict = field(default_factory=dict)


class GraphCache:
    """Least-recently-used cache of captured graphs, at most ``max_graphs`` of them.

    ``get(key, build)`` returns the entry for ``key``, capturing it on a miss: ``build()`` returns
    ``(buffers, body, prepare)``. A new shape therefore captures a new graph; beyond the bound the
    least recently used graph is dropped, which frees its private memory pool. Keys whose capture
    failed are remembered so callers fall back to eager execution without retrying every call.
    """

    def __init__(self, backend: GraphBackend, max_graphs: int = 8):
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be at least 1, got {max_graphs}")
        self.backend = backend
        self.max_graphs = max_graphs
        self.entries: OrderedDict[GraphKey, GraphEntry] = OrderedDict()
        # Eager stand-ins of graphs whose capture failed, kept by their users (see
        # GraphedDenoiser.eager_entry); cleared and counted with the graphs.
        self.eager: OrderedDict[GraphKey, GraphEntry] = OrderedDict()
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: GraphKey) -> bool:
        return key in self.entries

    def failed(self, key: GraphKey) -> str | None:
        """The error message of a failed capture of ``key``, or None."""
        return self.stats.failed_keys.get(key)

    def get(
        self,
        key: GraphKey,
        build: Callable[[], tuple[Any, Callable, Callable]],
        also: Callable[[Any], Any] | None = None,
    ) -> GraphEntry:
        """``also(buffers)``, on a miss: what follows the graph, given its buffers, run in the
        capture's compile-ahead pass (backends with ``compile_ahead`` true; others ignore it)."""
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
            self.stats.hits += 1
            return entry
        while len(self.entries) >= self.max_graphs:
            self.evict_oldest()
        start = time.perf_counter()
        try:
            with normal_tensors():
                buffers, body, prepare = build()
                built = time.perf_counter() - start
                if also is not None and getattr(self.backend, "compile_ahead", False):
                    graph, pool_bytes = self.backend.capture(
                        body, prepare, also=lambda: also(buffers)
                    )
                else:
                    graph, pool_bytes = self.backend.capture(body, prepare)
            phases = dict(getattr(self.backend, "last_phases", None) or {})
            if phases:  # a backend that times its phases: the build (buffers, a probe run) first
                phases = {"build_s": built, **phases}
        except Exception as error:
            self.stats.failures += 1
            self.stats.failed_keys[key] = f"{type(error).__name__}: {error}"
            raise
        seconds = time.perf_counter() - start
        entry = GraphEntry(
            key=key,
            graph=graph,
            buffers=buffers,
            capture_seconds=seconds,
            memory_bytes=pool_bytes + tensor_bytes(buffers),
            phases=phases,
        )
        self.entries[key] = entry
        self.stats.captures += 1
        self.stats.capture_seconds += seconds
        return entry

    def first_run(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` run as the backend runs a builder's probe (``CudaGraphBackend.first_run``:
        inside its compile-ahead pass), or plainly."""
        first_run = getattr(self.backend, "first_run", None)
        return first_run(fn) if first_run is not None else fn()

    def evict_oldest(self) -> GraphKey:
        key, entry = self.entries.popitem(last=False)
        del entry
        self.stats.evictions += 1
        return key

    def clear(self) -> None:
        while self.entries:
            self.evict_oldest()
        self.eager.clear()

    def memory_bytes(self) -> int:
        """Static buffers plus graph pools of the live graphs (and the buffers of the eager
        stand-ins kept for failed captures): what the cache holds on device."""
        entries = [*self.entries.values(), *self.eager.values()]
        return sum(entry.memory_bytes for entry in entries)

    def report(self) -> list[dict]:
        """One row per live graph: key, capture time, memory, replay count (most recent last)."""
        return [
            {
                "graph": entry.key.describe(),
                "capture_s": round(entry.capture_seconds, 3),
                **{name: round(seconds, 3) for name, seconds in entry.phases.items()},
                "memory_mib": round(entry.memory_bytes / 2**20, 1),
                "replays": entry.replays,
            }
            for entry in self.entries.values()
        ]
