"""Draw the training loss curves of a run folder (``<stage>_log.csv``) into one PNG.

    python -m fastdiff.training.plot RUN_DIR OUT.png

Needs matplotlib (the ``bench`` extra); nothing else in fastdiff imports it.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

TITLES = {
    "classifier": "classifier (cross-entropy)",
    "vae": "VAE (L1 + MSE + KL)",
    "unet": "U-Net (Min-SNR-weighted v-prediction MSE)",
}


def read_log(path: Path) -> tuple[list[int], list[float]]:
    steps, losses = [], []
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            steps.append(int(row["step"]))
            losses.append(float(row["loss"]))
    return steps, losses


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the raw per-step loss of a diffusion model is very noisy)."""
    out, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        out.append(total / min(index + 1, window))
    return out


def plot_losses(run_dir: str | Path, out: str | Path) -> list[str]:
    """Plot every stage log found in ``run_dir``; returns the stages drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise RuntimeError("plotting needs matplotlib: pip install 'fastdiff[bench]'") from error
    run_dir = Path(run_dir)
    stages = [name for name in TITLES if (run_dir / f"{name}_log.csv").exists()]
    if not stages:
        raise FileNotFoundError(f"no <stage>_log.csv files in {run_dir}")
    figure, axes = plt.subplots(1, len(stages), figsize=(4.2 * len(stages), 3.2), squeeze=False)
    for axis, stage in zip(axes[0], stages, strict=True):
        steps, losses = read_log(run_dir / f"{stage}_log.csv")
        axis.plot(steps, losses, color="0.8", linewidth=0.6, label="per step")
        window = max(1, len(losses) // 50)
        axis.plot(steps, smooth(losses, window), color="C0", label=f"mean of {window} steps")
        axis.set_yscale("log")
        axis.set_title(TITLES[stage], fontsize=10)
        axis.set_xlabel("optimizer step")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    axes[0][0].set_ylabel("training loss")
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return stages


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print("usage: python -m fastdiff.training.plot RUN_DIR OUT.png", file=sys.stderr)
        sys.exit(2)
    print("plotted:", ", ".join(plot_losses(sys.argv[1], sys.argv[2])))
