"""Draw the kernel benchmark results of a CSV as PNG bar charts (one panel per benchmark).

Each panel shows, per workload, every provider's speedup over eager (latest row of each
(benchmark, workload, provider, dtype) wins). Run:
    python benchmarks/plot.py benchmarks/results/<gpu>.csv [--out DIR] [--benchmarks a,b]
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

KERNEL_BENCHMARKS = (
    "group_norm_silu",
    "attention",
    "sampler_step",
    "layer_norm",
    "geglu",
    "linear_geglu",
    "conv3x3",
)


def load(path: Path, benchmarks: tuple[str, ...]) -> dict[str, dict[tuple[str, str], float]]:
    """{benchmark: {(workload, provider): speedup}} from the latest rows of the CSV."""
    table: dict[str, dict[tuple[str, str], float]] = defaultdict(dict)
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get("benchmark") not in benchmarks or not row.get("speedup"):
                continue
            label = row["workload"] + (f" {row['dtype']}" if row.get("dtype") else "")
            table[row["benchmark"]][(label, row["provider"])] = float(row["speedup"])
    return table


def plot(table: dict[str, dict[tuple[str, str], float]], title: str, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [b for b in KERNEL_BENCHMARKS if b in table] + sorted(
        b for b in table if b not in KERNEL_BENCHMARKS
    )
    if not names:
        raise ValueError("no benchmark rows with a speedup in the CSV")
    figure, axes = plt.subplots(len(names), 1, figsize=(13, 3.6 * len(names)), squeeze=False)
    for axis, name in zip(axes[:, 0], names, strict=True):
        values = table[name]
        workloads = list(dict.fromkeys(w for w, _ in values))
        providers = list(dict.fromkeys(p for _, p in values))
        width = 0.8 / len(providers)
        for index, provider in enumerate(providers):
            xs = [i + index * width for i in range(len(workloads))]
            ys = [values.get((w, provider), 0.0) for w in workloads]
            axis.bar(xs, ys, width, label=provider)
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_xticks([i + 0.4 - width / 2 for i in range(len(workloads))])
        axis.set_xticklabels(workloads, rotation=20, ha="right", fontsize=7)
        axis.set_yscale("log")
        axis.set_ylabel("speedup vs eager (log)")
        axis.set_title(name)
        axis.legend(fontsize=7, ncol=len(providers))
    figure.suptitle(title)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=90)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("csv", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="folder for the PNG")
    parser.add_argument(
        "--benchmarks", type=lambda s: tuple(s.split(",")), default=KERNEL_BENCHMARKS
    )
    args = parser.parse_args()
    table = load(args.csv, args.benchmarks)
    out = (args.out or args.csv.parent) / f"{args.csv.stem}-kernels.png"
    print(f"wrote {plot(table, args.csv.stem, out)}")


if __name__ == "__main__":
    main()
