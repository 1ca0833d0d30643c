"""Launching a kernel again without Triton's launch front end.

On every ``kernel[grid](*args)`` Triton binds the arguments to the kernel's parameters,
specialises each one (a tensor's dtype and whether its address is a multiple of 16; an integer's
width, whether it equals 1, whether it is a multiple of 16), turns that and the options into a
kernel-cache key, finds the compiled kernel, and only then calls its launcher. Outside a CUDA
graph that front end is host time on every launch: 17-43 µs per launch of the 35-115 µs a
fastdiff op call costs with it on the development machine (Triton 3.9, the triton and python
columns of ``benchmarks/host_overhead.py``), a wrapper's own included (the attention kernel's
``triton.heuristics``).

``launch`` remembers, per call signature, the compiled kernel Triton launched and the parameter
values its launcher took beyond the call's positional arguments (constexprs, the heuristics' and
the autotuner's values, defaults), and on the next call with that signature calls the launcher
itself, as ``JITFunction.run`` does. The signature is finer than anything Triton keys on: the
kernel object, the current device, each positional argument's type and, for a tensor, its dtype
and 16-byte alignment, for anything else its value; and the keyword arguments' names, types and
values. Two calls with one signature therefore make Triton choose one compiled kernel (and one
autotuned config, and one value of each heuristic over those arguments), as long as the
heuristics and the autotuner's key read scalars and dtypes, as fastdiff's do.

The first call with a signature goes through Triton as before; a pre-run hook on the kernel
records the arguments Triton's ``JITFunction.run`` received, and the signature is remembered only
when those are the call's own positional arguments plus keyword values. Triton's path is taken
again whenever something would make it differ: a launch hook (Triton's profiler), a pre-run hook
of someone else's, a global the kernel read that has since changed (Triton raises there), a
replaced ``JITFunction.run`` (a compile-only tool's), an argument that cannot be hashed, or the
interpreter (``TRITON_INTERPRET=1``, whose kernels are not ``JITFunction``).
``FASTDIFF_LAUNCH_CACHE=0`` turns it off. One thing it does not watch: the ``TRITON_DEBUG``
family of settings changed while the process runs (Triton would compile a debug build; the
cached kernel computes the same values).
"""

from __future__ import annotations

import operator
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

ENABLED = os.environ.get("FASTDIFF_LAUNCH_CACHE", "1") != "0"
MAX_SIGNATURES = 4096  # a whole SD1.5 U-Net and VAE need a few hundred; cleared when exceeded

_MISSING = object()
_plans: dict[tuple, tuple] = {}  # signature -> (compiled kernel, values after args, names)
_jit_of: dict[int, tuple] = {}  # id(kernel object) -> (the object, its JITFunction or None)
_tensor_positions: dict[tuple, tuple[int, ...]] = {}  # argument types -> the tensors' places
_genuine_run: list = [None]  # Triton's own JITFunction.run, once seen
_triton: tuple = ()  # (triton.knobs, triton.runtime.driver), imported at the first launch


class _Recording(threading.local):
    calls: list | None = None


_recording = _Recording()


def _record_call(*args, **kwargs) -> None:
    """The pre-run hook: what ``JITFunction.run`` was given, while ``launch`` asks for it."""
    calls = _recording.calls
    if calls is not None:
        calls.append((args, kwargs))


def innermost_jit(kernel):
    """The ``JITFunction`` under ``kernel``'s autotuner and heuristics wrappers, else None:
    also for an autotuner whose configs have a pre-hook, which it runs before every launch."""
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):
        if any(getattr(config, "pre_hook", None) for config in getattr(kernel, "configs", ())):
            return None
        kernel = getattr(kernel, "fn", None)
        if kernel is None or not hasattr(kernel, "run"):
            return None
    return kernel


def signature(kernel, args: tuple, kwargs: dict, device: int) -> tuple:
    """What two launches must share to share a compiled kernel and its launch values (above).
    The kernel is named by its id (``_jit_of`` keeps it alive): a ``JITFunction`` hashes
    through its source's cache key, which costs more than the rest."""
    types = tuple(map(type, args))
    positions = _tensor_positions.get(types)
    if positions is None:
        positions = tuple(i for i, kind in enumerate(types) if issubclass(kind, torch.Tensor))
        _tensor_positions[types] = positions
    values = list(args)
    for i in positions:
        tensor = args[i]
        values[i] = (tensor.dtype, not tensor.data_ptr() & 15)
    return (
        id(kernel),
        device,
        types,
        tuple(values),
        tuple(kwargs.items()),
        tuple(map(type, kwargs.values())),
    )


def launch(kernel, grid, args: tuple, kwargs: dict) -> None:
    """``kernel[grid](*args, **kwargs)``, through the launcher directly when this call's
    signature was launched before."""
    global _triton
    known = _jit_of.get(id(kernel))
    if known is None:
        known = _jit_of[id(kernel)] = (kernel, innermost_jit(kernel))
        if not _triton:
            from triton import knobs
            from triton.runtime import driver

            _triton = (knobs, driver)
    jit = known[1]
    if jit is None or not ENABLED or not _triton_launches_itself(jit):
        kernel[grid](*args, **kwargs)
        return
    knobs, driver = _triton
    runtime = knobs.runtime
    if not no_launch_hooks(runtime.launch_enter_hook, runtime.launch_exit_hook):
        kernel[grid](*args, **kwargs)
        return
    active = driver.active
    device = active.get_current_device()
    try:
        key = signature(kernel, args, kwargs, device)
        plan = _plans.get(key)
    except TypeError:  # an argument that cannot be hashed
        kernel[grid](*args, **kwargs)
        return
    if plan is None or not _still_valid(jit):
        _launch_and_remember(jit, kernel, grid, args, kwargs, key)
        return
    compiled, tail, names = plan
    if callable(grid):
        grid = grid(dict(zip(names, args + tail, strict=True)))
    size = len(grid)
    compiled.run(
        grid[0],
        grid[1] if size > 1 else 1,
        grid[2] if size > 2 else 1,
        active.get_current_stream(device),
        compiled.function,
        compiled.packed_metadata,
        None,  # launch metadata and the launch hooks: there are none (checked above)
        None,
        None,
        *args,
        *tail,
    )


def no_launch_hooks(enter, exit_) -> bool:
    """Triton's launch hooks (its profiler's) are unset: None in Triton 3.6, a ``HookChain``
    with no calls in 3.9, which the launcher would call for nothing."""
    return (enter is None or not getattr(enter, "calls", True)) and (
        exit_ is None or not getattr(exit_, "calls", True)
    )


def _triton_launches_itself(jit) -> bool:
    """False for the interpreter's kernels (None), wrappers this module does not know, and
    while something has replaced ``JITFunction.run`` (``triton_sm90.compile_only``, which
    compiles and does not launch): the cache would go around the replacement."""
    run = type(jit).run
    if run is _genuine_run[0]:
        return True
    if run.__module__ == "triton.runtime.jit" and run.__qualname__ == "JITFunction.run":
        _genuine_run[0] = run
        return True
    return False


def _still_valid(jit) -> bool:
    """No pre-run hook but ours, and every global the kernel read unchanged."""
    if len(jit.pre_run_hooks) != 1:
        return False
    for (name, _), (value, globals_dict) in jit.used_global_vals.items():
        if globals_dict.get(name, _MISSING) != value:
            return False
    return True


def _launch_and_remember(jit, kernel, grid, args: tuple, kwargs: dict, key: tuple) -> None:
    if _record_call not in jit.pre_run_hooks:
        jit.add_pre_run_hook(_record_call)
    calls: list = []
    _recording.calls = calls
    try:
        compiled = kernel.run(*args, grid=grid, warmup=False, **kwargs)
    finally:
        _recording.calls = None
    plan = _plan(jit, compiled, args, calls)
    if plan is not None:
        if len(_plans) >= MAX_SIGNATURES:
            _plans.clear()
        _plans[key] = plan


def _plan(jit, compiled, args: tuple, calls: list) -> tuple | None:
    """(compiled kernel, launch values after ``args``, parameter names), or None when the
    launch cannot be repeated as recorded."""
    if not calls or not hasattr(compiled, "packed_metadata"):
        return None
    if getattr(getattr(compiled, "src", None), "fn", None) is not jit:
        return None
    final_args, final_kwargs = calls[-1]  # an autotuner's timing runs come first, the launch last
    if len(final_args) != len(args) or any(map(operator.is_not, final_args, args)):
        return None
    names = tuple(param.name for param in jit.params)
    defaults = jit.signature.parameters
    tail = []
    for name in names[len(args) :]:
        value = final_kwargs.get(name, _MISSING)
        if value is _MISSING:
            value = defaults[name].default
            if value is defaults[name].empty:
                return None
        if isinstance(value, torch.Tensor):  # by keyword: the signature would hold it by id,
            return None  # and the plan would keep it alive
        tail.append(value)
    return compiled, tuple(tail), names


@contextmanager
def enabled(on: bool) -> Iterator[None]:
    """Inside, the cache is on or off (``ENABLED``) for this process; as before on the way out."""
    global ENABLED
    previous, ENABLED = ENABLED, on
    try:
        yield
    finally:
        ENABLED = previous


def clear() -> None:
    """Forget every remembered signature (tests; a kernel recompiled under another driver)."""
    _plans.clear()


def remembered() -> int:
    """How many signatures are remembered."""
    return len(_plans)
