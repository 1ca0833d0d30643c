"""GroupNorm(32) + SiLU at the SD1.5 / SDXL U-Net and VAE shapes: fastdiff vs eager vs compile.

GB/s counts one read and one write of the activation (as BASELINES.md does).

``group_norm_silu_offset``: the ResNet blocks' norm2 under ``fold_biases``, x plus a (B, C) time
embedding offset, channels-last fp16 at the SD1.5 shapes. ``eager`` adds, then normalizes, in
PyTorch; ``fastdiff-add-then-norm`` is the unfolded fastdiff path (PyTorch's addition, then the
kernel); ``fastdiff`` adds the offset inside the kernel.
Run: python benchmarks/bench_group_norm.py [--quick] [--out DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fastdiff.kernels.group_norm as group_norm_kernels  # noqa: E402
from common import (  # noqa: E402
    Workload,
    on_gpu,
    parse_args,
    random,
    run_benchmark,
    standard_providers,
    triton_with_settings,
)

from fastdiff.ops import group_norm  # noqa: E402
from fastdiff.ops.group_norm import group_norm_eager  # noqa: E402

# (batch, channels, height, width): SD1.5 U-Net at 64x64 latents (BASELINES.md), SDXL at 128x128,
# and the VAE decoder's largest GroupNorm (512 channels at 128x128).
SHAPES = [
    (2, 320, 64, 64),
    (2, 640, 32, 32),
    (2, 1280, 16, 16),
    (2, 1280, 8, 8),
    (2, 320, 128, 128),
    (2, 640, 64, 64),
    (2, 1280, 32, 32),
    (1, 512, 128, 128),
]
QUICK_SHAPES = SHAPES[:4]


def workload(shape, dtype, channels_last: bool) -> Workload:
    def make(reduced: bool):
        size = (shape[0], shape[1], 8, 8) if reduced else shape
        x = random(size, dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        weight = random(shape[1], dtype)
        bias = random(shape[1], dtype)
        return (x, 32, weight, bias, 1e-5, True)

    layout = "nhwc" if channels_last else "nchw"
    name = f"{'x'.join(map(str, shape))} {layout}"
    return Workload(name, dtype, make, bytes_moved=activation_bytes)


def offset_workload(shape, dtype) -> Workload:
    plain = workload(shape, dtype, channels_last=True)

    def make(reduced: bool):
        inputs = plain.make(reduced)
        return (*inputs, random(tuple(inputs[0].shape[:2]), dtype))

    return Workload(f"{plain.name} offset", dtype, make, bytes_moved=activation_bytes)


def add_then_norm(inputs):
    """The unfolded path: PyTorch adds the offset (a full read and write), then the kernel."""
    x, groups, weight, bias, eps, silu, offset = inputs

    def call():
        from fastdiff.ops import use_backend

        with use_backend("triton"):
            return group_norm(x + offset[:, :, None, None], groups, weight, bias, eps, silu)

    return call


def activation_bytes(inputs) -> float:
    return 2 * inputs[0].numel() * inputs[0].element_size()


def forced_kernel(max_group: int, launches: int = 3):
    """A provider that runs the triton backend with the single-pass threshold set to
    ``max_group`` elements: 0 forces the split reduction (in ``launches`` launches, 3 or 2), a
    huge value the one-launch single-pass kernel wherever a group's channels fit it. These rows
    set the default threshold (SINGLE_PASS_MAX_GROUP) and show whether it still sits where
    single-pass stops winning; fastdiff-split2 against fastdiff-split sets SPLIT_LAUNCHES."""
    settings = {"SINGLE_PASS_MAX_GROUP": max_group, "SPLIT_LAUNCHES": launches}
    return triton_with_settings(group_norm_kernels, settings, group_norm)


def main() -> None:
    args = parse_args(__doc__)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    workloads = [workload(s, torch.float16, cl) for cl in (False, True) for s in shapes]
    if not args.quick:
        workloads.append(workload(SHAPES[0], torch.bfloat16, False))
    providers = standard_providers(group_norm_eager, group_norm, "group_norm")
    if on_gpu():
        providers["fastdiff-split"] = forced_kernel(0)
        providers["fastdiff-split2"] = forced_kernel(0, launches=2)
        providers["fastdiff-single"] = forced_kernel(1 << 40)
    run_benchmark("group_norm_silu", workloads, providers, args)

    offset_workloads = [offset_workload(s, torch.float16) for s in QUICK_SHAPES]
    offset_providers = standard_providers(group_norm_eager, group_norm, None)
    offset_providers["fastdiff-add-then-norm"] = add_then_norm
    if on_gpu():  # the model's norm2 calls at 64x64 take the split reduction
        offset_providers["fastdiff-split"] = forced_kernel(0)
        offset_providers["fastdiff-split2"] = forced_kernel(0, launches=2)
    run_benchmark("group_norm_silu_offset", offset_workloads, offset_providers, args)


if __name__ == "__main__":
    main()
