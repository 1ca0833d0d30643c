"""``fastdiff train``: train the classifier, VAE and class-conditional U-Net on the shapes dataset.

Single process:   fastdiff train --config CONFIG.json
Data parallel:    torchrun --nproc_per_node 2 -m fastdiff train --config CONFIG.json
(gloo on CPU, nccl on CUDA). An interrupted run resumes from its checkpoints when started again
with the same config and output directory.
"""

from __future__ import annotations

import argparse
import json
import os
from importlib import resources

DEFAULT_CONFIG = "shapes.json"


def packaged_config_path(name: str = DEFAULT_CONFIG):
    """Path of a config shipped in ``fastdiff/assets/configs/``."""
    return resources.files("fastdiff").joinpath("assets", "configs", name)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train the shapes classifier, VAE and U-Net (resumable, DDP via torchrun)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        help="training config JSON (default: the config of the shipped model, "
        f"fastdiff/assets/configs/{DEFAULT_CONFIG})",
    )
    parser.add_argument("--output-dir", help="override the config's output_dir")
    parser.add_argument(
        "--stages", help="comma-separated subset of classifier,vae,unet (default: the config's)"
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="override the device")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config as JSON and exit"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from fastdiff.training.config import STAGES, config_from_dict, config_to_dict, load_config
    from fastdiff.training.run import run_training

    # ``is not None`` throughout: an empty value (``--config "$UNSET"``) is refused, not taken as
    # "use the default", which would train another config, or into another folder, than named.
    if args.config is not None:
        if not args.config.strip():
            raise ValueError("--config must name a JSON file, got an empty string")
        config = load_config(args.config)
    else:
        with packaged_config_path().open(encoding="utf-8") as handle:
            config = config_from_dict(json.load(handle))
    overrides = config_to_dict(config)
    if args.output_dir is not None:
        if not args.output_dir.strip():
            raise ValueError("--output-dir must name a folder, got an empty string")
        overrides["output_dir"] = args.output_dir
    if args.stages is not None:
        stages = [name.strip() for name in args.stages.split(",") if name.strip()]
        unknown = [name for name in stages if name not in STAGES]
        if not stages or unknown:
            raise ValueError(
                f"--stages must be a comma-separated subset of {','.join(STAGES)}, "
                f"got {args.stages!r}"
            )
        overrides["stages"] = stages
    if args.device is not None:
        overrides["device"] = args.device
    if args.no_progress:
        overrides["progress"] = False
    config = config_from_dict(overrides)
    if args.print_config:
        print(json.dumps(config_to_dict(config), indent=2))
        return 0
    metrics = run_training(config)
    if metrics.get("unet") is not None and os.environ.get("RANK", "0") == "0":  # once per run
        print(f"pipeline folder: {config.output_dir}/pipeline")
    return 0
