"""The optional CUDA C++ layer (csrc/): built on first use, and the Python face of its ops.

``available()`` loads the extension once: the ahead-of-time build ``fastdiff._C``
(``FASTDIFF_BUILD_CUDA=1 pip install --no-build-isolation -e .``) when importable, else a JIT
build of csrc/ with ``torch.utils.cpp_extension.load`` + ninja, cached in
``$FASTDIFF_CUDA_BUILD_DIR``, else
``$TORCH_EXTENSIONS_DIR/fastdiff/torch_extensions/torch<version>_cu<cuda>``, else
``~/.cache/fastdiff/torch_extensions/torch<version>_cu<cuda>`` (a rebuild happens only when the
sources or flags change). Without a CUDA device, nvcc or ninja it returns False and
``unavailable_reason()`` says why; fastdiff then runs unchanged on the triton/eager backends.
``FASTDIFF_CUDA_EXTENSION=0`` disables it.

The kernels are registered as ``torch.ops.fastdiff_cuda.*`` (with fakes, so torch.compile can
trace them). ``fastdiff.ops`` calls ``<op>(*args)`` here when backend ``cuda`` is selected and
``supports_<op>(*args)`` is True, and the triton kernel otherwise (see ``cuda_extension_op``).
"""

from __future__ import annotations

import importlib.util
import os
import threading
import time
import warnings
from pathlib import Path

import torch

from fastdiff.ops.cuda_support import group_norm_launch_plan, sampler_step_supported

EXTENSION_NAME = "fastdiff_cuda_ext"
SOURCE_DIR = Path(__file__).resolve().parents[2] / "csrc"
NVCC_FLAGS = ["-O3", "--use_fast_math"]  # the same flags as setup.py's ahead-of-time build
CXX_FLAGS = ["-O3"]
ERROR_LINES = 12  # lines of a build error kept in unavailable_reason()
# torch's build lock (FileBaton) is waited on with no timeout; a build takes well under a minute,
# so a lock older than this was left by a killed build and would hang every later load.
STALE_LOCK_SECONDS = 600

_lock = threading.Lock()
_state: dict[str, object] = {}  # "reason": None when loaded, else why not; "origin": how loaded


def build_directory() -> Path:
    """Where the JIT build is cached (created on demand)."""
    explicit = os.environ.get("FASTDIFF_CUDA_BUILD_DIR")
    if explicit:
        return Path(explicit)
    torch_dir = os.environ.get("TORCH_EXTENSIONS_DIR")
    base = Path(torch_dir) / "fastdiff" if torch_dir else Path.home() / ".cache" / "fastdiff"
    cuda = (torch.version.cuda or "cpu").replace(".", "")
    return base / "torch_extensions" / f"torch{torch.__version__.split('+')[0]}_cu{cuda}"


def _ops_registered() -> bool:
    try:
        torch.ops.fastdiff_cuda.group_norm  # noqa: B018 - attribute lookup is the check
    except (AttributeError, RuntimeError):
        return False
    return True


def _missing_prerequisite() -> str | None:
    """Why the extension cannot be built or run here, or None when it can be tried."""
    if os.environ.get("FASTDIFF_CUDA_EXTENSION", "1") == "0":
        return "disabled by FASTDIFF_CUDA_EXTENSION=0"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (no CUDA device support)"
    if not torch.cuda.is_available():
        return "no CUDA device: torch.cuda.is_available() is False"
    return None


def _jit_prerequisite() -> str | None:
    from torch.utils import cpp_extension

    if not SOURCE_DIR.is_dir():
        return f"CUDA sources not found at {SOURCE_DIR} (and no prebuilt fastdiff._C)"
    cuda_home = cpp_extension.CUDA_HOME
    if cuda_home is None or not (Path(cuda_home) / "bin" / "nvcc").exists():
        return "no nvcc: CUDA toolkit not found (set CUDA_HOME or put nvcc on PATH)"
    if not cpp_extension.is_ninja_available():
        return "no ninja: install it (pip install ninja) to build the CUDA extension"
    return None


def _jit_build() -> None:
    from torch.utils import cpp_extension

    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_lock(directory)
    sources = sorted(str(p) for p in SOURCE_DIR.iterdir() if p.suffix in (".cu", ".cpp"))
    cpp_extension.load(
        name=EXTENSION_NAME,
        sources=sources,
        extra_cflags=CXX_FLAGS,
        extra_cuda_cflags=NVCC_FLAGS,
        build_directory=str(directory),
        is_python_module=False,  # the library registers torch ops when loaded
        verbose=os.environ.get("FASTDIFF_CUDA_VERBOSE", "0") == "1",
    )


def _remove_stale_lock(directory: Path) -> None:
    lock = directory / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_SECONDS:
        lock.unlink(missing_ok=True)


def _first_lines(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    text = "\n".join(lines[:ERROR_LINES])
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _load() -> str | None:
    """Load the extension (once); return None on success, else the reason it is unavailable."""
    reason = _missing_prerequisite()
    if reason is not None:
        return reason
    if _ops_registered():  # loaded by an earlier call or another module
        _state["origin"] = "already registered"
        return None
    try:
        import fastdiff._C  # noqa: F401 - importing registers torch.ops.fastdiff_cuda
    except ImportError as error:
        prebuilt_error = error
    else:
        _state["origin"] = "prebuilt fastdiff._C"
        return None
    reason = _jit_prerequisite()
    if reason is not None:
        return reason
    try:
        _jit_build()
    except Exception as error:  # compiler or linker output: report it, never crash the op
        # A prebuilt module that exists but failed to import (e.g. built for another torch) is
        # worth mentioning; one that was simply never built is not.
        absent = isinstance(prebuilt_error, ModuleNotFoundError)
        detail = "" if absent else f" (fastdiff._C: {prebuilt_error})"
        return f"build failed{detail}: {_first_lines(error)}"
    if not _ops_registered():
        return "build finished but torch.ops.fastdiff_cuda was not registered"
    _state["origin"] = f"JIT build in {build_directory()}"
    return None


def library_path() -> Path:
    """The shared library a JIT build leaves in ``build_directory()``."""
    return build_directory() / f"{EXTENSION_NAME}.so"


def _unbuilt_reason() -> str | None:
    """None when loading needs no compiler (prebuilt ``fastdiff._C``, a JIT build already in the
    cache, or the ops already registered); else why it would have to build, or cannot load."""
    reason = _missing_prerequisite()
    if reason is not None:
        return reason
    if _ops_registered() or importlib.util.find_spec("fastdiff._C") is not None:
        return None
    if library_path().is_file():
        return None
    return (
        f"not built (no {library_path()}, no prebuilt fastdiff._C); the auto backend does not "
        "build it: FASTDIFF_BACKEND=cuda builds it on first use, and then auto uses it too"
    )


def available(build: bool = True) -> bool:
    """True when the CUDA extension is loaded (building it on the first call if needed).

    ``build=False`` (the ``auto`` backend's question): True only when it loads without compiling.
    A JIT build takes about 15 s (on the H200 machine) and needs nvcc and ninja, while the
    extension's kernels beat the Triton ones by a few microseconds per call at most (GroupNorm at
    some SD shapes, benchmarks/NOTES.md; tens of microseconds per SD1.5 step, an estimate): too
    much first-use cost for a choice made behind the user's back. A JIT build whose sources
    changed since is rebuilt when loaded, as before."""
    if not build and "reason" not in _state:
        if "unbuilt" not in _state:
            _state["unbuilt"] = _unbuilt_reason()
        if _state["unbuilt"] is not None:
            return False
    if "reason" not in _state:
        with _lock:
            if "reason" not in _state:
                reason = _load()
                if reason is None:
                    _register_fakes()
                _state["reason"] = reason
                if reason is not None and os.environ.get("FASTDIFF_BACKEND", "") == "cuda":
                    warnings.warn(
                        f"fastdiff: FASTDIFF_BACKEND=cuda but the CUDA extension is unavailable "
                        f"({reason}); ops fall back to triton/eager",
                        RuntimeWarning,
                        stacklevel=2,
                    )
    return _state["reason"] is None


def unavailable_reason(build: bool = True) -> str:
    """Why ``available(build)`` is False ("" when it is True)."""
    if not available(build) and "reason" not in _state:
        return str(_state["unbuilt"])
    reason = _state["reason"]
    return "" if reason is None else str(reason)


def origin() -> str:
    """How the loaded extension was obtained (prebuilt module or JIT build folder)."""
    return str(_state.get("origin", "")) if available() else ""


def _require() -> None:
    if not available():
        raise RuntimeError(f"fastdiff CUDA extension unavailable: {unavailable_reason()}")


def _register_fakes() -> None:
    """Shape-only versions of the ops for torch.compile / FakeTensor tracing."""

    def group_norm_fake(x, num_groups, weight, bias, eps, silu):
        return torch.empty_like(x)

    def sampler_step_fake(
        x, model_output, coefficients, step, x0_prev, guidance, value, noise, x0_older
    ):
        return torch.empty_like(x), torch.empty_like(x)

    for name, fake in (("group_norm", group_norm_fake), ("sampler_step", sampler_step_fake)):
        try:
            torch.library.register_fake(f"fastdiff_cuda::{name}", fake)
        except Exception:  # already registered (a second loader in this process): eager use works
            pass


# --------------------------------------------------------------------------------------- ops


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    silu: bool = False,
) -> torch.Tensor:
    """GroupNorm (+ SiLU) with the register-resident CUDA kernel; NCHW or channels-last input.

    Same contract as ``fastdiff.ops.group_norm``; raises (RuntimeError/ValueError naming the
    argument) on inputs the kernel does not take; check ``supports_group_norm`` first.
    """
    _require()
    return torch.ops.fastdiff_cuda.group_norm(
        x, int(num_groups), weight, bias, float(eps), bool(silu)
    )


def supports_group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    silu: bool = False,
) -> bool:
    """True when the CUDA kernel takes these inputs: CUDA fp32/fp16/bf16, contiguous or
    channels-last, and a group (C/G x H*W) small enough to stay in one block's registers."""
    if not x.is_cuda or eps < 0:
        return False
    for param in (weight, bias):
        if param is not None and not (
            param.device == x.device
            and param.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and param.dim() == 1
            and param.shape[0] == x.shape[1]
            and param.is_contiguous()
        ):
            return False
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        return False
    return group_norm_launch_plan(x, num_groups).supported


def sampler_step(
    x: torch.Tensor,
    model_output: torch.Tensor,
    coefficients: torch.Tensor,
    step: torch.Tensor | None,
    x0_prev: torch.Tensor | None,
    guidance: torch.Tensor | None,
    guidance_value: float,
    noise: torch.Tensor | None,
    x0_older: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused CFG + plan step (fastdiff/sampling/plan.py) with the CUDA kernel; returns
    (x_next, x0). Arguments as ``sampler_step_triton`` in ``fastdiff/ops/sampler_step.py``:
    ``step`` an int64 device scalar with a [S, 10] table (None with one [10] row), ``guidance`` a
    device scalar or None (then ``guidance_value`` is used)."""
    _require()
    return torch.ops.fastdiff_cuda.sampler_step(
        x,
        model_output,
        coefficients,
        step,
        x0_prev,
        guidance,
        float(guidance_value),
        noise,
        x0_older,
    )


def supports_sampler_step(
    x: torch.Tensor,
    model_output: torch.Tensor,
    coefficients: torch.Tensor,
    step: torch.Tensor | None,
    x0_prev: torch.Tensor | None,
    guidance: torch.Tensor | None,
    guidance_value: float,
    noise: torch.Tensor | None,
    x0_older: torch.Tensor | None = None,
) -> bool:
    """True when the CUDA kernel takes these inputs (see ``sampler_step_supported``)."""
    return sampler_step_supported(
        x, model_output, coefficients, step, x0_prev, guidance, noise, x0_older
    )
