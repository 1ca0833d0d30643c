"""Draw the model benchmark rows (unet, vae, pipeline) of a results CSV as one PNG: ms per call
per provider for each workload (log scale; latest row of each workload/provider wins).

    python benchmarks/plot_models.py benchmarks/results/<gpu>.csv [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

MODEL_BENCHMARKS = ("unet", "vae", "pipeline")


def load(path: Path) -> dict[str, dict[tuple[str, str], float]]:
    """{benchmark: {(workload, provider): ms}} from the latest rows with a time."""
    table: dict[str, dict[tuple[str, str], float]] = defaultdict(dict)
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get("benchmark") in MODEL_BENCHMARKS and row.get("ms"):
                table[row["benchmark"]][(row["workload"], row["provider"])] = float(row["ms"])
    return table


def plot(table: dict[str, dict[tuple[str, str], float]], title: str, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name in MODEL_BENCHMARKS if name in table]
    if not names:
        raise ValueError(f"no {'/'.join(MODEL_BENCHMARKS)} rows with a time in the CSV")
    figure, axes = plt.subplots(len(names), 1, figsize=(12, 3.6 * len(names)), squeeze=False)
    for axis, name in zip(axes[:, 0], names, strict=True):
        values = table[name]
        workloads = list(dict.fromkeys(w for w, _ in values))
        providers = list(dict.fromkeys(p for _, p in values))
        width = 0.8 / len(providers)
        for index, provider in enumerate(providers):
            xs = [i + index * width for i in range(len(workloads))]
            axis.bar(xs, [values.get((w, provider), 0.0) for w in workloads], width, label=provider)
        axis.set_xticks([i + 0.4 - width / 2 for i in range(len(workloads))])
        axis.set_xticklabels(workloads, fontsize=8)
        axis.set_yscale("log")
        axis.set_ylabel("ms per call (log)")
        axis.set_title(name)
        axis.legend(fontsize=7, ncol=min(len(providers), 4))
    figure.suptitle(title)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=90)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("csv", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="folder for the PNG")
    args = parser.parse_args()
    out = (args.out or args.csv.parent) / f"{args.csv.stem}-models.png"
    print(f"wrote {plot(load(args.csv), args.csv.stem, out)}")


if __name__ == "__main__":
    main()
