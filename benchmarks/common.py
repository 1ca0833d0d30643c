"""Shared helpers of the kernel benchmarks (bench_group_norm, bench_attention, bench_layer_norm,
bench_geglu, bench_sampler_step): providers, timing, one CSV schema, the command line.

Timing on GPU. ``ms`` is device time per call: the calls are captured into a CUDA graph and its
replays timed with CUDA events (median), so host-side launch overhead is excluded, as in the
CUDA-graph runtime the ops are built for. Several input sets are rotated so that inputs that fit in
L2 are not all re-read from it. ``launch_ms`` in the note is the plain per-call event time
(host overhead included) for comparison. The first call is timed on its own and reported as
``warmup_s`` (Triton JIT and autotuning, torch.compile), apart from steady state. ``peak_mib`` is
the peak extra memory of one steady-state call. On CPU the benchmarks run the eager path at
reduced shapes with wall-clock timing and say so in the note: the numbers only prove the scripts
run.

CSV: rows append to ``<out>/<gpu>.csv`` (default benchmarks/results); the columns are the model
benchmarks' (benchmarks/model_bench.py) followed by ``dtype`` and ``gbps``. When the file already
has a header without those two, they are folded into the note so columns never shift.
"""

from __future__ import annotations

import argparse
import csv
import gc
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastdiff.runtime.graphs import no_garbage_collection

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CSV_FIELDS = (
    "timestamp",
    "device",
    "benchmark",
    "workload",
    "provider",
    "ms",
    "tflops",
    "images_per_s",
    "speedup",
    "warmup_s",
    "peak_mib",
    "gflop",
    "note",
    "dtype",
    "gbps",
)
ROTATE_BYTES = 128 * 2**20  # rotate input sets until this much data is touched (> L2)
MAX_INPUT_SETS = 8

Inputs = tuple
Builder = Callable[[Inputs], Callable[[], object]]


@dataclass
class Workload:
    """One shape: ``make(scale_down)`` returns an input tuple (reduced shapes when True, on CPU)."""

    name: str
    dtype: torch.dtype
    make: Callable[[bool], Inputs]
    bytes_moved: Callable[[Inputs], float] | None = None  # minimum bytes read + written
    flop: Callable[[Inputs], float] | None = None
    note: str = ""  # first in each of its rows' notes (how it was measured)


@dataclass
class Row:
    benchmark: str
    workload: str
    provider: str
    dtype: str
    ms: float | None = None
    tflops: float | None = None
    gbps: float | None = None
    speedup: float | None = None
    warmup_s: float | None = None
    peak_mib: float | None = None
    gflop: float | None = None
    notes: list[str] = field(default_factory=list)


def random(shape, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal values drawn on the CPU, moved to the benchmark device. The CUDA generator
    is left alone: a failed graph capture can leave it unusable for the rest of the process."""
    values = torch.randn(shape, dtype=torch.float32).to(dtype)
    return values.to("cuda") if on_gpu() else values


def host_synchronising(build: Builder) -> Builder:
    """Mark a provider that syncs with the host (cannot be captured): timed per call."""
    build.graph_safe = False  # type: ignore[attr-defined]
    return build


def on_gpu() -> bool:
    return torch.cuda.is_available()


def device_name() -> str:
    return torch.cuda.get_device_name() if on_gpu() else "cpu"


def results_path(out_dir: Path | None = None) -> Path:
    slug = device_name().lower().replace(" ", "-").replace("/", "-")
    return (out_dir or RESULTS_DIR) / f"{slug}.csv"


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(
        dtype, str(dtype)
    )


def _synchronize() -> None:
    if on_gpu():
        torch.cuda.synchronize()


def _event_ms(fn: Callable[[], object], iters: int) -> float:
    samples = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def _graph_ms(calls: Sequence[Callable[[], object]], repeats: int, iters: int) -> float:
    """Median device ms per call over replays of a graph holding ``repeats`` rounds of calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as graph capture wants
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    _synchronize()
    graph = torch.cuda.CUDAGraph()
    # (the collector held off: freeing an earlier provider's graph would break this capture)
    with no_garbage_collection(), torch.cuda.graph(graph):
        for _ in range(repeats):
            for call in calls:
                call()
    graph.replay()
    _synchronize()
    return _event_ms(graph.replay, iters) / (repeats * len(calls))


def _wall_ms(fn: Callable[[], object], iters: int) -> float:
    samples = []
    for _ in range(iters):
        begin = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(samples)


def _gpu_ms(
    workload: Workload,
    build: Builder,
    fn: Callable[[], object],
    inputs: Inputs,
    notes: list[str],
    quick: bool,
) -> float:
    """Device ms per call: CUDA-graph replays over rotated input sets, else per-call events."""
    launch_ms = _event_ms(fn, 10 if quick else 30)
    if not getattr(build, "graph_safe", True):
        notes.append("syncs with the host: per-call events, no CUDA graph")
        return launch_ms
    per_set = sum(t.numel() * t.element_size() for t in inputs if torch.is_tensor(t))
    sets = max(1, min(MAX_INPUT_SETS, ROTATE_BYTES // max(per_set, 1)))
    calls = [fn] + [build(workload.make(False)) for _ in range(sets - 1)]
    try:
        for call in calls[1:]:
            call()  # compile or autotune outside the capture (same shapes: cached)
        graph_ms = _graph_ms(calls, repeats=2 if quick else 5, iters=5 if quick else 15)
    except Exception as error:  # not capturable: report the plain event time
        notes.append(f"no CUDA graph ({type(error).__name__}): per-call events")
        return launch_ms
    notes.append(f"launch_ms={launch_ms:.4f} graph of {len(calls)} input sets")
    return graph_ms


def measure(
    benchmark: str, workload: Workload, provider: str, build: Builder, quick: bool
) -> Row | None:
    """Time one (workload, provider); failures are reported in the row, never raised. None
    when the builder returns None: the provider does not apply to these inputs."""
    row = Row(benchmark, workload.name, provider, dtype_name(workload.dtype))
    if workload.note:
        row.notes.append(workload.note)
    gc.collect()
    try:
        with torch.no_grad():
            inputs = workload.make(not on_gpu())
            fn = build(inputs)
            if fn is None:  # the provider does not apply to this workload: no row
                return None
            begin = time.perf_counter()
            fn()
            _synchronize()
            row.warmup_s = time.perf_counter() - begin
            if on_gpu():
                # Peak of a steady-state call (the first one may hold autotuning buffers).
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                fn()
                _synchronize()
                row.peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
                row.ms = _gpu_ms(workload, build, fn, inputs, row.notes, quick)
            else:
                row.ms = _wall_ms(fn, 3 if quick else 10)
                row.notes.append("cpu: eager path at reduced shapes, wall clock")
        if workload.flop is not None:
            row.gflop = workload.flop(inputs) / 1e9
            row.tflops = row.gflop / row.ms
        if workload.bytes_moved is not None:
            row.gbps = workload.bytes_moved(inputs) / 1e6 / row.ms
    except Exception as error:  # one failing provider must not hide the others
        traceback.print_exc()
        row.ms = None
        row.notes.append(f"FAILED {type(error).__name__}: {str(error)[:200]}")
    return row


def add_speedups(rows: list[Row]) -> None:
    """speedup = eager ms / row ms, per workload and dtype (bench_group_norm's and
    bench_attention's full runs time one workload name in fp16 and in bf16)."""
    eager = {(r.workload, r.dtype): r.ms for r in rows if r.provider == "eager" and r.ms}
    for row in rows:
        base = eager.get((row.workload, row.dtype))
        if row.ms and base:
            row.speedup = base / row.ms


def csv_header(path: Path) -> list[str]:
    """The columns to append rows under: the file's own header (results CSVs written before a
    column was added keep theirs), or CSV_FIELDS for a new file. Raises, before any benchmark
    runs, for a folder or a CSV that is not a results file: its rows would be written with
    empty fields under another file's columns."""
    if path.is_dir():
        raise ValueError(f"results CSV {path} is a directory; name a .csv file")
    if not path.exists() or path.stat().st_size == 0:
        return list(CSV_FIELDS)
    with path.open(newline="") as handle:
        header = next(csv.reader(handle), [])
    missing = [name for name in ("benchmark", "workload", "provider", "ms") if name not in header]
    if missing:
        raise ValueError(
            f"{path} is not a benchmark results CSV (its header {header[:6]} lacks {missing}); "
            "name a new file or an existing results CSV"
        )
    return header


def append_csv(rows: list[Row], path: Path) -> Path:
    """Append rows under the file's existing header (or CSV_FIELDS for a new file)."""
    header = csv_header(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header, extrasaction="ignore")
        if new:
            writer.writeheader()
        for row in rows:
            values = {
                "timestamp": stamp,
                "device": device_name(),
                "benchmark": row.benchmark,
                "workload": row.workload,
                "provider": row.provider,
                "ms": row.ms,
                "tflops": row.tflops,
                "speedup": row.speedup,
                "warmup_s": row.warmup_s,
                "peak_mib": row.peak_mib,
                "gflop": row.gflop,
                "dtype": row.dtype,
                "gbps": row.gbps,
            }
            extra = [f"{k}={v}" for k in ("dtype", "gbps") if k not in header for v in [values[k]]]
            values["note"] = "; ".join(row.notes + extra)
            writer.writerow(
                {k: (round(v, 5) if isinstance(v, float) else v) for k, v in values.items()}
            )
    return path


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_rows(rows: list[Row]) -> str:
    lines = [
        f"{'workload':<30} {'provider':<14} {'dtype':<5} {'ms':>9} {'TFLOP/s':>8} {'GB/s':>8} "
        f"{'speedup':>7} {'warmup s':>8} {'peak MiB':>8}  note"
    ]
    for r in rows:
        lines.append(
            f"{r.workload:<30} {r.provider:<14} {r.dtype:<5} {_fmt(r.ms, 4):>9} "
            f"{_fmt(r.tflops, 1):>8} {_fmt(r.gbps, 0):>8} {_fmt(r.speedup, 2):>7} "
            f"{_fmt(r.warmup_s, 2):>8} {_fmt(r.peak_mib, 1):>8}  {'; '.join(r.notes)}"
        )
    return "\n".join(lines)


def cuda_extension_has(op: str) -> bool:
    from fastdiff.ops.backend import cuda_extension_module

    module = cuda_extension_module()
    try:
        return module is not None and module.available() and hasattr(module, op)
    except Exception:
        return False


def triton_with_setting(module, name: str, value, op: Callable) -> Builder:
    """A provider that runs ``op`` on the triton backend with the launcher setting
    ``module.name`` set to ``value`` (restored after each call): the rows that time one kernel
    variant against the default choice."""
    return triton_with_settings(module, {name: value}, op)


def triton_with_settings(module, settings: dict[str, object], op: Callable) -> Builder:
    """``triton_with_setting`` for several settings of one module at once."""

    def build(inputs):
        def call():
            from fastdiff.ops import use_backend

            saved = {name: getattr(module, name) for name in settings}
            for name, value in settings.items():
                setattr(module, name, value)
            try:
                with use_backend("triton"):
                    return op(*inputs)
            finally:
                for name, value in saved.items():
                    setattr(module, name, value)

        return call

    return build


def standard_providers(
    eager: Callable[..., object], fastdiff_op: Callable[..., object], cuda_op: str | None
) -> dict[str, Builder]:
    """fastdiff (triton backend), eager, torch.compile of the eager function, cuda when built."""
    from fastdiff.ops import use_backend

    def with_backend(name: str) -> Builder:
        def build(inputs: Inputs) -> Callable[[], object]:
            def call() -> object:
                with use_backend(name):
                    return fastdiff_op(*inputs)

            return call

        return build

    compiled = {}

    def build_compiled(inputs: Inputs) -> Callable[[], object]:
        if "fn" not in compiled:
            compiled["fn"] = torch.compile(eager)
        return lambda: compiled["fn"](*inputs)

    providers: dict[str, Builder] = {
        "eager": lambda inputs: lambda: eager(*inputs),
        "fastdiff": with_backend("triton"),
    }
    if on_gpu():
        providers["torch.compile"] = build_compiled
        if cuda_op is not None and cuda_extension_has(cuda_op):
            providers["cuda"] = with_backend("cuda")
    return providers


def parse_args(doc: str | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(doc or "").strip().split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer workloads and iterations")
    parser.add_argument(
        "--out", type=Path, default=None, help="folder for <gpu>.csv (default benchmarks/results)"
    )
    parser.add_argument("--no-csv", action="store_true", help="print only")
    parser.add_argument(
        "--providers",
        type=lambda text: text.split(","),
        default=None,
        help="comma-separated subset of the providers",
    )
    parser.add_argument(
        "--skip",
        type=lambda text: text.split(","),
        default=(),
        help="comma-separated providers to leave out (e.g. torch.compile: it compiles per shape)",
    )
    return parser.parse_args()


def run_benchmark(
    benchmark: str,
    workloads: list[Workload],
    providers: dict[str, Builder],
    args: argparse.Namespace,
) -> list[Row]:
    """Measure every (workload, provider), print a table, append the CSV; returns the rows."""
    print(f"== {benchmark} on {device_name()} (torch {torch.__version__})", flush=True)
    if not args.no_csv:  # a CSV that cannot take the rows fails now, not after the timings
        csv_header(results_path(args.out))
    if not on_gpu():
        print("   no GPU: eager path only, at reduced shapes (numbers are not kernel timings)")
    chosen = {k: v for k, v in providers.items() if args.providers is None or k in args.providers}
    chosen = {k: v for k, v in chosen.items() if k not in getattr(args, "skip", ())}
    if not on_gpu():
        chosen = {k: v for k, v in chosen.items() if k in ("eager", "fastdiff")}
    rows = []
    for workload in workloads:
        for name, build in chosen.items():
            row = measure(benchmark, workload, name, build, args.quick)
            if row is not None:
                rows.append(row)
                print(format_rows(rows[-1:]).split("\n")[1], flush=True)
    add_speedups(rows)
    print(format_rows(rows), flush=True)
    if not args.no_csv:
        path = append_csv(rows, results_path(args.out))
        print(f"appended {len(rows)} rows to {path}")
    return rows
