"""``fastdiff bench``: run the model benchmarks (U-Net step, VAE decode, full generation) and
print one table; rows are appended to ``benchmarks/results/<gpu>.csv``.

The benchmark scripts live in the source checkout's ``benchmarks/`` folder (they are not part of
the installed package); this command imports them from there.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

WHICH = ("unet", "vae", "pipeline", "all")


def benchmarks_dir() -> Path:
    folder = Path(__file__).resolve().parents[2] / "benchmarks"
    if not (folder / "model_bench.py").is_file():
        raise RuntimeError(
            f"fastdiff bench runs the benchmark scripts of a source checkout; {folder} has none "
            "(install fastdiff from a git checkout with `pip install -e .`)"
        )
    return folder


def load_benchmarks():
    folder = str(benchmarks_dir())
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return (
        importlib.import_module("model_bench_cli"),
        importlib.import_module("bench_unet"),
        importlib.import_module("bench_vae"),
        importlib.import_module("bench_pipeline"),
    )


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="benchmark the U-Net, the VAE and a full generation against diffusers",
        description="Time fastdiff (optimized and eager) and diffusers on random weights at the "
        "real SD1.5/SDXL architectures (fp16 on GPU; toy models on CPU) and print a table: ms "
        "per call, TFLOP/s, images/s, speedup over diffusers, warm-up seconds, peak memory.",
    )
    parser.add_argument("--which", choices=WHICH, default="all", help="which benchmark (all)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="SD1.5 b2 U-Net, VAE and the 4-step generation, fewer iterations",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="add diffusers + torch.compile (compiles for about a minute each)",
    )
    parser.add_argument(
        "--providers",
        type=lambda text: list(dict.fromkeys(text.split(","))),  # each provider once
        help="comma-separated providers, e.g. fastdiff,diffusers",
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per case")
    parser.add_argument("--iters", type=int, default=None, help="timed calls per case")
    output = parser.add_mutually_exclusive_group()  # a --csv that --no-csv drops is a mistake
    output.add_argument("--csv", type=Path, default=None, help="CSV file to append rows to")
    output.add_argument("--no-csv", action="store_true", help="print the table only")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    cli, bench_unet, bench_vae, bench_pipeline = load_benchmarks()
    modules = {"unet": bench_unet, "vae": bench_vae, "pipeline": bench_pipeline}
    which = ("unet", "vae", "pipeline") if args.which == "all" else (args.which,)
    if args.providers:
        allowed = sorted({p for name in which for p in modules[name].PROVIDERS})
        unknown = [p for p in args.providers if p not in allowed]
        if unknown:
            raise ValueError(f"unknown providers {unknown}; allowed values: {', '.join(allowed)}")
    cases = []
    for name in which:
        providers = None
        if args.providers:
            providers = [p for p in args.providers if p in modules[name].PROVIDERS]
            if not providers:
                continue
        if name == "unet":
            workloads = ["sd15_b2"] if args.quick else None
            cases += bench_unet.cases(workloads, providers, args.compile)
        elif name == "vae":
            cases += bench_vae.cases(providers, args.compile)
        else:
            cases += bench_pipeline.cases([4] if args.quick else None, providers, args.compile)
    return cli.run_and_report(cases, args)
