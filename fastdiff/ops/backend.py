"""The one place that decides which implementation runs an op.

Backends:
  eager  - plain PyTorch in the input dtype (the path every machine has)
  triton - our Triton kernels (kernels/), the default on CUDA tensors
  cuda   - the optional CUDA C++ extension (csrc/), selectable explicitly
  auto   - per op and shape, the fastest of the op's candidates (cuda / triton, or triton / eager
           for attention and linear_geglu) in the measured table read by
           ``fastdiff.ops.autoselect``; for an unmeasured shape the nearest measured one
           (attention on head views: else the contiguous shape's answer), for attention else
           the backend that won most measured attention shapes, for linear_geglu else eager
           (its two steps), else triton (also where the extension is not available); what
           ``fastdiff.runtime.optimize`` uses

``FASTDIFF_BACKEND=eager|triton|cuda|auto`` overrides the default for the whole process;
``use_backend(name)`` overrides it inside a ``with`` block (tests and benchmarks use it).
Under ``TRITON_INTERPRET=1`` the triton backend also runs on CPU tensors (slowly), which is how
CI exercises the kernels without a GPU.

Each kernel is a ``torch.library.custom_op``; ``launch_kernel_op`` runs it as one wherever
something traces, records or transforms ops (``may_launch_directly``), and otherwise calls its
launcher directly, which saves PyTorch's dispatch on every un-graphed call.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import torch
from torch.autograd import forward_ad

BACKENDS = ("eager", "triton", "cuda", "auto")

_override = threading.local()


def validate_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(
            f"unknown fastdiff backend {name!r}; allowed values: {', '.join(BACKENDS)}"
        )
    return name


def requested_backend() -> str | None:
    """The backend asked for by ``use_backend`` or ``FASTDIFF_BACKEND``, or None for the default."""
    forced = getattr(_override, "name", None)
    if forced is not None:
        return forced
    env = os.environ.get("FASTDIFF_BACKEND", "").strip().lower()
    if not env:
        return None
    try:
        return validate_backend(env)
    except ValueError as error:
        raise ValueError(f"FASTDIFF_BACKEND: {error}") from None


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force a backend (or restore the default with None) inside a ``with`` block."""
    if name is not None:
        validate_backend(name)
    previous = getattr(_override, "name", None)
    _override.name = name
    try:
        yield
    finally:
        _override.name = previous


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def compile_ahead(timing: dict | None = None) -> contextlib.AbstractContextManager:
    """``fastdiff.kernels.compile_ahead(timing=timing)`` (a pass in which every Triton kernel
    launched compiles in background threads instead of running; ``timing`` gets its forward and
    wait seconds) where Triton is installed, else a no-op."""
    if not triton_available():
        return contextlib.nullcontext()
    from fastdiff.kernels import compile_ahead as kernels_compile_ahead

    return kernels_compile_ahead(timing=timing)


def compiling_ahead() -> bool:
    """True inside ``compile_ahead()``'s pass (its Triton launches compile and do not run)."""
    if not triton_available():
        return False
    from fastdiff.kernels import compiling_ahead as kernels_compiling_ahead

    return kernels_compiling_ahead()


def attention_configs_summary(device: torch.device) -> str | None:
    """``fastdiff.kernels.attention_configs.describe(device)`` where Triton is installed and
    ``device`` is a CUDA device, else None."""
    if device.type != "cuda" or not triton_available():
        return None
    from fastdiff.kernels import attention_configs

    return attention_configs.describe(device)


def triton_can_run(tensor: torch.Tensor) -> bool:
    """True when a Triton kernel can run on this tensor's device."""
    if not triton_available():
        return False
    if tensor.is_cuda:
        return True
    return tensor.device.type == "cpu" and triton_interpreter()


def select_backend(
    tensor: torch.Tensor, op: str | None = None, key: Callable[[], str] | None = None
) -> str:
    """Backend for an op on ``tensor``: the requested one, else triton on CUDA, else eager.

    ``op`` and ``key`` (a callable giving the autoselect key of the input, called only when
    needed) let the ``auto`` backend look the op and shape up in the measured table; ops with a
    single kernel backend leave them out and ``auto`` means triton for them.

    A requested backend that cannot run on this device falls back to eager: CPU tensors under a
    process-wide ``FASTDIFF_BACKEND=triton`` without the interpreter, for example. Each op also
    checks its own input constraints (dtype, layout, head dim) and uses the reference for inputs its
    kernel does not support.
    """
    requested = requested_backend()
    if requested == "eager":
        return "eager"
    if requested == "cuda":
        module = cuda_extension_module()
        if tensor.is_cuda and module is not None and module.available():
            return "cuda"
        return "triton" if triton_can_run(tensor) else "eager"
    if requested == "triton":
        return "triton" if triton_can_run(tensor) else "eager"
    if requested == "auto":
        # Like the default on CPU (eager; the interpreter is only for explicit triton requests).
        if not (tensor.is_cuda and triton_available()):
            return "eager"
        if op is None or key is None:
            return "triton"
        from fastdiff.ops import autoselect

        choice = autoselect.cached_preference(op, key())
        if choice == "eager":  # measured faster than our kernel at this shape (attention)
            return "eager"
        if choice == "cuda":
            module = cuda_extension_module()
            # Only an extension that loads without compiling (see cuda_extension.available).
            if module is not None and module.available(build=False):
                return "cuda"
        return "triton"
    # Default: kernels on CUDA; the interpreter is opt-in through use_backend/FASTDIFF_BACKEND.
    if tensor.is_cuda and triton_available():
        return "triton"
    return "eager"


def _watch_probes() -> tuple[Callable[[], Any], ...] | None:
    """PyTorch's cheap checks for what may be recording or transforming ops (private functions of
    torch._C, present in the 2.x releases fastdiff supports); None where one is missing, and
    then every kernel goes through its custom op."""
    try:
        return (
            torch._C._len_torch_dispatch_stack,  # dispatch modes: FakeTensorMode, FLOP counter
            # torch function modes (TorchFunctionMode, ``with torch.device(...)``): a custom op
            # call reaches them, a launcher's Python call does not
            torch._C._is_torch_function_mode_enabled,
            torch._C._are_functorch_transforms_active,  # vmap, grad, functionalize
            torch._C._get_tracing_state,  # torch.jit.trace
            torch._C._autograd._profiler_enabled,  # torch.profiler: ops named in its tables
        )
    except AttributeError:
        return None


_WATCH_PROBES = _watch_probes()
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def may_launch_directly(tensors: tuple[Any, ...]) -> bool:
    """True when a kernel may be launched by a plain Python call rather than through its custom
    op: nothing traces, records or transforms ops (torch.compile and torch.export, torch.jit.trace,
    a dispatch mode such as FakeTensorMode or the FLOP counter, a torch function mode, a functorch
    transform, the profiler, whose tables name the custom ops), and every tensor argument is a
    plain tensor or parameter, not a subclass. Where any of these watches, the custom op is what
    it must see."""
    if _WATCH_PROBES is None or torch.compiler.is_compiling():
        return False
    dispatch_modes, function_modes, transforms, tracing, profiling = _WATCH_PROBES
    if dispatch_modes() or function_modes() or transforms() or tracing() is not None or profiling():
        return False
    for item in tensors:
        if type(item) not in _PLAIN_TENSOR_TYPES and isinstance(item, torch.Tensor):
            return False
    return True


def launch_kernel_op(custom_op: Callable[..., Any], launcher: Callable[..., Any], *args: Any):
    """Run a Triton kernel: ``launcher(*args)`` directly where ``may_launch_directly`` allows,
    else ``custom_op(*args)`` (the ``torch.library.custom_op`` wrapping the same launcher), on
    the device of ``args[0]`` (the op's input tensor).

    Both run the same launcher on the same arguments. The direct call skips PyTorch's dispatch
    of a Python custom op (its autograd wrapper, redispatch and alias check): about 20 µs of host
    time per call on the development machine (``benchmarks/host_overhead.py``), which an eager
    forward without CUDA graphs pays on every op.

    Triton compiles for and launches on the current CUDA device, not the tensors' (PyTorch's own
    ops switch to their tensors' device, and a Python custom op does not): a model moved to
    ``cuda:1`` while ``cuda:0`` is current would otherwise run its kernels on the wrong GPU."""
    first = args[0]
    if first.is_cuda and first.get_device() != torch.cuda.current_device():
        with torch.cuda.device(first.device):
            return _run_kernel_op(custom_op, launcher, args)
    return _run_kernel_op(custom_op, launcher, args)


def _run_kernel_op(custom_op: Callable[..., Any], launcher: Callable[..., Any], args: tuple):
    if may_launch_directly(args):
        return launcher(*args)
    return custom_op(*args)


def cuda_extension_module() -> ModuleType | None:
    """``fastdiff.ops.cuda_extension`` (the CUDA C++ layer), or None where it is not shipped."""
    try:
        from fastdiff.ops import cuda_extension
    except ImportError:
        return None
    return cuda_extension


def cuda_extension_op(op: str, *args: Any) -> Callable[..., Any] | None:
    """The CUDA C++ implementation of ``op`` when the extension is built and accepts ``args``.

    The extension exposes ``<op>(*args)`` and, optionally, ``supports_<op>(*args) -> bool``; the
    op calls it with the same arguments. None means: run the triton kernel instead.
    """
    module = cuda_extension_module()
    if module is None or not module.available():
        return None
    function = getattr(module, op, None)
    supports = getattr(module, f"supports_{op}", None)
    if function is None or (supports is not None and not supports(*args)):
        return None
    return function


KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def kernel_dtype_supported(tensor: torch.Tensor) -> bool:
    """fp16/bf16/fp32 on a GPU; the CPU interpreter (numpy) has no bfloat16."""
    if tensor.dtype not in KERNEL_DTYPES:
        return False
    return tensor.is_cuda or tensor.dtype != torch.bfloat16


def strictly_nhwc(x: torch.Tensor) -> bool:
    """Dense channels-last (each pixel's channels one row of the (B·H·W, C) matrix) and not
    also NCHW-contiguous, as a 1x1 map or a one-channel one is: the inputs for which PyTorch's
    elementwise ops and concatenation return channels-last results, so a kernel writing
    channels-last returns the layout PyTorch would."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def rows_are_viewable(x: torch.Tensor) -> bool:
    """True when ``x`` (..., D) can be viewed as (R, D) rows with a unit column stride, the
    layout the row-wise kernels (layer_norm, geglu) read without a copy."""
    if x.dim() == 0 or (x.stride(-1) != 1 and x.shape[-1] > 1):
        return False
    if x.shape[-1] > 0 and x.is_contiguous():
        return True  # the common case, without making a view
    try:
        x.view(-1, x.shape[-1])
    except RuntimeError:
        return False
    return True


def check_eps(op: str, eps: float) -> None:
    """A norm's eps: a finite number >= 0. A negative or NaN eps gives NaN wherever a group's or
    row's variance is small, silently."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:
        raise ValueError(f"{op}: eps must be a finite number >= 0, got {eps!r}")


def autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``, False for a device type autocast does not know
    (meta tensors, which the FLOP counter runs the models on). Ops that replace a PyTorch
    GEMM or convolution run PyTorch's under autocast, which casts its inputs as it does."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def needs_autograd(*tensors: torch.Tensor | None) -> bool:
    """True when a gradient must flow through these inputs. The kernels are forward-only, so the
    ops send such calls (training) to the eager path, which autograd differentiates.

    Forward-mode AD counts too (``torch.autograd.forward_ad`` dual tensors, ``torch.func.jvp``):
    a dual tensor does not require grad, and a custom op without a jvp formula returns no
    tangent, silently (PyTorch raises nothing), where the eager path propagates it."""
    if forward_ad._current_level >= 0 and any(
        t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors
    ):
        return True
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in tensors)
