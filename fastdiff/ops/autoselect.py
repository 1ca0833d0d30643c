"""Per-op, per-shape backend choice from measured timings (cuda vs triton; triton vs eager SDPA
for attention; the fused triton kernel vs cuBLAS and the GEGLU kernel for linear_geglu; the
split-reduction kernel vs cuDNN for conv3x3; the row-copy kernel vs torch.cat for cat_channels;
the one-pass kernel vs two PyTorch additions for bias_residual; for the models' upsamplers, the
two steps vs a folded convolution, ``fastdiff.models.upsample_fold``).

The table is a small JSON file written by ``benchmarks/bench_cuda_backend.py`` on a GPU:

    {"device": "NVIDIA H200", "entries": [
        {"op": "group_norm", "key": "2x640x32x32|fp16|nhwc",
         "ms": {"eager": 0.061, "triton": 0.012, "cuda": 0.008}}, ...]}

It is read from ``$FASTDIFF_BACKEND_TABLE`` when set, else from the packaged
``fastdiff/assets/backend_table.json`` when present (``benchmarks/backend_table.py`` builds it
from a results CSV). ``preferred_backend(op, key)`` answers, among the op's ``CANDIDATES``:
  1. the fastest measured backend for that exact key, among the candidates;
  2. else the fastest for the nearest measured key of the same op, dtype and layout when its
     element count is within 4x (the kernels' relative speed changes slowly with size);
  3. else, for a key with a ``|strided`` qualifier (attention on the fused-QKV projection's
     views), the answer for the same key without it;
  4. else, for the ops in ``MAJORITY_OPS``, the backend fastest at most of the op's measured
     keys in that dtype;
  5. else the op's ``UNMEASURED_BACKEND`` (linear_geglu: eager, the two-step path; conv3x3:
     eager, cuDNN; cat_channels: eager, torch.cat; bias_residual: eager, two additions;
     upsample: eager, the two steps), else
     ``DEFAULT_BACKEND`` (triton: the default kernel backend, tested everywhere).
A measured winner is only a preference: the op still checks that the chosen backend supports the
input (``supports_<op>``) and falls back explicitly when it does not.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

DEFAULT_BACKEND = "triton"
PACKAGED_TABLE = Path(__file__).resolve().parents[1] / "assets" / "backend_table.json"
NEAREST_SIZE_RATIO = 4.0
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _layout(x: torch.Tensor) -> str:
    if (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    ):
        return "nhwc"
    return "nchw"


def group_norm_key(x: torch.Tensor) -> str:
    """Key of a group_norm input: shape, dtype and memory layout."""
    shape = "x".join(str(size) for size in x.shape)
    return f"{shape}|{DTYPE_NAMES.get(x.dtype, str(x.dtype))}|{_layout(x)}"


def sampler_step_key(x: torch.Tensor, model_output: torch.Tensor) -> str:
    """Key of a sampler_step input: state shape, dtype, layout and whether CFG is fused."""
    guided = "cfg" if model_output.shape[0] == 2 * x.shape[0] else "plain"
    return f"{group_norm_key(x)}|{guided}"


STRIDED = "|strided"


def attention_key(q: torch.Tensor, k: torch.Tensor) -> str:
    """Key of an attention input: query shape B x H x N x D, dtype and the number of keys, and
    ``|strided`` when the query is not contiguous. The models pass head views of their
    projections (the optimized runtime: views of one fused QKV projection, which
    bench_attention's "(fused-qkv views)" rows measure), and the kernels rank differently there:
    on an H200 at SD1.5's 64x64 self-attention, cuDNN took 0.156 ms on the views against our
    0.176, and the two tied on contiguous inputs."""
    shape = "x".join(str(size) for size in q.shape)
    key = f"{shape}|{DTYPE_NAMES.get(q.dtype, str(q.dtype))}|keys{k.shape[-2]}"
    return key if q.is_contiguous() else key + STRIDED


def linear_geglu_key(x: torch.Tensor, weight: torch.Tensor) -> str:
    """Key of a linear_geglu input: rows x input features x projected features (2 * inner),
    and dtype."""
    depth = x.shape[-1]
    rows = x.numel() // depth if depth else 0
    return f"{rows}x{depth}x{weight.shape[0]}|{DTYPE_NAMES.get(x.dtype, str(x.dtype))}"


def conv3x3_key(x: torch.Tensor, weight: torch.Tensor) -> str:
    """Key of a conv3x3 input: its shape B x C x H x W, dtype, layout and output channels."""
    return f"{group_norm_key(x)}|out{weight.shape[0]}"


def cat_channels_key(a: torch.Tensor, b: torch.Tensor) -> str:
    """Key of a cat_channels input: the output's shape B x C x H x W, dtype and layout (a's)."""
    batch, channels, height, width = a.shape
    shape = f"{batch}x{channels + b.shape[1]}x{height}x{width}"
    return f"{shape}|{DTYPE_NAMES.get(a.dtype, str(a.dtype))}|{_layout(a)}"


def upsample_key(x: torch.Tensor) -> str:
    """Key of an upsampler's input (the map before the doubling): shape, dtype and layout."""
    return group_norm_key(x)


# Ops whose shapes with no measurement near them go to the backend that won most of the op's
# measured shapes (same dtype) rather than to DEFAULT_BACKEND. Attention: both candidates are fast
# kernels (ours and PyTorch's SDPA), and ours autotunes for seconds at each new shape.
MAJORITY_OPS = ("attention",)

# Backends each op may be routed to by ``auto``. Attention has one kernel of ours and PyTorch's
# SDPA (cuDNN / flash) as the eager path, which is itself fast: the table decides between them.
CANDIDATES = {
    "group_norm": ("cuda", "triton"),
    "sampler_step": ("cuda", "triton"),
    "attention": ("triton", "eager"),
    "linear_geglu": ("triton", "eager"),
    "conv3x3": ("triton", "eager"),
    "cat_channels": ("triton", "eager"),
    "bias_residual": ("triton", "eager"),
    # Not a kernel: how Upsample2D runs under optimize(upsample_fold="auto"), the two steps
    # (eager) or one of the folded convolutions (fastdiff.models.upsample_fold.MODES).
    "upsample": ("eager", "transposed", "phases"),
}

# The backend of an op's shapes with no measurement near them, where it is not DEFAULT_BACKEND:
# linear_geglu's fused kernel replaces a cuBLAS GEMM, conv3x3's a cuDNN convolution,
# cat_channels' PyTorch's concatenation and bias_residual's two PyTorch additions, and the
# upsample fold replaces the checkpoint's two steps: each runs only where it was timed faster.
UNMEASURED_BACKEND = {
    "linear_geglu": "eager",
    "conv3x3": "eager",
    "cat_channels": "eager",
    "bias_residual": "eager",
    "upsample": "eager",
}


def _validate(table: object, source: str) -> dict[str, dict[str, float]]:
    """{op|key: {backend: ms}} from a table file, with errors that name the file and field."""
    if not isinstance(table, dict) or not isinstance(table.get("entries"), list):
        raise ValueError(f"backend table {source}: expected an object with an 'entries' list")
    timings: dict[str, dict[str, float]] = {}
    for index, entry in enumerate(table["entries"]):
        if not isinstance(entry, dict) or not {"op", "key", "ms"} <= entry.keys():
            raise ValueError(f"backend table {source}: entry {index} needs 'op', 'key' and 'ms'")
        if not isinstance(entry["ms"], dict):
            raise ValueError(
                f"backend table {source}: entry {index} 'ms' must map backends to times, got "
                f"{entry['ms']!r}"
            )
        measured = {}
        for backend, ms in entry["ms"].items():
            if ms is None:
                continue
            if isinstance(ms, bool) or not isinstance(ms, (int, float)):
                raise ValueError(
                    f"backend table {source}: entry {index} 'ms'[{backend!r}] must be a number "
                    f"of milliseconds or null, got {ms!r}"
                )
            if math.isfinite(ms) and ms > 0:
                measured[backend] = float(ms)
        timings[f"{entry['op']}|{entry['key']}"] = measured
    return timings


@functools.lru_cache(maxsize=1)
def load_table() -> dict[str, dict[str, float]]:
    """The measured timings ({} when no table exists); cached, ``reload()`` re-reads."""
    explicit = os.environ.get("FASTDIFF_BACKEND_TABLE")
    path = Path(explicit) if explicit else PACKAGED_TABLE
    if not path.exists():
        if explicit:
            raise FileNotFoundError(f"FASTDIFF_BACKEND_TABLE: no such file {path}")
        return {}
    try:
        table = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"backend table {path}: not valid JSON ({error})") from None
    return _validate(table, str(path))


def reload() -> None:
    load_table.cache_clear()
    cached_preference.cache_clear()


@functools.lru_cache(maxsize=4096)
def cached_preference(op: str, key: str) -> str:
    """``preferred_backend`` against the loaded table, memoised: ops ask once per call, and the
    answer only changes when the table does (``reload``)."""
    return preferred_backend(op, key)


def _numel(key: str) -> int:
    return math.prod(int(size) for size in key.split("|")[0].split("x"))


def _fastest(timings: dict[str, float], candidates: Sequence[str]) -> str | None:
    measured = [(ms, backend) for backend, ms in timings.items() if backend in candidates]
    return min(measured)[1] if measured else None


def preferred_backend(
    op: str, key: str, candidates: Sequence[str] | None = None, table=None
) -> str:
    """The backend to use for ``op`` at ``key`` (see the module docstring for the rule);
    ``candidates`` defaults to the op's entry in ``CANDIDATES``."""
    if candidates is None:
        candidates = CANDIDATES.get(op, ("cuda", "triton"))
    timings = load_table() if table is None else table
    exact = timings.get(f"{op}|{key}")
    if exact:
        choice = _fastest(exact, candidates)
        if choice is not None:
            return choice
    rest = key.partition("|")[2]
    size = _numel(key)
    nearest: tuple[float, str] | None = None
    for full_key, measured in timings.items():
        other_op, _, other_key = full_key.partition("|")
        if other_op != op or other_key.partition("|")[2] != rest:
            continue
        distance = abs(math.log(_numel(other_key) / size)) if size > 0 else math.inf
        choice = _fastest(measured, candidates)
        if choice is not None and distance <= math.log(NEAREST_SIZE_RATIO):
            if nearest is None or distance < nearest[0]:
                nearest = (distance, choice)
    if nearest is not None:
        return nearest[1]
    if key.endswith(STRIDED):  # no strided measurement near it: as contiguous inputs
        return preferred_backend(op, key.removesuffix(STRIDED), candidates, timings)
    if op in MAJORITY_OPS:
        winner = _majority(timings, op, key.split("|")[1], candidates)
        if winner is not None:
            return winner
    fallback = UNMEASURED_BACKEND.get(op, DEFAULT_BACKEND)
    return fallback if fallback in candidates else candidates[0]


def _majority(timings, op: str, dtype: str, candidates: Sequence[str]) -> str | None:
    """The candidate fastest at most measured keys of ``op`` in ``dtype``; None on a tie."""
    wins: dict[str, int] = {}
    for full_key, measured in timings.items():
        parts = full_key.split("|")
        if parts[0] != op or parts[2] != dtype:
            continue
        choice = _fastest(measured, candidates)
        if choice is not None:
            wins[choice] = wins.get(choice, 0) + 1
    ranked = sorted(wins.items(), key=lambda item: -item[1])
    if not ranked or (len(ranked) > 1 and ranked[0][1] == ranked[1][1]):
        return None
    return ranked[0][0]


def table_from_rows(device: str, rows: Sequence[tuple[str, str, str, float | None]]) -> dict:
    """A JSON-ready table from (op, key, backend, ms) rows; failed measurements (None) left out."""
    entries: dict[tuple[str, str], dict[str, float]] = {}
    for op, key, backend, ms in rows:
        if ms is not None:
            entries.setdefault((op, key), {})[backend] = round(float(ms), 6)
    return {
        "device": device,
        "source": "benchmarks/bench_cuda_backend.py",
        "entries": [{"op": op, "key": key, "ms": ms} for (op, key), ms in entries.items()],
    }
