"""3x3 convolutions of the U-Net's small feature maps (channels-last, SD1.5 / SDXL shapes): the
split-reduction kernel against cuDNN.

Providers: fastdiff (kernels/conv3x3.py), eager (PyTorch's convolution: cuDNN, channels-last,
the path the optimized runtime runs where the kernel was not timed faster) and torch.compile of
eager. backend_table.py turns the fastdiff and eager rows into the auto backend's choice per
shape. TFLOP/s counts 2·B·H·W·N·9C; GB/s counts reading x and the weight and writing the output
once.
Run: python benchmarks/bench_conv3x3.py [--quick] [--out DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Workload, parse_args, random, run_benchmark, standard_providers  # noqa: E402

from fastdiff.ops import conv3x3  # noqa: E402
from fastdiff.ops.conv3x3 import conv3x3_eager  # noqa: E402

# (batch, in channels, height, width, out channels)
SHAPES = [
    ("sd15 8x8", (2, 1280, 8, 8, 1280)),
    ("sd15 8x8 up", (2, 2560, 8, 8, 1280)),
    ("sd15 16x16", (2, 1280, 16, 16, 1280)),
    ("sd15 16x16 up", (2, 2560, 16, 16, 1280)),
    ("sd15 32x32", (2, 640, 32, 32, 640)),
    ("sdxl 32x32", (2, 1280, 32, 32, 1280)),
]
QUICK = {"sd15 8x8", "sd15 8x8 up", "sd15 16x16"}
# cuDNN's algorithms are timed and chosen per shape (torch.backends.cudnn.benchmark), as
# optimize() has them: its heuristic choice ran the SD1.5 8x8 convolution in 27.6 µs here, its
# timed choice in 21.0 µs inside the optimized U-Net (H200, 2026-11-28), so rows without this
# note compare the kernel with a slower cuDNN than the model runs; backend_table.py skips them.
CUDNN_BENCHMARK_NOTE = "cudnn.benchmark"


def workload_name(name: str, dims: tuple[int, int, int, int, int]) -> str:
    """``<name> <B>x<C>x<H>x<W> out<N>``: backend_table.py reads the last two words back."""
    batch, channels, height, width, out_channels = dims
    return f"{name} {batch}x{channels}x{height}x{width} out{out_channels}"


def workload(name, dims, dtype) -> Workload:
    def make(reduced: bool):
        batch, channels, height, width, out_channels = dims
        if reduced:
            channels, out_channels = min(channels, 64), min(out_channels, 64)
        x = random((batch, channels, height, width), dtype)
        weight = random((out_channels, channels, 3, 3), dtype) / (9 * channels) ** 0.5
        weight = weight.contiguous(memory_format=torch.channels_last)  # as optimize() leaves it
        bias = random((out_channels,), dtype)
        return x.contiguous(memory_format=torch.channels_last), weight, bias

    def flop(inputs) -> float:
        x, weight, _ = inputs
        batch, channels, height, width = x.shape
        return 2.0 * batch * height * width * weight.shape[0] * 9 * channels

    def bytes_moved(inputs) -> float:
        x, weight, bias = inputs
        out = x.shape[0] * weight.shape[0] * x.shape[2] * x.shape[3]
        return (x.numel() + weight.numel() + bias.numel() + out) * x.element_size()

    return Workload(
        workload_name(name, dims),
        dtype,
        make,
        bytes_moved=bytes_moved,
        flop=flop,
        note=CUDNN_BENCHMARK_NOTE,
    )


def main() -> None:
    args = parse_args(__doc__)
    torch.backends.cudnn.benchmark = True  # as optimize() sets it (CUDNN_BENCHMARK_NOTE)
    shapes = [item for item in SHAPES if not args.quick or item[0] in QUICK]
    workloads = [workload(name, dims, torch.float16) for name, dims in shapes]
    run_benchmark("conv3x3", workloads, standard_providers(conv3x3_eager, conv3x3, None), args)


if __name__ == "__main__":
    main()
