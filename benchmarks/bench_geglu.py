"""GEGLU (value * gelu(gate)) at the SD1.5 / SDXL feed-forward shapes: fastdiff vs eager vs compile.

fastdiff-polyerf: the kernel with kernels/gelu.py's POLYNOMIAL_ERF on (a cheaper erf for
half-precision outputs); its rows against fastdiff's decide that setting's default.
GB/s counts reading the (..., 2D) input and writing the (..., D) output once.
Run: python benchmarks/bench_geglu.py [--quick] [--out DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fastdiff.kernels.gelu as gelu_kernels  # noqa: E402
from common import (  # noqa: E402
    Workload,
    parse_args,
    random,
    run_benchmark,
    standard_providers,
    triton_with_setting,
)

from fastdiff.ops import geglu  # noqa: E402
from fastdiff.ops.geglu import geglu_eager  # noqa: E402

# (batch, tokens, 2 * inner): the feed-forward's proj output, inner = 4 * width.
SHAPES = [
    ("sd15 64x64", (2, 4096, 2 * 1280)),
    ("sd15 32x32", (2, 1024, 2 * 2560)),
    ("sd15 16x16", (2, 256, 2 * 5120)),
    ("sdxl 64x64", (2, 4096, 2 * 2560)),
    ("sdxl 32x32", (2, 1024, 2 * 5120)),
]


def workload(name, shape, dtype) -> Workload:
    def make(reduced: bool):
        size = (shape[0], min(shape[1], 128), shape[2]) if reduced else shape
        return (random(size, dtype),)

    def bytes_moved(inputs) -> float:
        return 1.5 * inputs[0].numel() * inputs[0].element_size()

    return Workload(f"{name} {'x'.join(map(str, shape))}", dtype, make, bytes_moved=bytes_moved)


def providers() -> dict:
    result = standard_providers(geglu_eager, geglu, "geglu")
    result["fastdiff-polyerf"] = triton_with_setting(gelu_kernels, "POLYNOMIAL_ERF", True, geglu)
    return result


def main() -> None:
    args = parse_args(__doc__)
    shapes = SHAPES[:2] if args.quick else SHAPES
    workloads = [workload(n, s, torch.float16) for n, s in shapes]
    run_benchmark("geglu", workloads, providers(), args)


if __name__ == "__main__":
    main()
