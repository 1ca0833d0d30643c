"""fastdiff's Triton kernels and their launchers, installed as ``fastdiff.kernels``.

Every launcher starts its kernels through ``launch``, so that ``compile_ahead()`` can turn a whole
model's forward pass into a compile-only pass: each kernel it meets is compiled in a background
thread instead of run, all at once, before the real
warm-up (see ``compile_ahead``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar

import torch

from . import launch_cache

# Passed to every launch. FP fusion (a * b + c as one FMA) is what the kernels' instruction counts
# and every measurement assume; Triton 3.9 warns that its default turns it off in 3.10, so it is
# asked for explicitly rather than left to the installed version's default.
COMPILE_OPTIONS = {"enable_fp_fusion": True}

_compiling_ahead: ContextVar[bool] = ContextVar("fastdiff_compiling_ahead", default=False)


def compile_threads() -> int:
    """Threads that compile kernels at once, in ``compile_ahead`` and for the attention
    autotuner's candidates (``FASTDIFF_COMPILE_THREADS``; default: the CPU count, at most 16;
    1 compiles one kernel at a time)."""
    setting = os.environ.get("FASTDIFF_COMPILE_THREADS", "")
    if not setting:
        return min(16, os.cpu_count() or 1)
    if not setting.isdigit() or int(setting) < 1:
        raise ValueError(f"FASTDIFF_COMPILE_THREADS must be a whole number >= 1, got {setting!r}")
    return int(setting)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for 0), as ``triton.next_power_of_2``, without its
    wrapper, which costs a launcher a few µs of host time per call (Triton 3.9)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for a >= 0 and b > 0, as ``triton.cdiv`` (likewise without its wrapper)."""
    return (a + b - 1) // b


def compiling_ahead() -> bool:
    """True inside ``compile_ahead()``: launches compile their kernel and do not run it."""
    return _compiling_ahead.get()


def launch(kernel, grid, *args, outputs: tuple[torch.Tensor, ...] = (), **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, a repeated launch without Triton's launch front end
    (``launch_cache``). Inside ``compile_ahead()`` the kernel is compiled for these arguments
    (in the background) and not run, and ``outputs``, the tensors it would write, are zeroed:
    what reads them next sees finite values, not uninitialised memory."""
    if not _compiling_ahead.get():
        launch_cache.launch(kernel, grid, args, kwargs)
        return
    for tensor in outputs:
        tensor.zero_()
    kernel.run(*args, grid=grid, warmup=True, **kwargs)


_launchers_started: set = set()  # prepare_launcher's argument-type keys, this process
_launchers_lock = threading.Lock()


def prepare_launcher(kernel) -> None:
    """Build the host-side launcher of ``kernel`` (a compiled kernel) now, so that its first
    launch does not have to.

    Triton 3.6, the GPU machine's, writes a C launcher for each kernel signature and compiles it
    with the system's C compiler at the kernel's first launch (``CompiledKernel._init_handles``):
    0.13-0.17 s each on the development machine, 11 distinct ones for an SD1.5 U-Net's 44 kernels
    at 64×64 latents, built one after another in the warm-up run after a compile-ahead pass. Built
    here, in the pass's threads, each lands in Triton's disk cache, where that first launch finds
    it. Triton 3.9's launcher compiles nothing, so building it costs little. One build per
    argument-type signature and process (that is what the launcher's source depends on). Where
    the driver has no launcher (a compile-only driver) this does nothing; a failure is left to
    the first launch, which meets it again and raises it."""
    try:
        from triton.runtime import driver

        launcher = getattr(driver.active, "launcher_cls", None)
        if launcher is None or kernel is None:
            return
        # A launcher's C source depends only on the argument types (and tensor descriptors):
        # kernels that share them (an autotuner's candidates, one kernel at several sizes)
        # share one launcher, built once per process rather than by every thread at once.
        meta = getattr(kernel.metadata, "tensordesc_meta", None)
        key = (tuple(str(kind) for kind in kernel.src.signature.values()), repr(meta))
        with _launchers_lock:
            if key in _launchers_started:
                return
            _launchers_started.add(key)
        launcher(kernel.src, kernel.metadata)
    except Exception:  # noqa: BLE001 - raised again, where it matters, by the first launch
        pass


class _LauncherBuildingExecutor:
    """The executor handed to Triton's AsyncCompileMode: each task compiles a kernel in
    ``pool`` and, in the same thread, builds its launcher (``prepare_launcher``)."""

    def __init__(self, pool: ThreadPoolExecutor):
        self.pool = pool

    def submit(self, compile_kernel, *args, **kwargs):
        def compile_and_prepare():
            kernel = compile_kernel(*args, **kwargs)
            prepare_launcher(kernel)
            return kernel

        return self.pool.submit(compile_and_prepare)


def _async_compile_mode():
    """Triton's AsyncCompileMode (3.6 and 3.9 have it), or None where this Triton lacks it."""
    try:
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:
        return None
    return AsyncCompileMode


@contextmanager
def compile_ahead(threads: int | None = None, timing: dict | None = None) -> Iterator[None]:
    """Run a model's forward inside this to compile every Triton kernel it will launch, in
    ``threads`` threads at once (default ``compile_threads()``), before running it for real.

    Inside, fastdiff's launches compile and skip the kernel (zeroing its outputs, so the PyTorch
    ops in between compute on zeros); the attention autotuner's candidates for a new shape are
    all compiled and none is timed (the real run times them, compiled). Leaving waits for the
    compilations and the kernels' launchers (``prepare_launcher``); a kernel that failed to
    compile is compiled again, and fails as before, when it is first run. The forward's results
    inside are meaningless: the CUDA-graph backend runs one such pass ahead of its warm-up runs,
    which it discards anyway. Serial (still correct) with one thread, without Triton's
    AsyncCompileMode, and a no-op under ``TRITON_INTERPRET=1`` or when already inside.

    ``timing``, a dict, gets the pass's seconds added to its ``forward_s`` (the code inside, on
    this thread: PyTorch's ops, cuDNN's algorithm search, Triton's launch front end) and
    ``wait_s`` (leaving: the compilations still running when the forward ended, the
    launchers): which of the two bounds the pass."""
    if _compiling_ahead.get() or os.environ.get("TRITON_INTERPRET", "0") == "1":
        yield
        return
    token = _compiling_ahead.set(True)
    begin = forward_end = time.perf_counter()
    try:
        with ExitStack() as stack:
            threads = compile_threads() if threads is None else threads
            mode = _async_compile_mode() if threads > 1 else None
            if mode is not None:
                pool = stack.enter_context(ThreadPoolExecutor(threads))
                executor = _LauncherBuildingExecutor(pool)
                stack.enter_context(mode(executor, ignore_errors=True))
            begin = time.perf_counter()
            try:
                yield
            finally:
                forward_end = time.perf_counter()
    finally:
        _compiling_ahead.reset(token)
        if timing is not None:
            timing["forward_s"] = timing.get("forward_s", 0.0) + forward_end - begin
            timing["wait_s"] = timing.get("wait_s", 0.0) + time.perf_counter() - forward_end
