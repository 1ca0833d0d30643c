"""The end of a ResNet block with an identity shortcut (x + h + bias, channels-last, fp16) at
the SD1.5 / SDXL U-Net's and the SD VAE decoder's map sizes: the one-pass kernel against
PyTorch's two additions.

Providers: fastdiff (kernels/bias_residual.py), eager (the bias added to h, then the residual:
what the models run where the kernel was not timed faster) and torch.compile of eager.
backend_table.py turns the fastdiff and eager rows into the auto backend's choice per shape.
GB/s counts reading x and h and writing the sum once (the bias is negligible); no FLOP.
Run: python benchmarks/bench_bias_residual.py [--quick] [--out DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Workload, parse_args, random, run_benchmark, standard_providers  # noqa: E402

from fastdiff.ops import bias_residual  # noqa: E402
from fastdiff.ops.bias_residual import bias_residual_eager  # noqa: E402

# (batch, channels, height, width) of the blocks with an identity shortcut
SHAPES = [
    ("sd15 64x64", (2, 320, 64, 64)),
    ("sd15 32x32", (2, 640, 32, 32)),
    ("sd15 16x16", (2, 1280, 16, 16)),
    ("sd15 8x8", (2, 1280, 8, 8)),
    ("vae 512x512", (1, 128, 512, 512)),
    ("vae 256x256", (1, 256, 256, 256)),
    ("vae 128x128", (1, 512, 128, 128)),
    ("vae 64x64", (1, 512, 64, 64)),
    ("sdxl 128x128", (2, 320, 128, 128)),
    ("sdxl 64x64", (2, 640, 64, 64)),
    ("sdxl 32x32", (2, 1280, 32, 32)),
]


def workload(name, dims, dtype) -> Workload:
    def make(reduced: bool):
        batch, channels, height, width = dims
        if reduced:
            channels, height, width = min(channels, 64), min(height, 8), min(width, 8)
        shape = (batch, channels, height, width)
        x, h = (random(shape, dtype).contiguous(memory_format=torch.channels_last) for _ in "xh")
        return x, h, random((channels,), dtype)

    def bytes_moved(inputs) -> float:
        x, _, _ = inputs
        return 3 * x.numel() * x.element_size()

    batch, channels, height, width = dims
    return Workload(f"{name} {batch}x{channels}x{height}x{width}", dtype, make, bytes_moved)


def main() -> None:
    args = parse_args(__doc__)
    shapes = [item for item in SHAPES if not args.quick or not item[0].startswith("sdxl")]
    workloads = [workload(name, dims, torch.float16) for name, dims in shapes]
    providers = standard_providers(bias_residual_eager, bias_residual, None)
    run_benchmark("bias_residual", workloads, providers, args)


if __name__ == "__main__":
    main()
