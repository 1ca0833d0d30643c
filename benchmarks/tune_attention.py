"""Autotune the attention kernel at the shapes the optimized U-Nets launch, and write the winners
as the table the launcher reads before autotuning (kernels/attention_configs.py):
``<OUT>/<capability>.json``, to be committed as ``fastdiff/assets/attention_configs/``.

    python benchmarks/tune_attention.py --out DIR [--models sd15@64,sdxl@128]
                                        [--merge fastdiff/assets/attention_configs/sm_90.json]

Each model (``name@latent size``: sd15, sdxl; random weights at the real architecture,
benchmarks/model_configs.py) is prepared as bench_unet's ``fastdiff`` provider prepares it (what
``optimize()`` does: fp16, channels-last, fused QKV, folds, CUDA graph) and called once, with the
shipped table off (FASTDIFF_ATTENTION_CONFIGS=off, set here), so every shape the backend choice
sends to our kernel is autotuned in the layout the model passes; the autotuner's cache then holds
one winner per shape. Shapes the backend table sends to cuDNN are not tuned (nothing launches
them). ``--merge`` keeps an existing table's other entries. Needs a CUDA GPU; fp16 only (the
dtype optimize() picks on a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_unet  # noqa: E402
import fastdiff.kernels.attention as attention_kernels  # noqa: E402
import model_bench as mb  # noqa: E402
from fastdiff.kernels import attention_configs  # noqa: E402
from model_configs import model_config  # noqa: E402

MODELS = {"sd15": "sd15_unet", "sdxl": "sdxl_unet"}  # names of benchmarks/model_configs.py


def parse_models(text: str) -> list[bench_unet.UNetWorkload]:
    workloads = []
    for item in text.split(","):
        name, _, size = item.partition("@")
        if name not in MODELS or not size.isdigit() or int(size) < 8 or int(size) % 8:
            raise ValueError(
                f"--models: {item!r} is not NAME@LATENT_SIZE with NAME one of "
                f"{', '.join(MODELS)} and a latent size that is a multiple of 8 (e.g. sd15@64)"
            )
        config = MODELS[name]
        context_dim = model_config(config)["cross_attention_dim"]
        workloads.append(
            bench_unet.UNetWorkload(f"{name}@{size}", config, 2, int(size), 77, context_dim)
        )
    return workloads


def tune(work: bench_unet.UNetWorkload) -> float:
    """Prepare the model and call it once; seconds the call took (compilation and tuning)."""
    holder = mb.ModelHolder("unet", work.config, torch.device("cuda"), torch.float16)
    torch.backends.cudnn.benchmark = True  # as optimize() and bench_unet set it
    try:
        with torch.no_grad():
            run = bench_unet.provider_setup("fastdiff", work, holder)()
            torch.cuda.synchronize()
            begin = time.perf_counter()
            run()
            torch.cuda.synchronize()
            return time.perf_counter() - begin
    finally:
        holder.release()
        mb.free_memory()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for <capability>.json")
    parser.add_argument("--models", default="sd15@64,sdxl@128", help="NAME@LATENT_SIZE,...")
    parser.add_argument("--merge", type=Path, help="an existing table whose entries to keep")
    args = parser.parse_args(argv)
    workloads = parse_models(args.models)
    os.environ[attention_configs.ENV] = "off"  # tune every shape, whatever a table says
    if not torch.cuda.is_available():
        print("tune_attention: no CUDA device; nothing to tune (the table holds GPU timings)")
        return 1
    device = torch.device("cuda")
    capability = attention_configs.capability_name(device)
    old = []
    if args.merge is not None:
        merge_capability, _ = attention_configs.read(args.merge)
        if merge_capability != capability:
            raise ValueError(
                f"--merge {args.merge} is for {merge_capability}, this GPU is {capability}"
            )
        old = json.loads(args.merge.read_text())["entries"]
    # The shipped winners are timed at Triton's own default length, not the launcher's shorter one.
    timing, attention_kernels.AUTOTUNE_TIMING_MS = attention_kernels.AUTOTUNE_TIMING_MS, (25, 100)
    try:
        for work in workloads:
            before = len(attention_kernels.attention_forward_kernel.cache)
            seconds = tune(work)
            added = len(attention_kernels.attention_forward_kernel.cache) - before
            print(f"{work.name}: first call {seconds:.1f} s, {added} new attention shapes tuned")
    finally:
        attention_kernels.AUTOTUNE_TIMING_MS = timing
    entries = attention_configs.entries_from_cache(attention_kernels.attention_forward_kernel.cache)
    for entry in entries:
        print("tuned", json.dumps(entry))
    table = {
        "capability": capability,
        "measured_on": torch.cuda.get_device_name(device),
        "versions": {"torch": torch.__version__, "triton": triton.__version__},
        "models": args.models,
        "entries": attention_configs.merged(old, entries),
    }
    attention_configs.parse(table, "the new table")  # what the launcher will read
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{capability}.json"
    path.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {path}: {len(table['entries'])} entries ({len(entries)} tuned in this run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
