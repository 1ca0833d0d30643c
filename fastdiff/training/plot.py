"""Draw the training loss curves of a run folder (``<stage>_log.csv``) into one PNG.

    python -m fastdiff.training.plot RUN_DIR OUT.png [--overwrite]

Needs matplotlib (the ``bench`` extra); only this script and ``fastdiff schedule --plot`` import it.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from fastdiff.files import atomic_write, check_output_path

TITLES = {
    "classifier": "classifier (cross-entropy)",
    "vae": "VAE (L1 + MSE + KL)",
    "unet": "U-Net (diffusion loss)",
}
TARGETS = {"epsilon": "ε-prediction", "v_prediction": "v-prediction", "sample": "x0-prediction"}


def unet_title(run_dir: Path) -> str:
    """The U-Net's objective as the run trained it (metrics.json's config), else generic."""
    try:
        unet = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))["config"]["unet"]
        target = TARGETS[unet["prediction_type"]]
    except (OSError, ValueError, KeyError, TypeError):
        return TITLES["unet"]
    weighting = "Min-SNR-weighted " if unet.get("min_snr_gamma") else ""
    return f"U-Net ({weighting}{target} MSE)"


def read_log(path: Path) -> tuple[list[int], list[float]]:
    steps, losses = [], []
    with open(path, newline="", encoding="utf-8") as handle:
        try:
            for row in csv.DictReader(handle):
                steps.append(int(row["step"]))
                losses.append(float(row["loss"]))
        except (KeyError, ValueError, TypeError) as error:
            raise ValueError(
                f"{path} is not a training loss log ({type(error).__name__}: {error})"
            ) from None
    return steps, losses


def log_interval(steps: list[int]) -> int:
    """The step interval of a log's rows (its ``log_every``): the most common gap, 1 if unknown."""
    gaps = [later - earlier for earlier, later in zip(steps, steps[1:], strict=False)]
    gaps = [gap for gap in gaps if gap > 0]
    if not gaps:
        return 1
    return max(set(gaps), key=gaps.count)


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the raw per-step loss of a diffusion model is very noisy)."""
    out, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        out.append(total / min(index + 1, window))
    return out


def plot_losses(run_dir: str | Path, out: str | Path, overwrite: bool = True) -> list[str]:
    """Plot every stage log found in ``run_dir`` into the PNG ``out`` (written atomically; an
    existing file is kept unless ``overwrite``); returns the stages drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise RuntimeError("plotting needs matplotlib: pip install 'fastdiff[bench]'") from error
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder not found: {run_dir}")
    check_output_path(out, overwrite=overwrite, option="OUT.png", suffix=".png")
    stages = [name for name in TITLES if (run_dir / f"{name}_log.csv").exists()]
    if not stages:
        raise FileNotFoundError(f"no <stage>_log.csv files in {run_dir}")
    figure, axes = plt.subplots(1, len(stages), figsize=(4.2 * len(stages), 3.2), squeeze=False)
    for axis, stage in zip(axes[0], stages, strict=True):
        steps, losses = read_log(run_dir / f"{stage}_log.csv")
        # A log written with log_every = k holds every k-th step's loss: the labels count steps
        # (not rows), so they do not claim a per-step curve or a k-times narrower average.
        every = log_interval(steps)
        window = max(1, len(losses) // 50)
        raw_label = "per step" if every == 1 else f"every {every} steps"
        axis.plot(steps, losses, color="0.8", linewidth=0.6, label=raw_label)
        mean_label = (
            f"mean of {window} steps"
            if every == 1
            else f"mean of {window} logged losses ({window * every} steps)"
        )
        axis.plot(steps, smooth(losses, window), color="C0", label=mean_label)
        axis.set_yscale("log")
        axis.set_title(unet_title(run_dir) if stage == "unet" else TITLES[stage], fontsize=10)
        axis.set_xlabel("optimizer step")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    axes[0][0].set_ylabel("training loss")
    figure.tight_layout()
    try:
        atomic_write(
            out,
            lambda temporary: figure.savefig(temporary, format="png", dpi=110),
            overwrite=overwrite,
        )
    finally:
        plt.close(figure)
    return stages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastdiff.training.plot", description="Plot a run's training losses."
    )
    parser.add_argument("run_dir", type=Path, help="the run's output_dir (<stage>_log.csv)")
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT.png if it exists")
    args = parser.parse_args(argv)
    try:
        stages = plot_losses(args.run_dir, args.out, overwrite=args.overwrite)
    except (ValueError, OSError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"plotted {', '.join(stages)} into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
