"""``fastdiff schedule``: compare noise schedules by log-SNR, the quantity that decides how much
signal each step still has. The pitfall it shows: with a plain linear/scaled-linear schedule the
last training step still has alphā > 0 (the model never sees pure noise), and leading spacing
starts sampling well below the noisiest step (Lin et al. 2023)."""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import torch

from fastdiff.files import atomic_write, check_output_path
from fastdiff.sampling import SPACINGS, NoiseSchedule

# (label, NoiseSchedule kwargs): DDPM's linear betas, latent diffusion's scaled linear, cosine.
SCHEDULES = (
    ("linear", {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}),
    ("scaled_linear", {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}),
    ("cosine", {"beta_schedule": "squaredcos_cap_v2"}),
)


def schedule_variants() -> list[tuple[str, NoiseSchedule]]:
    """Each schedule as is and rescaled to zero terminal SNR."""
    variants = []
    for label, kwargs in SCHEDULES:
        variants.append((label, NoiseSchedule(**kwargs)))
        variants.append((f"{label} zero-SNR", NoiseSchedule(**kwargs, rescale_betas_zero_snr=True)))
    return variants


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "schedule",
        help="plot log-SNR against t for the noise schedules and print alphā at the ends",
        description="Print alphā at the first and last sampling steps of each noise schedule "
        "(linear, scaled_linear, cosine; each with and without zero terminal SNR) for every "
        "timestep spacing, and optionally plot log-SNR against the training timestep.",
    )
    parser.add_argument("--plot", type=Path, help="write the log-SNR plot to this PNG file")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the --plot file if it exists"
    )
    parser.add_argument(
        "--steps", type=int, default=50, help="sampling steps for the printed table (default 50)"
    )
    parser.set_defaults(handler=run)


def format_table(variants: list[tuple[str, NoiseSchedule]], steps: int) -> list[str]:
    """One line per schedule and spacing: first/last visited timestep and its alphā."""
    lines = [
        f"{'schedule':<24}{'spacing':<10}{'first t':>8}{'alphā(first)':>15}"
        f"{'last t':>8}{'alphā(last)':>14}{'alphā(T-1)':>13}"
    ]
    for label, schedule in variants:
        final = float(schedule.alphas_cumprod[-1])
        for spacing in SPACINGS:
            timesteps = dataclasses.replace(schedule, timestep_spacing=spacing).timesteps(
                steps, "ddim"
            )
            first, last = int(timesteps[0]), int(timesteps[-1])
            lines.append(
                f"{label:<24}{spacing:<10}{first:>8}"
                f"{float(schedule.alphas_cumprod[first]):>15.3e}{last:>8}"
                f"{float(schedule.alphas_cumprod[last]):>14.6f}{final:>13.3e}"
            )
    return lines


def write_plot(
    variants: list[tuple[str, NoiseSchedule]], path: Path, overwrite: bool = False
) -> None:
    """log-SNR against t, solid for the schedules, dashed for their zero-SNR versions."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise RuntimeError(
            "--plot needs matplotlib: pip install matplotlib (or the 'bench' extra)"
        ) from error
    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    colors = {}
    for label, schedule in variants:
        base = label.split()[0]
        log_snr = schedule.log_snr(torch.arange(schedule.num_train_timesteps)).tolist()
        # Zero terminal SNR is -inf at the last step: leave it off the line and say so.
        values = [value if math.isfinite(value) else math.nan for value in log_snr]
        line = axes.plot(
            range(len(values)),
            values,
            linestyle="--" if "zero" in label else "-",
            color=colors.get(base),
            label=label + (" (-inf at T-1)" if "zero" in label else ""),
        )[0]
        colors[base] = line.get_color()
    axes.set_xlabel("training timestep t")
    axes.set_ylabel("log SNR(t) = log(alphā / (1 - alphā))")
    axes.set_title("Noise schedules: log-SNR against t")
    axes.axhline(0.0, color="grey", linewidth=0.5)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    atomic_write(
        path,
        lambda temporary: figure.savefig(temporary, format="png", dpi=120),
        overwrite=overwrite,
    )


def run(args: argparse.Namespace) -> int:
    if args.steps < 1 or args.steps > 1000:
        raise ValueError(f"--steps must be in [1, 1000], got {args.steps}")
    if args.plot is not None:
        # Before any work: a .png name in a writable folder, replacing a file only if asked.
        check_output_path(args.plot, overwrite=args.overwrite, option="--plot", suffix=".png")
    variants = schedule_variants()
    for line in format_table(variants, args.steps):
        print(line)
    if args.plot is not None:
        write_plot(variants, args.plot, args.overwrite)
        print(f"wrote {args.plot}")
    return 0
