"""Shared harness of the whole-model benchmarks (bench_unet, bench_vae, bench_pipeline).

A benchmark is a list of ``Case``s (workload x provider). Each case builds its callable, is timed
(CUDA events on GPU, median of ``iters`` after ``warmup`` calls; the first call is timed on its
own and reported as warm-up: graph capture, autotuning, cuDNN algorithm search), and produces one
``Result`` row with ms, TFLOP/s from a FLOP count, images/s and peak memory. A case that raises is
reported with its traceback and the rest go on, so one broken provider never hides the others.
Rows go to ``benchmarks/results/<gpu>.csv``.
"""

from __future__ import annotations

import csv
import gc
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from common import RESULTS_DIR, csv_header  # one CSV schema for kernel and model benchmarks


@dataclass
class Result:
    benchmark: str
    workload: str
    provider: str
    ms: float | None = None
    tflops: float | None = None
    images_per_s: float | None = None
    speedup: float | None = None  # against the workload's reference provider
    warmup_s: float | None = None
    peak_mib: float | None = None
    gflop: float | None = None
    note: str = ""
    device: str = field(default_factory=lambda: device_name())
    dtype: str = field(default_factory=lambda: "fp16" if torch.cuda.is_available() else "fp32")


@dataclass
class Case:
    """One timed callable. ``setup()`` builds everything and returns the no-argument callable."""

    benchmark: str
    workload: str
    provider: str
    setup: Callable[[], Callable[[], object]]
    images: int = 1  # images produced by one call (for images/s)
    flop: float | None = None
    note: str = ""
    teardown: Callable[[], None] | None = None  # frees what setup built (after the last case)


def model_cases(
    benchmark: str,
    workload: str,
    providers: list[str],
    setup_for: Callable[[str], Callable[[], Callable[[], object]]],
    holder: ModelHolder,
    flop: float | None,
    note: str,
) -> list[Case]:
    """One Case per provider on one shared model (one image per call); the last frees it."""
    cases = [
        Case(benchmark, workload, provider, setup_for(provider), images=1, flop=flop, note=note)
        for provider in providers
    ]
    if cases:
        cases[-1].teardown = holder.release
    return cases


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def results_path(name: str | None = None) -> Path:
    slug = (name or device_name()).lower().replace(" ", "-").replace("/", "-")
    return RESULTS_DIR / f"{slug}.csv"


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median milliseconds per call. CUDA events around each call on GPU, wall clock on CPU."""
    for _ in range(warmup):
        fn()
    synchronize()
    samples = []
    if torch.cuda.is_available():
        for _ in range(iters):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            begin = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(samples)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


class ModelHolder:
    """Builds one model (fastdiff's or diffusers', never both at once, to bound memory) per
    workload; providers that share weights share the model.

    ``kind`` is "unet" or "vae": it names the fastdiff class, the diffusers class and the module
    name ``prepare_module`` reports under; ``config`` names an entry of model_configs.
    """

    CLASSES = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "taesd": "AutoencoderTiny"}

    def __init__(self, kind: str, config: str, device: torch.device, dtype: torch.dtype):
        self.kind, self.config, self.device, self.dtype = kind, config, device, dtype
        self.fastdiff = self.diffusers = None
        self.prepared = False

    def release(self) -> None:
        self.fastdiff = self.diffusers = None

    def _build(self, module, as_kwargs: bool):
        from model_configs import model_config

        self.release()
        free_memory()
        config = model_config(self.config)
        cls = getattr(module, self.CLASSES[self.kind])
        with torch.device(self.device):
            model = cls(**config) if as_kwargs else cls(config)
        return model.to(self.dtype).eval().requires_grad_(False)

    def fastdiff_model(self, prepared: bool, channels_last: bool = True):
        """fastdiff's model; ``prepared``: with fused QKV and the chosen memory layout."""
        import fastdiff.models
        from fastdiff.runtime import OptimizeReport, prepare_module

        if self.fastdiff is None or (self.prepared and not prepared):
            self.fastdiff = self._build(fastdiff.models, as_kwargs=False)
            self.prepared = False
        if prepared and not self.prepared:
            report = OptimizeReport(device=str(self.device))
            prepare_module(self.fastdiff, self.kind, report, None, False, fuse_qkv=True)
            self.prepared = True
        if prepared:  # the layout is reversible, QKV fusion is not
            nhwc = channels_last and self.device.type == "cuda"
            self.fastdiff.to(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
        return self.fastdiff

    def diffusers_model(self):
        import diffusers

        if self.diffusers is None:
            self.diffusers = self._build(diffusers, as_kwargs=True)
        return self.diffusers


def warmup_phases(fn) -> str:
    """Where a graphed provider's first call went: "warm-up: compile-ahead 1.2 s, warm-up runs
    3.4 s, capture 0.1 s" from the graph it captured (CudaGraphBackend times its phases), else
    "" (an eager provider, or the CPU's EagerGraphBackend)."""
    from fastdiff.runtime.optimize import describe_phases

    cache = getattr(getattr(fn, "graphed", None), "cache", None)
    rows = cache.report() if cache is not None else []
    phases = describe_phases(rows[-1]) if rows else ""
    return f"warm-up: {phases.strip(' ()')}" if phases else ""


def join_notes(*notes: str) -> str:
    return "; ".join(note for note in notes if note)


def run_case(case: Case, warmup: int, iters: int) -> Result:
    result = Result(case.benchmark, case.workload, case.provider, note=case.note)
    free_memory()
    try:
        with torch.no_grad():
            fn = case.setup()
            synchronize()
            begin = time.perf_counter()
            fn()
            synchronize()
            result.warmup_s = time.perf_counter() - begin
            result.note = join_notes(result.note, warmup_phases(fn))
            if torch.cuda.is_available():
                # Steady state only: not the model's float32 construction nor the warm-up's
                # autotuning and capture transients. Reserved, not allocated, bytes: a CUDA
                # graph's activations live in its private pool, which the allocated count misses.
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            result.ms = time_ms(fn, warmup, iters)
        # A GraphedCall whose capture failed runs eagerly: say so, or the row passes for a graph.
        fallbacks = getattr(getattr(fn, "graphed", None), "eager_fallbacks", None)
        if fallbacks:
            reason = next(iter(fallbacks.values()))
            result.note = f"{result.note}; " if result.note else ""
            result.note += f"NO GRAPH (capture failed, ran eagerly: {reason[:120]})"
        if torch.cuda.is_available():
            result.peak_mib = torch.cuda.max_memory_reserved() / 2**20
        if case.flop:
            result.gflop = case.flop / 1e9
            result.tflops = case.flop / (result.ms * 1e-3) / 1e12
        result.images_per_s = case.images / (result.ms * 1e-3)
    except Exception as error:  # report and go on: one failure must not stop the others
        traceback.print_exc()
        result.note = f"FAILED {type(error).__name__}: {str(error)[:160]}"
    finally:
        fn = None
        if case.teardown is not None:
            case.teardown()
        free_memory()
    return result


def add_speedups(results: list[Result], reference: str) -> None:
    """speedup = reference provider's ms / this row's ms, per workload."""
    base = {r.workload: r.ms for r in results if r.provider == reference and r.ms}
    for row in results:
        if row.ms and base.get(row.workload):
            row.speedup = base[row.workload] / row.ms


def run_cases(
    cases: list[Case],
    warmup: int,
    iters: int,
    reference: str,
    verbose: bool = True,
    results: list[Result] | None = None,
) -> list[Result]:
    """Run every case (appending to ``results`` as they finish); speedups against ``reference``."""
    results = [] if results is None else results
    for case in cases:
        if verbose:
            print(f"-- {case.benchmark} {case.workload} [{case.provider}]", flush=True)
        results.append(run_case(case, warmup, iters))
        if verbose:
            print(format_table(results[-1:], header=False), flush=True)
    add_speedups(results, reference)
    return results


def _fmt(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(results: list[Result], header: bool = True) -> str:
    lines = []
    if header:
        lines.append(
            f"{'workload':<22} {'provider':<20} {'ms':>9} {'TFLOP/s':>8} {'img/s':>8} "
            f"{'speedup':>7} {'warmup s':>8} {'peak MiB':>9}  note"
        )
    for r in results:
        lines.append(
            f"{r.workload:<22} {r.provider:<20} {_fmt(r.ms, 3):>9} {_fmt(r.tflops, 1):>8} "
            f"{_fmt(r.images_per_s, 2):>8} {_fmt(r.speedup, 2):>7} {_fmt(r.warmup_s, 2):>8} "
            f"{_fmt(r.peak_mib, 0):>9}  {r.note}"
        )
    return "\n".join(lines)


def append_csv(results: list[Result], path: Path | None = None) -> Path:
    """Append rows to benchmarks/results/<gpu>.csv (header written when the file is new)."""
    path = path or results_path()
    new = not path.exists() or path.stat().st_size == 0
    header = csv_header(path)  # the existing file's columns (the kernel benchmarks share it)
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header, extrasaction="ignore")
        if new:
            writer.writeheader()
        for row in results:
            values = {
                k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(row).items()
            }
            writer.writerow({"timestamp": stamp, **values})
    return path


def count_flops(fn: Callable[[], object]) -> float | None:
    """FLOP of one call of ``fn`` (2 per multiply-add) from torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    from fastdiff.ops import use_backend

    try:
        # The eager backend runs attention as aten SDPA, which the counter knows; custom kernels
        # would be invisible to it.
        with use_backend("eager"), torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
        return float(counter.get_total_flops())
    except Exception:
        traceback.print_exc()
        return None


def diffusers_available() -> bool:
    try:
        import diffusers  # noqa: F401
    except Exception:
        return False
    return True


def on_gpu() -> bool:
    return torch.cuda.is_available()


def available_providers(providers: list[str]) -> list[str]:
    """Drop the diffusers providers (saying so) when diffusers cannot be imported."""
    if diffusers_available():
        return providers
    dropped = [p for p in providers if p.startswith("diffusers")]
    if dropped:
        print(f"diffusers is not importable: skipping providers {', '.join(dropped)}")
    return [p for p in providers if not p.startswith("diffusers")]


def graph_cache(max_graphs: int = 4):
    """A graph cache that captures CUDA graphs on GPU and runs eagerly elsewhere."""
    from fastdiff.runtime import CudaGraphBackend, EagerGraphBackend, GraphCache

    backend = CudaGraphBackend() if on_gpu() else EagerGraphBackend()
    return GraphCache(backend, max_graphs=max_graphs)
