"""Compile the compile-ahead pass's kernels in worker processes instead of threads
(``FASTDIFF_COMPILE_PROCESSES=N``; off by default until measured on a GPU).

Threads share the GIL, and Triton's Python front end and some of its passes hold it: on the H200
machine's 16 cores the SD1.5 U-Net's kernels compiled 2.5x faster in 16 threads than in one
(12.4 s against 4.9 s), not 16x. Processes do not share it. With processes on, the pass works
in three steps:

1. the model's forward runs as in the threaded pass, but each kernel it meets is only recorded
   (Triton's ``jit_cache_hook`` hands over the kernel and its specialization, serialized as
   Triton's own ``preload`` reads it) and neither compiled nor run;
2. the worker processes (``python -m fastdiff.kernels.compile_processes``, each with a
   compile-only Triton driver naming the parent's GPU target, so none touches the GPU) compile
   them, N at a time, into Triton's on-disk cache;
3. the parent preloads each kernel (``JITFunction.preload``), which finds it in that cache and
   only loads it, so that after the pass every kernel is in memory, as after the threaded one;
   threads then build the kernels' launchers (``fastdiff.kernels.prepare_launcher``).

A kernel a worker failed to compile is compiled by the parent in step 3 (and fails there as it
would have). While the hook is installed Triton serializes every compilation's specialization
before calling it, in any thread; Triton 3.6 cannot serialize a kernel argument that is itself a
JIT function, so such a kernel (fastdiff has none) cannot compile anywhere in the process while a
process pass runs. Workers are started once, on first use (``start()`` starts them ahead), and
answer on a pipe of their own, so nothing they print can be mistaken for a reply. The hook only
takes the pass's own compile-only launches: another thread's launches, and a direct
``kernel[grid](...)`` inside the pass, compile and run as usual.
"""

from __future__ import annotations

import importlib
import json
import os
import select
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar

ENV = "FASTDIFF_COMPILE_PROCESSES"
# Seconds a worker may take to import torch and Triton, and to compile one kernel (the slowest
# SD kernel takes under a second for sm_90 on the development machine), before it is killed and
# its kernels are left to the parent.
READY_TIMEOUT_S = 120.0
COMPILE_TIMEOUT_S = 300.0


def compile_processes() -> int:
    """Worker processes for the compile-ahead pass (``FASTDIFF_COMPILE_PROCESSES``; default 0:
    compile in threads, ``FASTDIFF_COMPILE_THREADS``)."""
    setting = os.environ.get(ENV, "")
    if not setting:
        return 0
    if not setting.isdigit():
        raise ValueError(f"{ENV} must be a whole number >= 0, got {setting!r}")
    return int(setting)


def supported() -> bool:
    """Whether the process pass can run: this Triton has the JIT cache hook (knobs) and
    ``JITFunction.preload`` (3.6 and 3.9 have both), and no one else's hook is installed (the
    pass would have to replace it; compile_ahead then compiles in threads)."""
    try:
        from triton import knobs
        from triton.runtime.jit import JITFunction
    except ImportError:
        return False
    hooks = hasattr(knobs.runtime, "jit_cache_hook") and hasattr(JITFunction, "preload")
    return hooks and knobs.runtime.jit_cache_hook is None


class Request:
    """One kernel to compile: where its JIT function lives, and its specialization."""

    def __init__(self, module: str, qualname: str, data: str, jit_function):
        self.module, self.qualname, self.data = module, qualname, data
        self.jit_function = jit_function

    def message(self, target: dict) -> str:
        return json.dumps(
            {"module": self.module, "qualname": self.qualname, "data": self.data, "target": target}
        )


@contextmanager
def recording(
    active: Callable[[], bool], submit: Callable[[Request], None]
) -> Iterator[dict[tuple, Request]]:
    """Inside: every compile-only launch (``fastdiff.kernels.launch`` inside the pass, a warm-up
    launch to Triton) in a context where ``active()`` is true is recorded (keyed by kernel and
    specialization), handed to ``submit`` the first time, and skipped. Any other compilation,
    a real launch's or another context's, goes on as usual. Refuses to replace a JIT cache hook
    someone else installed."""
    from triton import knobs

    if knobs.runtime.jit_cache_hook is not None:
        raise RuntimeError("another Triton jit_cache_hook is installed")
    requests: dict[tuple, Request] = {}
    lock = threading.Lock()

    def hook(*, fn, compile, is_manual_warmup: bool = True, **_) -> bool | None:
        if not is_manual_warmup or not active():
            return None  # compile (and run) as usual
        data = compile["specialization_data"]
        with lock:
            new = (fn.module, fn.name, data) not in requests
            if new:
                request = Request(fn.module, fn.name, data, fn.jit_function)
                requests[(fn.module, fn.name, data)] = request
        if new:
            submit(request)
        return True

    knobs.runtime.jit_cache_hook = hook
    try:
        yield requests
    finally:
        knobs.runtime.jit_cache_hook = None


class Worker:
    """One compile process. Requests go in on its stdin, one JSON line each; each reply comes
    back on a pipe of its own: "" for success, else the error."""

    def __init__(self):
        self.ready = False
        self.dead: str | None = None  # why it no longer answers
        read_end, write_end = os.pipe()
        self.replies = os.fdopen(read_end, "r")
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", __name__, str(write_end)],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(write_end,),
                text=True,
            )
        except OSError as error:  # its kernels go to the parent, as for a worker that died
            self.process = None
            self.dead = f"worker could not start: {error}"
        finally:
            os.close(write_end)

    def _reply(self, timeout: float) -> str | None:
        """The worker's next line, or None when it exited or stayed silent for ``timeout``
        seconds (then it is killed: a stuck compiler must not hang the pass)."""
        if self.dead is None and select.select([self.replies], [], [], timeout)[0]:
            line = self.replies.readline()
            if line:
                return line
            self.dead = f"worker exited (status {self._exit_status()})"
        elif self.dead is None:
            self.process.kill()
            self.dead = f"worker killed after {timeout:g} s without an answer"
        return None

    def _exit_status(self) -> int | None:
        try:  # its end of the pipe closed a moment before it is reaped
            return self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return None

    def wait_ready(self) -> bool:
        """Wait for the worker's imports (its first line); False if it died or hung first."""
        if not self.ready and self.dead is None:
            self.ready = self._reply(READY_TIMEOUT_S) is not None
        return self.ready

    def compile(self, message: str) -> str:
        if not self.wait_ready():
            return f"worker not ready: {self.dead}"
        try:
            self.process.stdin.write(message + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError) as error:
            self.dead = self.dead or f"worker unavailable: {error}"
            return self.dead
        reply = self._reply(COMPILE_TIMEOUT_S)
        if reply is None:
            return self.dead
        try:
            return str(json.loads(reply))
        except ValueError:
            return f"unreadable answer from the worker: {reply[:200]!r}"

    def close(self) -> None:
        if self.process is not None:
            try:
                self.process.stdin.close()
            except OSError:
                pass
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.replies.close()


class Pool:
    """Workers; each submitted message goes to the next idle live one. A worker that died is
    not handed another message (it would answer every one at once with its error, and so take
    nearly all of them); once none lives, messages are answered with the last one's error."""

    MAX_DISPATCH = 64  # threads waiting for a worker on behalf of submitted messages

    def __init__(self, size: int):
        self.workers: list[Worker] = []
        self.idle: list[Worker] = []
        self.changed = threading.Condition()
        self.last_death = "no compile worker was started"
        self.dispatch = ThreadPoolExecutor(self.MAX_DISPATCH, thread_name_prefix="fastdiff-compile")
        self.grow(size)

    def live(self) -> int:
        with self.changed:
            return sum(worker.dead is None for worker in self.workers)

    def grow(self, size: int) -> None:
        """Start workers until ``size`` live (a pass in progress keeps submitting meanwhile)."""
        with self.changed:
            missing = size - sum(worker.dead is None for worker in self.workers)
            new = [Worker() for _ in range(max(0, missing))]
            self.workers += new
            self.idle += new
            self.changed.notify_all()

    def wait_ready(self) -> Pool:
        for worker in list(self.workers):
            worker.wait_ready()
        return self

    def _take(self) -> Worker | None:
        with self.changed:
            while not self.idle and any(w.dead is None for w in self.workers):
                self.changed.wait()
            return self.idle.pop() if self.idle else None

    def _give_back(self, worker: Worker) -> None:
        with self.changed:
            if worker.dead is None:
                self.idle.append(worker)
            else:
                self.last_death = worker.dead
            self.changed.notify_all()

    def _one(self, message: str) -> str:
        worker = self._take()
        if worker is None:
            return f"no compile worker left ({self.last_death})"
        try:
            return worker.compile(message)
        finally:
            self._give_back(worker)

    def submit(self, message: str) -> Future:
        """A future of the error ("" when the kernel compiled)."""
        return self.dispatch.submit(self._one, message)

    def close(self) -> None:
        """Stop the workers (not while a pass uses them)."""
        self.dispatch.shutdown(wait=True)
        for worker in self.workers:
            worker.close()
        self.workers, self.idle = [], []


_pool: Pool | None = None
_pool_lock = threading.Lock()


def start(size: int) -> Pool:
    """The workers, ``size`` of them live: started now where fewer run (they import torch and
    Triton, a few seconds, while the caller goes on); dead ones are replaced. The pool is
    grown in place, never replaced, so a pass in progress goes on with it."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = Pool(size)
        elif _pool.live() < size:
            _pool.grow(size)
        return _pool


def stop() -> None:
    """Stop the workers (their memory is freed); the next pass starts new ones."""
    global _pool
    with _pool_lock:
        if _pool is not None:
            _pool.close()
            _pool = None


_current_pass: ContextVar[object | None] = ContextVar("fastdiff_process_pass", default=None)

# The last process pass: kernels handed to the workers, and the errors of those that failed
# there (each compiled by the parent instead).
last_pass: dict = {"kernels": 0, "failed": []}


@contextmanager
def compiling(size: int) -> Iterator[None]:
    """The process pass (module docstring) around a forward run inside it, in this context
    only (another thread's pass, even a threaded one, is not this one's). Each kernel goes to
    a worker as soon as it is recorded, so the workers compile while the forward goes on;
    leaving waits for them, then preloads every kernel in this process and builds its launcher
    (``prepare_launcher``)."""
    from triton.runtime import driver

    pool = start(size)
    futures: list[Future] = []
    target: dict = {}
    marker = object()
    token = _current_pass.set(marker)

    def submit(request: Request) -> None:
        if not target:  # the driver's target where the pass runs (the GPU's)
            target.update(vars(driver.active.get_current_target()))
        futures.append(pool.submit(request.message(target)))

    try:
        with recording(lambda: _current_pass.get() is marker, submit) as requests:
            yield
    finally:
        _current_pass.reset(token)
    errors = [future.result() for future in futures]
    last_pass.update(kernels=len(errors), failed=[error for error in errors if error])
    kernels = []
    for request in requests.values():
        try:
            kernels.append(request.jit_function.preload(request.data))
        except Exception:  # raised again where the kernel is first launched
            pass
    from . import compile_threads, prepare_launcher

    # Their launchers, which Triton 3.6 compiles with the C compiler, in threads (a subprocess
    # each) rather than one by one at first launch.
    with ThreadPoolExecutor(max(1, min(compile_threads(), len(kernels)))) as threads:
        list(threads.map(prepare_launcher, kernels))


# ---- the worker process ----------------------------------------------------------------------


class CompileOnlyDriver:
    """Just enough of Triton's driver to compile for ``target`` without a GPU."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


def resolve(module: str, qualname: str):
    """The JITFunction ``qualname`` of ``module``, through autotuner and heuristics wrappers."""
    from triton.runtime.jit import JITFunction

    value = importlib.import_module(module)
    for part in qualname.split("."):
        value = getattr(value, part)
    while not isinstance(value, JITFunction) and hasattr(value, "fn"):
        value = value.fn
    if not isinstance(value, JITFunction):
        raise TypeError(f"{module}.{qualname} is not a Triton JIT function")
    return value


def serve(reply_fd: int) -> None:
    import fastdiff.kernels  # noqa: F401  (torch: the kernels' modules import it)
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    replies = os.fdopen(reply_fd, "w")
    replies.write(json.dumps("ready") + "\n")
    replies.flush()
    target = None
    for line in sys.stdin:
        try:
            request = json.loads(line)
            if target is None:
                target = GPUTarget(**request["target"])
                driver.set_active(CompileOnlyDriver(target))
            resolve(request["module"], request["qualname"]).preload(request["data"])
            reply = ""
        except Exception as error:  # noqa: BLE001 - reported to the parent, which compiles it
            reply = f"{type(error).__name__}: {error}"
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
