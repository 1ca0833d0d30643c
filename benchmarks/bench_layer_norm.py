"""LayerNorm over the last dim at the SD1.5 / SDXL transformer shapes: fastdiff vs eager vs compile.

GB/s counts one read and one write of the activation.

``add_layer_norm``: a transformer block's residual addition and the LayerNorm after it (under
``fold_biases``). ``eager`` adds, then normalizes, in PyTorch; ``fastdiff-add-then-norm`` is the
unfolded fastdiff path (PyTorch's addition, then the LayerNorm kernel); ``fastdiff`` is the one
kernel. GB/s counts its two reads and two writes.
Run: python benchmarks/bench_layer_norm.py [--quick] [--out DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Workload, parse_args, random, run_benchmark, standard_providers  # noqa: E402

from fastdiff.ops import add_layer_norm, layer_norm  # noqa: E402
from fastdiff.ops.layer_norm import add_layer_norm_eager, layer_norm_eager  # noqa: E402

# (batch, tokens, width): transformer blocks at each U-Net resolution.
SHAPES = [
    ("sd15 64x64", (2, 4096, 320)),
    ("sd15 32x32", (2, 1024, 640)),
    ("sd15 16x16", (2, 256, 1280)),
    ("sdxl 64x64", (2, 4096, 640)),
    ("sdxl 32x32", (2, 1024, 1280)),
]


def workload(name, shape, dtype) -> Workload:
    def make(reduced: bool):
        size = (shape[0], min(shape[1], 256), shape[2]) if reduced else shape
        x = random(size, dtype)
        weight = random(shape[2], dtype)
        bias = random(shape[2], dtype)
        return (x, weight, bias, 1e-5)

    def bytes_moved(inputs) -> float:
        return 2 * inputs[0].numel() * inputs[0].element_size()

    return Workload(f"{name} {'x'.join(map(str, shape))}", dtype, make, bytes_moved=bytes_moved)


def residual_workload(name, shape, dtype) -> Workload:
    plain = workload(name, shape, dtype)

    def make(reduced: bool):
        x, weight, bias, eps = plain.make(reduced)
        return (x, random(tuple(x.shape), dtype), weight, bias, eps)

    def bytes_moved(inputs) -> float:
        return 4 * inputs[0].numel() * inputs[0].element_size()

    return Workload(plain.name, dtype, make, bytes_moved=bytes_moved)


def add_then_norm(inputs):
    """The unfolded path: PyTorch's addition (a full pass), then the LayerNorm kernel."""
    x, residual, weight, bias, eps = inputs

    def call():
        from fastdiff.ops import use_backend

        with use_backend("triton"):
            total = x + residual
            return total, layer_norm(total, weight, bias, eps)

    return call


def main() -> None:
    args = parse_args(__doc__)
    shapes = SHAPES[:2] if args.quick else SHAPES
    workloads = [workload(n, s, torch.float16) for n, s in shapes]
    providers = standard_providers(layer_norm_eager, layer_norm, "layer_norm")
    run_benchmark("layer_norm", workloads, providers, args)

    residual_workloads = [residual_workload(n, s, torch.float16) for n, s in shapes]
    residual_providers = standard_providers(add_layer_norm_eager, add_layer_norm, None)
    residual_providers["fastdiff-add-then-norm"] = add_then_norm
    run_benchmark("add_layer_norm", residual_workloads, residual_providers, args)


if __name__ == "__main__":
    main()
