"""The feed-forward's GEGLU projection (linear + GEGLU) at the SD1.5 / SDXL shapes: the fused
kernel against the two steps it replaces.

Providers: fastdiff (the fused kernel, kernels/linear_geglu.py's default tile), fastdiff-<tile>
(its other tile configs), fastdiff-polyerf (the default tile with kernels/gelu.py's
POLYNOMIAL_ERF on: its rows against fastdiff's decide that setting's default),
fastdiff-two-steps (cuBLAS, then fastdiff's GEGLU kernel: what the optimized runtime runs where
the fused kernel was not timed faster), eager (PyTorch: F.linear, chunk, gelu, mul) and
torch.compile of eager. backend_table.py turns the fastdiff and
fastdiff-two-steps rows into the auto backend's choice per shape.
TFLOP/s counts the projection's 2·M·K·2I; GB/s counts reading x and the weight and writing the
(M, I) output once.
Run: python benchmarks/bench_linear_geglu.py [--quick] [--out DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fastdiff.kernels.gelu as gelu_kernels  # noqa: E402
import fastdiff.kernels.linear_geglu as linear_geglu_kernels  # noqa: E402
from common import (  # noqa: E402
    Workload,
    parse_args,
    random,
    run_benchmark,
    standard_providers,
    triton_with_setting,
)

from fastdiff.ops import linear_geglu, use_backend  # noqa: E402
from fastdiff.ops.linear_geglu import linear_geglu_eager, linear_geglu_two_steps  # noqa: E402

# (rows = batch 2 x tokens, input features K, inner I): the projection is K -> 2I.
SHAPES = [
    ("sd15 64x64", (8192, 320, 1280)),
    ("sd15 32x32", (2048, 640, 2560)),
    ("sd15 16x16", (512, 1280, 5120)),
    ("sdxl 64x64", (8192, 640, 2560)),
    ("sdxl 32x32", (2048, 1280, 5120)),
]
QUICK = {"sd15 64x64", "sd15 32x32", "sd15 16x16"}
TWO_STEPS = "fastdiff-two-steps"  # backend_table.py: the op's eager backend


def workload_name(name: str, dims: tuple[int, int, int]) -> str:
    """``<name> <rows>x<K>x<2I>``: backend_table.py reads the shape back from the last word."""
    rows, depth, inner = dims
    return f"{name} {rows}x{depth}x{2 * inner}"


def workload(name, dims, dtype) -> Workload:
    def make(reduced: bool):
        rows, depth, inner = dims
        rows = min(rows, 128) if reduced else rows
        weight = random((2 * inner, depth), dtype) / depth**0.5
        return random((rows, depth), dtype), weight, random((2 * inner,), dtype)

    def flop(inputs) -> float:
        x, weight, _ = inputs
        return 2.0 * x.shape[0] * x.shape[1] * weight.shape[0]

    def bytes_moved(inputs) -> float:
        x, weight, bias = inputs
        out = x.shape[0] * weight.shape[0] // 2
        return (x.numel() + weight.numel() + bias.numel() + out) * x.element_size()

    return Workload(workload_name(name, dims), dtype, make, bytes_moved=bytes_moved, flop=flop)


def two_steps(inputs):
    def call():
        with use_backend("triton"):  # the GEGLU step on its kernel, as the runtime runs it
            return linear_geglu_two_steps(*inputs)

    return call


def providers() -> dict:
    result = standard_providers(linear_geglu_eager, linear_geglu, None)
    result[TWO_STEPS] = two_steps
    result["fastdiff-polyerf"] = triton_with_setting(
        gelu_kernels, "POLYNOMIAL_ERF", True, linear_geglu
    )
    for config in linear_geglu_kernels.CONFIGS:
        if config != linear_geglu_kernels.DEFAULT_CONFIG:
            result[f"fastdiff-{config}"] = triton_with_setting(
                linear_geglu_kernels, "config_override", config, linear_geglu
            )
    return result


def main() -> None:
    args = parse_args(__doc__)
    shapes = [item for item in SHAPES if not args.quick or item[0] in QUICK]
    workloads = [workload(name, dims, torch.float16) for name, dims in shapes]
    run_benchmark("linear_geglu", workloads, providers(), args)


if __name__ == "__main__":
    main()
