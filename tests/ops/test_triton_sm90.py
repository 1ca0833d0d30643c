"""Every Triton kernel compiles for an H100/H200 (sm_90) without a GPU, bf16 included (the CPU
interpreter cannot run bf16), and the attention configs are chosen per dtype."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import fastdiff.kernels as kernels
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


@pytest.mark.parametrize("autotune", ["1", "0"])
def test_pruning_never_leaves_the_autotuner_without_a_config(monkeypatch, autotune):
    """Candidates none of which fits the shape (key and query blocks all longer than 16 tokens
    need) and none of which is the heuristic one: the pruning still keeps one, since Triton's
    autotuner cannot launch with an empty list."""
    monkeypatch.setenv("FASTDIFF_AUTOTUNE", autotune)
    configs = [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=4),
    ]
    named = {"q_ptr": torch.empty(1, dtype=torch.float16), "N_QUERIES": 16, "N_KEYS": 16}
    assert attention_kernels._fitting(configs, {**named, "BLOCK_D": 64, "BLOCK_DT": 0}) == []
    assert attention_kernels._prune(configs, named, BLOCK_D=64, BLOCK_DT=0) == configs[:1]


def test_compile_threads_default_is_the_cpu_count_up_to_16(monkeypatch):
    """One thread per core on the GPU machines (16 cores), never more than 16, and one where
    the CPU count is unknown."""
    monkeypatch.delenv("FASTDIFF_COMPILE_THREADS", raising=False)
    for cpus, threads in ((16, 16), (64, 16), (12, 12), (None, 1)):
        monkeypatch.setattr(kernels.os, "cpu_count", lambda cpus=cpus: cpus)
        assert kernels.compile_threads() == threads, cpus


def run_sm90_script(
    *args: str, env_changes: dict | None = None, script: str = "triton_sm90.py"
) -> subprocess.CompletedProcess:
    """benchmarks/triton_sm90.py (or another script on its compile-only driver) with ``args``,
    outside the interpreter (it compiles for sm_90)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_changes or {})
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
@pytest.mark.skipif(not (NVIDIA_TOOLS / "cuobjdump").exists(), reason="no Triton CUDA backend")
def test_every_kernel_compiles_for_sm90():
    # Fusion off by default, as from Triton 3.10: a launch without COMPILE_OPTIONS shows up.
    result = run_sm90_script("--quick", env_changes={"TRITON_DEFAULT_FP_FUSION": "0"})
    assert " 0 cases failed" in result.stdout
    # the table names each kernel family: nothing was silently skipped
    for kernel in ("group_norm_single_pass", "group_norm_apply", "attention_forward", "geglu"):
        assert kernel in result.stdout
    assert "layer_norm_kernel" in result.stdout and "sampler_step_kernel" in result.stdout


@pytest.mark.skipif(not (NVIDIA_TOOLS / "cuobjdump").exists(), reason="no Triton CUDA backend")
def test_host_overhead_script_times_every_op_on_the_triton_path():
    """benchmarks/host_overhead.py runs each op through its Triton launcher (it exits 1 when no
    kernel was compiled) and prints a row of three figures per op. Nothing is asserted about the
    figures: speed is the benchmark's business."""
    lines = run_sm90_script("--calls", "3", script="host_overhead.py").stdout.splitlines()
    rows = [line for line in lines if re.search(r"( +\d+\.\d){3}$", line)]
    ops = ("group_norm", "layer_norm", "add_layer_norm", "attention", "geglu", "linear_geglu")
    assert len(rows) == 9 and all(any(row.startswith(op) for row in rows) for op in ops), lines


@pytest.mark.skipif(not (NVIDIA_TOOLS / "cuobjdump").exists(), reason="no Triton CUDA backend")
@pytest.mark.parametrize("threads", [1, 2])
def test_the_autotuner_times_the_kernels_the_compile_threads_built(tmp_path, threads):
    """ParallelCompile builds every candidate before the autotuner times them; the timing loop
    must find each in the kernel cache (a launch option that differed would compile it again:
    twice as many kernels)."""
    # A cache of its own: compile, do not read a cached winner.
    cache = {"TRITON_CACHE_DIR": str(tmp_path)}
    result = run_sm90_script("--autotune-compile", str(threads), env_changes=cache)
    found = re.search(r"(\d+) candidates, (\d+) kernels compiled", result.stdout)
    assert found and int(found[1]) > 1 and found[1] == found[2], result.stdout


@pytest.mark.skipif(not (NVIDIA_TOOLS / "cuobjdump").exists(), reason="no Triton CUDA backend")
def test_a_forward_compiled_ahead_compiles_nothing_more(tmp_path):
    """compile_ahead on a toy SD1.5 U-Net (every op on the triton backend, attention autotuned):
    the launches inside it compile each kernel with the options the real launches (and the
    autotuner's timing launches) use, so the forward after it compiles none."""
    cache = {"TRITON_CACHE_DIR": str(tmp_path)}
    result = run_sm90_script("--compile-ahead", "2", env_changes=cache)
    found = re.search(r"(\d+) kernels in .* compiled (\d+) more", result.stdout)
    assert found and int(found[1]) > 10 and found[2] == "0", result.stdout


def test_compile_threads_setting(monkeypatch):
    monkeypatch.delenv("FASTDIFF_COMPILE_THREADS", raising=False)
    assert kernels.compile_threads() == min(16, os.cpu_count() or 1)
    monkeypatch.setenv("FASTDIFF_COMPILE_THREADS", "3")
    assert kernels.compile_threads() == 3
    for bad in ("0", "-2", "two", "1.5"):
        monkeypatch.setenv("FASTDIFF_COMPILE_THREADS", bad)
        with pytest.raises(ValueError, match=f"FASTDIFF_COMPILE_THREADS must be .* got '{bad}'"):
            kernels.compile_threads()


class FakeAutotuner:
    """The two methods ParallelCompile wraps, and a kernel whose launches are recorded."""

    def __init__(self, configs):
        self.configs, self.calls = configs, []
        outer = self

        class Kernel:
            def run(self, *args, **options):
                outer.calls.append(("compile", options["BLOCK_M"], options["warmup"]))
                return f"kernel {options['BLOCK_M']}"

        self.fn = Kernel()

    def prune_configs(self, kwargs):
        return self.configs

    def _bench(self, *args, config, **meta):
        self.calls.append(("time", config.kwargs["BLOCK_M"]))
        return 1.0


def test_candidates_compile_once_before_the_first_timing_and_not_on_a_disk_hit(monkeypatch):
    monkeypatch.setenv("FASTDIFF_COMPILE_THREADS", "2")
    prepared = []  # each candidate's launcher is built in its compile thread too
    monkeypatch.setattr(attention_kernels, "prepare_launcher", prepared.append)
    tuner = FakeAutotuner(all_configs()[:3])
    attention_kernels.ParallelCompile(tuner)
    meta = {"grid": None, "warmup": False, "HEAD_DIM": 40}

    def tune_round():
        for config in tuner.prune_configs(meta):
            tuner._bench(torch.empty(1), config=config, **meta)

    tune_round()
    blocks = [c.kwargs["BLOCK_M"] for c in tuner.configs]
    compiled = sorted(call[1] for call in tuner.calls[:3])
    assert tuner.calls[:3] == [("compile", m, True) for m in compiled]
    assert compiled == sorted(blocks)
    assert sorted(prepared) == sorted(f"kernel {m}" for m in blocks)
    assert tuner.calls[3:] == [("time", m) for m in blocks]
    tuner.calls.clear()
    tuner.prune_configs(meta)  # Triton's disk cache answered: nothing is timed
    assert tuner.calls == []
    tune_round()  # the next new shape compiles its candidates once more
    assert [call[0] for call in tuner.calls] == ["compile"] * 3 + ["time"] * 3
    tuner.calls.clear()
    monkeypatch.setenv("FASTDIFF_COMPILE_THREADS", "1")  # off: the timing loop compiles
    tune_round()
    assert [call[0] for call in tuner.calls] == ["time"] * 3
    tuner.configs = tuner.configs[:1]  # one candidate: nothing to time, nothing compiled ahead
    tuner.prune_configs(meta)
    tuner.calls.clear()
    monkeypatch.setenv("FASTDIFF_COMPILE_THREADS", "2")
    tuner._bench(torch.empty(1), config=tuner.configs[0], **meta)
    assert tuner.calls == [("time", tuner.configs[0].kwargs["BLOCK_M"])]


def test_a_candidate_that_fails_to_compile_is_left_to_the_timing_loop(monkeypatch):
    monkeypatch.setenv("FASTDIFF_COMPILE_THREADS", "2")
    tuner = FakeAutotuner(all_configs()[:2])

    def failing_run(*args, **options):
        raise RuntimeError("out of shared memory")

    tuner.fn.run = failing_run
    attention_kernels.ParallelCompile(tuner)
    meta = {"grid": None, "warmup": False}
    configs = tuner.prune_configs(meta)
    assert tuner._bench(torch.empty(1), config=configs[0], **meta) == 1.0


@pytest.mark.skipif(not (NVIDIA_TOOLS / "cuobjdump").exists(), reason="no Triton CUDA backend")
def test_the_compile_threads_find_the_kernel_cache_already_made():
    """ParallelCompile creates the JIT function's cache for the device before its threads
    compile into it (two threads creating it at once would lose one's kernel)."""
    script = (
        "import sys; sys.path.insert(0, 'benchmarks'); import triton_sm90 as t; "
        "import fastdiff.kernels.attention as A; jit = A.attention_forward_kernel.fn.fn; "
        "before = len(jit.device_caches); "
        "exec('with t.compile_only():\\n A._create_device_caches(A.attention_forward_kernel.fn)'); "
        "print(before, list(jit.device_caches))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["0", "[0]"], result.stdout
