"""The U-Net up blocks' skip concatenations (channels-last, fp16, SD1.5 / SDXL shapes): the
row-copy kernel against torch.cat.

Providers: fastdiff (kernels/cat_channels.py), eager (torch.cat, what the models run where the
kernel was not timed faster) and torch.compile of eager. backend_table.py turns the fastdiff and
eager rows into the auto backend's choice per shape. GB/s counts reading both inputs and writing
the output once; there are no FLOP.
Run: python benchmarks/bench_cat_channels.py [--quick] [--out DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Workload, parse_args, random, run_benchmark, standard_providers  # noqa: E402

from fastdiff.ops import cat_channels  # noqa: E402
from fastdiff.ops.cat_channels import cat_channels_eager  # noqa: E402

# (batch, channels of the upsampled map, channels of the skip, height, width)
SHAPES = [
    ("sd15 8x8", (2, 1280, 1280, 8, 8)),
    ("sd15 16x16", (2, 1280, 1280, 16, 16)),
    ("sd15 16x16", (2, 1280, 640, 16, 16)),
    ("sd15 32x32", (2, 1280, 640, 32, 32)),
    ("sd15 32x32", (2, 640, 640, 32, 32)),
    ("sd15 32x32", (2, 640, 320, 32, 32)),
    ("sd15 64x64", (2, 640, 320, 64, 64)),
    ("sd15 64x64", (2, 320, 320, 64, 64)),
    ("sdxl 32x32", (2, 1280, 1280, 32, 32)),
    ("sdxl 64x64", (2, 1280, 640, 64, 64)),
    ("sdxl 128x128", (2, 640, 320, 128, 128)),
    ("sdxl 128x128", (2, 320, 320, 128, 128)),
]


def workload_name(name: str, dims: tuple[int, int, int, int, int]) -> str:
    """``<name> <B>x<C>x<H>x<W> a<CA>`` with C the output's channels: backend_table.py reads the
    shape back from the second-to-last word."""
    batch, channels_a, channels_b, height, width = dims
    return f"{name} {batch}x{channels_a + channels_b}x{height}x{width} a{channels_a}"


def workload(name, dims, dtype) -> Workload:
    def make(reduced: bool):
        batch, channels_a, channels_b, height, width = dims
        if reduced:
            channels_a, channels_b = min(channels_a, 64), min(channels_b, 32)
            height, width = min(height, 8), min(width, 8)
        shape_a = (batch, channels_a, height, width)
        shape_b = (batch, channels_b, height, width)
        return tuple(
            random(shape, dtype).contiguous(memory_format=torch.channels_last)
            for shape in (shape_a, shape_b)
        )

    def bytes_moved(inputs) -> float:
        a, b = inputs
        return 2 * (a.numel() + b.numel()) * a.element_size()

    return Workload(workload_name(name, dims), dtype, make, bytes_moved=bytes_moved)


def main() -> None:
    args = parse_args(__doc__)
    shapes = [item for item in SHAPES if not args.quick or item[0].startswith("sd15")]
    workloads = [workload(name, dims, torch.float16) for name, dims in shapes]
    providers = standard_providers(cat_channels_eager, cat_channels, None)
    run_benchmark("cat_channels", workloads, providers, args)


if __name__ == "__main__":
    main()
