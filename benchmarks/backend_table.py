"""Build the ``auto`` backend's table (fastdiff/ops/autoselect.py) from a benchmark results CSV.

Reads the GroupNorm+SiLU, attention, linear_geglu, conv3x3, cat_channels, bias_residual and
upsample rows that bench_group_norm.py, bench_attention.py, bench_linear_geglu.py,
bench_conv3x3.py, bench_cat_channels.py, bench_bias_residual.py and bench_upsample.py append to
``benchmarks/results/<gpu>.csv`` and writes, per op and input key, the measured ms of each
backend (provider fastdiff = triton, eager = PyTorch, cuda = the CUDA extension; for
linear_geglu, fastdiff-two-steps = its eager backend; for the upsamplers, eager = the two steps,
fastdiff = the transposed fold and fastdiff-phases = the phases fold). The
latest row wins when a case was measured more than once; failed rows (no ms) are left out (a
later failure drops an earlier timing of that backend), and so are conv3x3 rows without
bench_conv3x3's ``cudnn.benchmark`` note (cuDNN timed against its heuristic algorithms, not the
timed ones optimize() runs).

  python benchmarks/backend_table.py benchmarks/results/nvidia-h200.csv \\
      --out fastdiff/assets/backend_table.json

Given several CSVs (the committed one and a new run's, as gpu_check.sh does before its model
step), their rows count as one: the latest row of each case wins, whichever file holds it.
Rows of more than one device (another GPU's CSV, a CPU run's) are refused.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import FUSED_QKV_SUFFIX  # noqa: E402
from bench_attention import SHAPES as ATTENTION_SHAPES  # noqa: E402
from bench_conv3x3 import CUDNN_BENCHMARK_NOTE  # noqa: E402
from bench_linear_geglu import TWO_STEPS  # noqa: E402

from fastdiff.ops.autoselect import STRIDED, table_from_rows  # noqa: E402

PROVIDER_BACKENDS = {"fastdiff": "triton", "eager": "eager", "cuda": "cuda"}
# linear_geglu's eager backend is its two steps (cuBLAS, then the GEGLU kernel), timed as
# bench_linear_geglu's fastdiff-two-steps rows; its plain-PyTorch eager rows are not a backend.
# The upsamplers' "backends" are the ways Upsample2D runs (fastdiff.models.upsample_fold).
OP_PROVIDER_BACKENDS = {
    "linear_geglu": {"fastdiff": "triton", TWO_STEPS: "eager"},
    "upsample": {"eager": "eager", "fastdiff": "transposed", "fastdiff-phases": "phases"},
}
ATTENTION_DIMS = dict(ATTENTION_SHAPES)  # name -> (batch, heads, queries, keys, head_dim)


def row_key(row: dict[str, str]) -> tuple[str, str] | None:
    """(op, autoselect key) of a results row, or None for rows the table does not use."""
    dtype = row.get("dtype", "")
    if row["benchmark"] == "group_norm_silu":
        shape, _, layout = row["workload"].partition(" ")
        if layout in ("nchw", "nhwc"):
            return "group_norm", f"{shape}|{dtype}|{layout}"
    if row["benchmark"] == "attention":
        # "(fused-qkv views)": q, k and v are views of one projection, as the runtime passes them
        name, views, _ = row["workload"].partition(FUSED_QKV_SUFFIX)
        if name in ATTENTION_DIMS:
            batch, heads, queries, keys, head_dim = ATTENTION_DIMS[name]
            key = f"{batch}x{heads}x{queries}x{head_dim}|{dtype}|keys{keys}"
            return "attention", key + (STRIDED if views else "")
    if row["benchmark"] == "linear_geglu":  # workload "<name> <rows>x<K>x<2I>"
        return "linear_geglu", f"{row['workload'].split()[-1]}|{dtype}"
    if row["benchmark"] == "cat_channels":  # workload "<name> <B>x<C>x<H>x<W> a<CA>"
        return "cat_channels", f"{row['workload'].split()[-2]}|{dtype}|nhwc"
    if row["benchmark"] == "bias_residual":  # workload "<name> <B>x<C>x<H>x<W>", channels-last
        return "bias_residual", f"{row['workload'].split()[-1]}|{dtype}|nhwc"
    if row["benchmark"] == "upsample":  # workload "<name> <B>x<C>x<H>x<W>" (the small map), NHWC
        return "upsample", f"{row['workload'].split()[-1]}|{dtype}|nhwc"
    notes = (row.get("note") or "").split("; ")
    if row["benchmark"] == "conv3x3" and CUDNN_BENCHMARK_NOTE in notes:
        # workload "<name> <B>x<C>x<H>x<W> out<N>", channels-last; rows timed against cuDNN's
        # heuristic algorithms (before the note) are left out: optimize() runs its timed ones
        shape, out = row["workload"].split()[-2:]
        return "conv3x3", f"{shape}|{dtype}|nhwc|{out}"
    return None


def build_table(*csv_paths: Path) -> dict:
    # A failed row (no ms) is the latest word on its slot too: an earlier timing of a backend
    # that now fails at that shape must not route the op to it.
    latest: dict[tuple[str, str, str], tuple[str, float | None]] = {}
    devices: dict[str, Path] = {}  # device -> the first file with a row of it
    for csv_path in csv_paths:
        with csv_path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                key = row_key(row)
                if key is None:
                    continue
                backend = OP_PROVIDER_BACKENDS.get(key[0], PROVIDER_BACKENDS).get(row["provider"])
                if backend is None:
                    continue
                if row.get("device"):
                    devices.setdefault(row["device"], csv_path)
                stamp = row.get("timestamp", "")
                slot = (*key, backend)
                if slot not in latest or stamp >= latest[slot][0]:
                    latest[slot] = (stamp, float(row["ms"]) if row.get("ms") else None)
    if len(devices) > 1:
        # The latest row of a case would win whichever machine timed it: another GPU's, or a CPU
        # run's wall clock at reduced shapes under the same workload names.
        found = ", ".join(f"{name!r} ({path})" for name, path in devices.items())
        raise ValueError(f"rows of more than one device: {found}; build a table per device")
    rows = [(op, key, backend, ms) for (op, key, backend), (_, ms) in sorted(latest.items())]
    table = table_from_rows(next(iter(devices), "unknown"), rows)
    names = " + ".join(f"{path.resolve().parent.name}/{path.name}" for path in csv_paths)
    table["source"] = f"benchmarks/backend_table.py from {names}"
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    parser.add_argument(
        "csv",
        type=Path,
        nargs="+",
        help="results CSVs (benchmarks/results/<gpu>.csv); the latest row of a case wins",
    )
    parser.add_argument("--out", type=Path, help="JSON to write (default: print)")
    args = parser.parse_args()
    try:
        table = build_table(*args.csv)
    except ValueError as error:
        raise SystemExit(f"backend_table.py: {error}") from None
    if not table["entries"]:
        names = ", ".join(str(path) for path in args.csv)
        raise SystemExit(f"{names}: no rows with timings of an op the auto backend chooses for")
    text = json.dumps(table, indent=1) + "\n"
    if args.out is None:
        print(text, end="")
        return
    temporary = args.out.with_suffix(".tmp")
    temporary.write_text(text)
    temporary.replace(args.out)
    print(f"wrote {args.out}: {len(table['entries'])} entries from {table['source']}")


if __name__ == "__main__":
    main()
