"""Attention forward at the SD1.5 / SDXL shapes: fastdiff flash kernel vs PyTorch SDPA backends.

TFLOP/s counts 4·B·H·N·M·D (two matmuls, 2 FLOP per multiply-add), as torch's flop counter does.
Providers: fastdiff, eager (SDPA's default choice), sdpa-flash / sdpa-cudnn / sdpa-efficient
(each backend forced), torch.compile, and fastdiff-padded: the triton kernel with head dims such
as 40 padded to a power of two instead of split into a block and a tail (self-attention at those
head dims only; its rows against fastdiff's decide kernels/attention.py's SPLIT_HEAD_DIM).
Run: python benchmarks/bench_attention.py [--quick] [--out DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fastdiff.kernels.attention as attention_kernels  # noqa: E402
from common import (  # noqa: E402
    Workload,
    on_gpu,
    parse_args,
    random,
    run_benchmark,
    standard_providers,
    triton_with_setting,
)

from fastdiff.ops import attention  # noqa: E402
from fastdiff.ops.attention import attention_eager  # noqa: E402

# (batch, heads, queries, keys, head_dim)
SHAPES = [
    ("sd15 self 64x64", (2, 8, 4096, 4096, 40)),
    ("sd15 cross 64x64", (2, 8, 4096, 77, 40)),
    ("sd15 self 32x32", (2, 8, 1024, 1024, 80)),
    ("sd15 self 16x16", (2, 8, 256, 256, 160)),
    ("sd2 self 64x64", (2, 10, 4096, 4096, 64)),
    ("sdxl self 32x32", (2, 20, 1024, 1024, 64)),
    ("sdxl cross 32x32", (2, 20, 1024, 77, 64)),
    ("sdxl self 64x64", (2, 10, 4096, 4096, 64)),
]
QUICK = {"sd15 self 64x64", "sd15 cross 64x64", "sd2 self 64x64", "sdxl self 32x32"}
FUSED_QKV_SUFFIX = " (fused-qkv views)"  # workload name suffix; backend_table.py reads it


def workload(name, dims, dtype, fused_qkv: bool = False) -> Workload:
    if fused_qkv and dims[2] != dims[3]:  # backend_table.py keys these rows as strided views
        raise ValueError(f"{name}: fused-QKV views need self-attention (as many keys as queries)")

    def make(reduced: bool):
        batch, heads, queries, keys, head_dim = dims
        if reduced:
            queries, keys = min(queries, 256), min(keys, 256)
        if fused_qkv and queries == keys:
            # Views of one (B, N, 3, H, D) projection, as the runtime's fused QKV passes them.
            qkv = random((batch, queries, 3, heads, head_dim), dtype)
            return tuple(qkv[:, :, i].transpose(1, 2) for i in range(3)) + (None,)
        q = random((batch, heads, queries, head_dim), dtype)
        k = random((batch, heads, keys, head_dim), dtype)
        v = random((batch, heads, keys, head_dim), dtype)
        return (q, k, v, None)

    def flop(inputs) -> float:
        q, k = inputs[0], inputs[1]
        return 4.0 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3]

    suffix = FUSED_QKV_SUFFIX if fused_qkv else ""
    return Workload(f"{name}{suffix}", dtype, make, flop=flop)


def sdpa_backend_provider(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def build(inputs):
        def call():
            with sdpa_kernel(backend):
                return attention_eager(*inputs)

        return call

    return build


def padded_provider(inputs):
    """The triton kernel with SPLIT_HEAD_DIM off, at self-attention shapes whose head dim is
    split; None (no row) elsewhere. Each such shape autotunes once more (5-10 s on an H200), so
    the cross-attention shapes, where attention costs little, are left out."""
    q, k = inputs[0], inputs[1]
    if attention_kernels.head_blocks(q.shape[-1])[1] == 0 or q.shape[2] != k.shape[2]:
        return None
    return triton_with_setting(attention_kernels, "SPLIT_HEAD_DIM", False, attention)(inputs)


def main() -> None:
    args = parse_args(__doc__)
    shapes = [(n, d) for n, d in SHAPES if not args.quick or n in QUICK]
    workloads = [workload(n, d, torch.float16) for n, d in shapes]
    workloads.append(workload(*SHAPES[0], torch.float16, fused_qkv=True))
    if not args.quick:
        workloads.append(workload(*SHAPES[0], torch.bfloat16))
    providers = standard_providers(attention_eager, attention, "attention")
    if on_gpu():
        for label, backend in (
            ("sdpa-flash", "FLASH_ATTENTION"),
            ("sdpa-cudnn", "CUDNN_ATTENTION"),
            ("sdpa-efficient", "EFFICIENT_ATTENTION"),
        ):
            providers[label] = sdpa_backend_provider(backend)
        providers["fastdiff-padded"] = padded_provider
    run_benchmark("attention", workloads, providers, args)
    print_autotuned_configs()


def print_autotuned_configs() -> None:
    """The configuration the autotuner chose per key (N_QUERIES, N_KEYS, HEAD_DIM, BLOCK_D,
    BLOCK_DT, then dtypes): each new key costs about 6 s of autotuning on an H200 (the fastdiff
    rows' warm-up), the part of a model's warm-up a shipped table of winners would remove."""
    cache = getattr(attention_kernels.attention_forward_kernel, "cache", None) or {}
    for key, config in sorted(cache.items(), key=lambda item: str(item[0])):
        shape = (*config.kwargs.values(), config.num_warps, config.num_stages)
        print(f"autotuned attention {key}: BLOCK_M, BLOCK_N, warps, stages = {shape}")


if __name__ == "__main__":
    main()
