"""The upsamplers of the U-Net and the VAE decoder (nearest-neighbour 2x, then a 3x3
convolution; channels-last, fp16): the checkpoint's two steps against the folded convolution
over the small map (``fastdiff.models.upsample_fold``, ``optimize(upsample_fold=...)``).

Providers: eager (``F.interpolate`` then cuDNN's convolution, what ``Upsample2D`` runs
unfolded), fastdiff (the "transposed" fold: one ``conv_transpose2d``, stride 2, 4x4 kernel),
fastdiff-phases (the "phases" fold: one 2x2 convolution with 4x the output channels, then a
strided copy that interleaves them and adds the bias) and torch.compile of eager. The folded
weights are derived once, outside the timing, as the model keeps them. TFLOP/s counts the
two-step path's multiply-adds (9 taps on the upsampled map) for every provider, so it reads as
an effective rate: the folds do 4/9 of them. GB/s counts reading x and the weight and writing
the output once.
Run: python benchmarks/bench_upsample.py [--quick] [--out DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Workload, on_gpu, parse_args, random, run_benchmark  # noqa: E402

from fastdiff.models.upsample_fold import derive, upsample_conv  # noqa: E402

# (batch, channels, height, width) of the map before the upsampling
SHAPES = [
    ("sd15 unet 8x8", (2, 1280, 8, 8)),
    ("sd15 unet 16x16", (2, 1280, 16, 16)),
    ("sd15 unet 32x32", (2, 640, 32, 32)),
    ("sdxl unet 32x32", (2, 1280, 32, 32)),
    ("sdxl unet 64x64", (2, 640, 64, 64)),
    ("vae decode 64x64", (1, 512, 64, 64)),
    ("vae decode 128x128", (1, 512, 128, 128)),
    ("vae decode 256x256", (1, 256, 256, 256)),
]
QUICK = {
    "sd15 unet 8x8",
    "sd15 unet 16x16",
    "sd15 unet 32x32",
    "vae decode 64x64",
    "vae decode 128x128",
    "vae decode 256x256",
}
NOTE = "cudnn.benchmark"  # cuDNN's algorithms timed per shape, as optimize() has them


def upsample_eager(x, weight, bias):
    """What ``Upsample2D`` runs unfolded."""
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)


def workload(name, dims, dtype) -> Workload:
    def make(reduced: bool):
        batch, channels, height, width = dims
        if reduced:
            channels, height, width = min(channels, 32), min(height, 16), min(width, 16)
        x = random((batch, channels, height, width), dtype)
        weight = random((channels, channels, 3, 3), dtype) / (9 * channels) ** 0.5
        weight = weight.contiguous(memory_format=torch.channels_last)  # as optimize() leaves it
        bias = random((channels,), dtype)
        return x.contiguous(memory_format=torch.channels_last), weight, bias

    def flop(inputs) -> float:
        x, weight, _ = inputs
        batch, channels, height, width = x.shape
        return 2.0 * batch * 4 * height * width * weight.shape[0] * 9 * channels

    def bytes_moved(inputs) -> float:
        x, weight, bias = inputs
        out = x.shape[0] * weight.shape[0] * 4 * x.shape[2] * x.shape[3]
        return (x.numel() + weight.numel() + bias.numel() + out) * x.element_size()

    batch, channels, height, width = dims
    return Workload(
        f"{name} {batch}x{channels}x{height}x{width}",
        dtype,
        make,
        bytes_moved=bytes_moved,
        flop=flop,
        note=NOTE,
    )


def folded_provider(mode: str):
    def build(inputs):
        x, weight, bias = inputs
        folded = derive(weight, mode)
        return lambda: upsample_conv(x, folded, bias, mode)

    return build


def providers() -> dict:
    built = {
        "eager": lambda inputs: lambda: upsample_eager(*inputs),
        "fastdiff": folded_provider("transposed"),
        "fastdiff-phases": folded_provider("phases"),
    }
    if on_gpu():
        compiled = {}

        def build_compiled(inputs):
            if "fn" not in compiled:
                compiled["fn"] = torch.compile(upsample_eager)
            return lambda: compiled["fn"](*inputs)

        built["torch.compile"] = build_compiled
    return built


def main() -> None:
    args = parse_args(__doc__)
    torch.backends.cudnn.benchmark = True  # as optimize() sets it (NOTE)
    shapes = [item for item in SHAPES if not args.quick or item[0] in QUICK]
    workloads = [workload(name, dims, torch.float16) for name, dims in shapes]
    run_benchmark("upsample", workloads, providers(), args)


if __name__ == "__main__":
    main()
