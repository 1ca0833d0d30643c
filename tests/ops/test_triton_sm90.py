"""Every Triton kernel compiles for an H100/H200 (sm_90) without a GPU, bf16 included (the CPU
interpreter cannot run bf16), and the attention configs are chosen per dtype."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import fastdiff.kernels.attention as attention_kernels
import pytest
import torch
import triton

REPO = Path(__file__).resolve().parents[2]
NVIDIA_TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def all_configs() -> list[triton.Config]:
    shapes = attention_kernels._GPU_SHAPES + attention_kernels._FP32_SHAPES
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m, n, w, s in shapes
    ]


def pruned(dtype, head_dim, queries=4096, keys=4096) -> list[tuple[int, int, int, int]]:
    block_d, block_dt = attention_kernels.head_blocks(head_dim)
    named = {"q_ptr": torch.empty(1, dtype=dtype), "N_QUERIES": queries, "N_KEYS": keys}
    kept = attention_kernels._prune(all_configs(), named, BLOCK_D=block_d, BLOCK_DT=block_dt)
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept]


@pytest.mark.parametrize("head_dim", [40, 64, 80, 160, 256])
def test_fp32_attention_autotunes_only_its_spill_free_shape(monkeypatch, head_dim):
    monkeypatch.setenv("FASTDIFF_AUTOTUNE", "1")
    want = attention_kernels._FP32_SHAPES[0 if head_dim <= 64 else 1]
    assert pruned(torch.float32, head_dim) == [want]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [40, 64, 160])
def test_half_attention_never_gets_the_fp32_shapes(monkeypatch, dtype, head_dim):
    monkeypatch.setenv("FASTDIFF_AUTOTUNE", "1")
    kept = pruned(dtype, head_dim)
    assert kept and not set(kept) & set(attention_kernels._FP32_SHAPES)
    monkeypatch.setenv("FASTDIFF_AUTOTUNE", "0")  # heuristics only: one config, the default
    width = sum(attention_kernels.head_blocks(head_dim))
    assert pruned(dtype, head_dim) == [attention_kernels.heuristic_shape(width, 4096)]


@pytest.mark.slow
@pytest.mark.skipif(not (NVIDIA_TOOLS / "cuobjdump").exists(), reason="no Triton CUDA backend")
def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # Fusion off by default, as from Triton 3.10: a launch without COMPILE_OPTIONS shows up.
    env["TRITON_DEFAULT_FP_FUSION"] = "0"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "triton_sm90.py"), "--quick"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " 0 cases failed" in result.stdout
    # the table names each kernel family: nothing was silently skipped
    for kernel in ("group_norm_single_pass", "group_norm_apply", "attention_forward", "geglu"):
        assert kernel in result.stdout
    assert "layer_norm_kernel" in result.stdout and "sampler_step_kernel" in result.stdout
