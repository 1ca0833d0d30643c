"""The command line of the whole-model benchmarks (bench_unet, bench_vae, bench_pipeline and
``fastdiff bench``): their shared arguments, the iteration counts, and ``run_and_report``, which
runs the cases of ``model_bench`` and prints and appends what they measured (the rows measured
so far when a SIGTERM, e.g. from ``timeout``, stops the run)."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

import torch
from common import csv_header
from model_bench import (
    Case,
    Result,
    add_speedups,
    append_csv,
    diffusers_available,
    format_table,
    join_notes,
    on_gpu,
    results_path,
    run_cases,
)


class Interrupted(BaseException):
    """SIGTERM (e.g. from ``timeout``): stop, but report the rows measured so far. A
    BaseException so that the per-case ``except Exception`` does not swallow it."""


def _raise_interrupted(signum, frame):
    raise Interrupted(f"signal {signum}")


def argument_parser(doc: str | None, providers: tuple[str, ...]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    add_common_arguments(parser, providers)
    return parser


def add_common_arguments(parser: argparse.ArgumentParser, providers: tuple[str, ...]) -> None:
    parser.add_argument("--quick", action="store_true", help="fewer workloads and iterations")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="add the torch.compile provider (compiles for about a minute)",
    )
    parser.add_argument(
        "--providers",
        type=lambda text: text.split(","),
        help=f"comma-separated subset of: {', '.join(providers)}",
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls (default 3)")
    parser.add_argument("--iters", type=int, default=None, help="timed calls (default 10)")
    parser.add_argument(
        "--csv",
        type=Path,
        default=None,
        help="CSV to append to (default benchmarks/results/<gpu>.csv)",
    )
    parser.add_argument("--no-csv", action="store_true", help="print only")
    parser.add_argument(
        "--note", default="", help="added to every row's note (names a run's rows in the CSV)"
    )


def iterations(args: argparse.Namespace) -> tuple[int, int]:
    """(warmup, iters): 3 and 10 on GPU as in BASELINES.md; fewer for --quick and on CPU."""
    # CPU: oneDNN builds its conv primitives over the first calls, so warm up as long as on GPU.
    warmup, iters = (3, 10) if on_gpu() else (3, 3)
    if args.quick:
        warmup, iters = min(warmup, 2), min(iters, 5)
    if args.iters is not None and args.iters < 1:
        raise ValueError(f"--iters must be at least 1, got {args.iters}")
    if args.warmup is not None and args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    return (
        args.warmup if args.warmup is not None else warmup,
        args.iters if args.iters is not None else iters,
    )


def run_and_report(cases: list[Case], args: argparse.Namespace) -> int:
    """Run, print the table, append the CSV; exit code 1 when any case failed. Speedups are
    against diffusers eager, or fastdiff eager where diffusers cannot be imported."""
    reference = "diffusers" if diffusers_available() else "fastdiff-eager"
    warmup, iters = iterations(args)
    if not args.no_csv:  # a CSV that cannot take the rows fails now, not after every case ran
        csv_header(args.csv or results_path())
    if on_gpu():
        # As optimize() and `fastdiff profile` do, for every provider alike: the fastdiff
        # providers here call prepare_module(), not optimize(), and bench_pipeline's optimize()
        # would otherwise switch it on half-way through the run (after fastdiff-eager).
        torch.backends.cudnn.benchmark = True
    else:
        print("no CUDA: toy configs on the CPU eager path (numbers are not GPU figures)")
    results: list[Result] = []
    interrupted = False
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        run_cases(cases, warmup, iters, reference, results=results)
    except Interrupted:
        interrupted = True
        print(f"\ninterrupted after {len(results)} of {len(cases)} cases: reporting those")
        add_speedups(results, reference)
    finally:
        signal.signal(signal.SIGTERM, previous)
    for result in results:
        # `fastdiff bench` passes its own arguments, without --note.
        result.note = join_notes(getattr(args, "note", ""), result.note)
    print()
    print(format_table(results))
    if not args.no_csv and results:
        path = append_csv(results, args.csv)
        print(f"appended {len(results)} rows to {path}")
    failed = any(r.note.startswith("FAILED") for r in results)
    return 1 if failed or interrupted else 0
