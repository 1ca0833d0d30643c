"""``fastdiff demo``: generate a labelled grid from the model that ships inside fastdiff.

One row per class: samples without guidance (w = 1) on the left, the same starting noise with
classifier-free guidance on the right. Prints the time taken, the ops backend and the shipped
classifier's accuracy on the grid.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="generate a labelled sample grid with the built-in shapes model (no download)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="demo_grid.png", help="output PNG (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument(
        "--steps", type=int, default=20, help="sampling steps (default: %(default)s)"
    )
    parser.add_argument(
        "--guidance", type=float, default=3.0, help="guidance scale of the right half (default: 3)"
    )
    parser.add_argument("--per-class", type=int, default=4, help="samples per class and side")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument(
        "--sampler",
        default="ddim",
        help="ddim, ddpm, euler[_ancestral|_karras], dpmpp_{2m,3m}[_sde][_karras], heun[_karras], "
        "kdpm2[_ancestral][_karras], pndm, lms[_karras], lcm, tcd, unipc[_karras] "
        "(default: ddim)",
    )
    parser.add_argument("--model", help="pipeline folder (default: the shipped shapes model)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from fastdiff.files import check_output_path
    from fastdiff.ops import select_backend
    from fastdiff.pipeline import Pipeline
    from fastdiff.training.classifier import predict
    from fastdiff.training.evaluate import default_model_path, generate, load_pipeline_classifier
    from fastdiff.training.grid import save_grid
    from fastdiff.training.shapes import balanced_labels

    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.per_class < 1:
        raise ValueError(f"--per-class must be >= 1, got {args.per_class}")
    if not args.guidance > 1.0:  # the pipeline samples w <= 1 unguided: both halves would match
        raise ValueError(
            f"--guidance must be greater than 1 (the right half is the guided one; w <= 1 "
            f"turns guidance off), got {args.guidance:g}"
        )
    check_output_path(args.out, overwrite=args.overwrite, suffix=".png")
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        raise ValueError(f"--device {args.device!r} is not a torch device: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {args.device} was requested but CUDA is not available")
    folder = Path(args.model) if args.model else default_model_path()
    started = time.perf_counter()
    pipe = Pipeline.from_pretrained(folder, device=args.device, dtype=torch.float32)
    classifier = load_pipeline_classifier(folder)
    loaded = time.perf_counter()

    labels = balanced_labels(args.per_class)
    plain = generate(pipe, labels, 1.0, args.steps, args.seed, args.sampler)
    guided = generate(pipe, labels, args.guidance, args.steps, args.seed, args.sampler)
    sampled = time.perf_counter()
    plain_accuracy = (predict(classifier, plain) == labels).float().mean().item()
    guided_accuracy = (predict(classifier, guided) == labels).float().mean().item()

    names = pipe.class_names or [f"class {index}" for index in range(pipe.num_classes)]
    save_grid(
        Path(args.out),
        plain,
        guided,
        names,
        args.per_class,
        left_title="no guidance (w=1)",
        right_title=f"guidance w={args.guidance:g}",
        overwrite=args.overwrite,
    )
    finished = time.perf_counter()
    probe = next(pipe.unet.parameters())
    requested = os.environ.get("FASTDIFF_BACKEND") or "default"
    print(
        f"wrote {args.out}: {len(names)} classes x {args.per_class} samples, w=1 and "
        f"w={args.guidance:g}, {args.sampler} {args.steps} steps, seed {args.seed}"
    )
    print(
        f"backend: {select_backend(probe)} (FASTDIFF_BACKEND={requested}), "
        f"device {probe.device}, torch threads {torch.get_num_threads()}"
    )
    print(
        f"time: {finished - started:.1f} s total (load {loaded - started:.1f} s, "
        f"sampling {sampled - loaded:.1f} s, {2 * labels.numel()} images)"
    )
    print(
        f"classifier accuracy: {plain_accuracy:.0%} at w=1, "
        f"{guided_accuracy:.0%} at w={args.guidance:g}"
    )
    return 0
