"""Flash-attention forward (Dao et al. 2022, "FlashAttention", Algorithm 1 with the online softmax
of Milakov & Gimelshein 2018): softmax(q k^T * scale) v without ever holding the N x M scores.

Each program owns BLOCK_M query rows of one (batch, head) and streams the keys and values in blocks
of BLOCK_N, keeping a running row maximum ``m``, row sum ``l`` and unnormalised output ``acc`` in
fp32. The softmax uses exp2 with log2(e) folded into the scale. Inputs are (B, H, N, D) tensors
with any strides (views of a fused QKV projection need no copy). A head dim that is not a power of
two runs as a power-of-two block plus a narrower masked tail (40 = 32 + 16, 80 = 64 + 16,
160 = 128 + 32) when that wastes fewer tensor-core columns than padding to the next power of two;
otherwise (e.g. 120) it is padded (``head_blocks``).
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from . import (
    COMPILE_OPTIONS,
    attention_configs,
    cdiv,
    compile_threads,
    compiling_ahead,
    launch,
    next_power_of_2,
    prepare_launcher,
)

LOG2_E = 1.4426950408889634
MAX_HEAD_DIM = 256
# Run head dims such as 40 as a power-of-two block plus a tail (head_blocks) rather than padded
# to the next power of two. The split does 48 columns of matmul work at D = 40 instead of 64, but
# each tail is its own load and its own wgmma wait per key block. Measured on an H200 (fp16,
# bench_attention's fastdiff-padded provider sets this False): the split wins at every split head
# dim, 162 against 175 us at D = 40 (SD1.5 64x64), 19.0 against 21.7 at 80, 7.1 against 9.5 at 160.
SPLIT_HEAD_DIM = True
# Cleared (with a warning) if the split head-dim variant ever fails to compile on this machine.
_split_head_dim_works = True

# (BLOCK_M, BLOCK_N, num_warps, num_stages): the Hopper-friendly shapes of Triton's fused-attention
# tutorial; the pruning below keeps the ones that fit a head dim and key length. The last one
# (long key blocks, four stages: more loads in flight per exp2) is for D = 40, where the
# scale-and-subtract is already one FMA per score; it has not been timed yet (benchmarks/NOTES.md).
_GPU_SHAPES = [
    (128, 128, 8, 3),
    (128, 64, 8, 3),
    (128, 64, 4, 3),
    (128, 32, 4, 3),
    (64, 64, 4, 3),
    (64, 32, 4, 2),
    (128, 128, 8, 2),
    (128, 64, 4, 4),
    (128, 128, 8, 4),
]
# fp32 inputs take the FMA path (ieee dots, no tensor cores) and keep twice the bytes per element
# in registers: the shapes above spill there (up to 85 KB of spill stores per thread at D = 160
# with sm_90's ptxas; see benchmarks/NOTES.md); these two are spill-free for head dims up to 64
# and 256 (benchmarks/triton_sm90.py).
_FP32_SHAPES = [(64, 32, 8, 2), (32, 32, 8, 2)]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs() -> list[triton.Config]:
    if _interpreting():  # one small config: the numpy interpreter is slow and never autotunes
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m, n, w, s in _GPU_SHAPES + _FP32_SHAPES
    ]


def heuristic_shape(width: int, keys: int, fp32: bool = False) -> tuple[int, int, int, int]:
    """The default (BLOCK_M, BLOCK_N, num_warps, num_stages) for a padded head width."""
    if fp32:
        return _FP32_SHAPES[0] if width <= 64 else _FP32_SHAPES[1]
    if width > 128:
        return (64, 32, 4, 2)
    if keys <= 64:
        return (128, 64, 4, 3)
    return (128, 64, 8, 3) if width > 64 else (128, 128, 8, 3)


def _shape(config) -> tuple[int, int, int, int]:
    return (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)


def _fitting(configs, args: dict) -> list:
    """The configs worth trying for these arguments (q_ptr, N_QUERIES, N_KEYS, BLOCK_D and
    BLOCK_DT)."""
    width = args["BLOCK_D"] + args["BLOCK_DT"]
    keys, queries = args["N_KEYS"], args["N_QUERIES"]
    fp32 = args["q_ptr"].dtype == torch.float32
    kept = []
    for config in configs:
        m, n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
        shape = _shape(config)
        if fp32:  # only the spill-free fp32 shape for this width (see _FP32_SHAPES)
            if shape == heuristic_shape(width, keys, fp32=True):
                kept.append(config)
            continue
        if shape in _FP32_SHAPES:
            continue
        if width > 128 and (n > 64 or (m == 128 and config.num_warps == 4)):
            continue  # registers: a 128 x (>128) fp32 accumulator needs 8 warps, short K blocks
        if n > max(32, next_power_of_2(keys)):
            continue  # key blocks much longer than the keys only compute padding
        if m > max(64, next_power_of_2(queries)):
            continue
        kept.append(config)
    return kept


def prune_args(q: torch.Tensor, queries: int, keys: int, block_d: int, block_dt: int) -> dict:
    """What _fitting and _prune read of a launch, named as the autotuner passes it."""
    return {
        "q_ptr": q,
        "N_QUERIES": queries,
        "N_KEYS": keys,
        "BLOCK_D": block_d,
        "BLOCK_DT": block_dt,
    }


def _prune(configs, named_args, **kwargs):
    if len(configs) == 1:
        return configs
    args = {**named_args, **kwargs}  # constexprs arrive as kwargs in some Triton versions
    kept = _fitting(configs, args)
    if os.environ.get("FASTDIFF_AUTOTUNE", "1") == "0" or not kept:
        width = args["BLOCK_D"] + args["BLOCK_DT"]
        fp32 = args["q_ptr"].dtype == torch.float32
        wanted = heuristic_shape(width, args["N_KEYS"], fp32)
        chosen = [c for c in configs if _shape(c) == wanted]
        return chosen or configs[:1]
    return kept


# Milliseconds of warm-up and of repetitions the autotuner spends timing each candidate for a
# new shape. Triton's default, (25, 100), is about 1.1 s of timing per shape with 9 candidates
# (head dims up to 128; 2-3 remain at 160); a candidate at the SD shapes takes 0.005-0.5 ms, so
# 25 ms is still 50 to thousands of repetitions. benchmarks/tune_attention.py, which writes the
# shipped table, times with Triton's default.
AUTOTUNE_TIMING_MS = (5, 25)


def _time_candidate(kernel_call, quantiles):
    """The autotuner's timing of one candidate: this machine's benchmarker (Triton's do_bench on a
    GPU), for AUTOTUNE_TIMING_MS."""
    from triton.runtime import driver

    warmup, rep = AUTOTUNE_TIMING_MS
    benchmarker = driver.active.get_benchmarker()
    return benchmarker(kernel_call, warmup=warmup, rep=rep, quantiles=quantiles)


def _disk_cache() -> dict:
    """Keep autotuning results on disk where this Triton can (``cache_results``): the first
    process on a machine pays the ~5-10 s per new shape measured on an H200, later ones read the
    winner back (the key covers the GPU target, the kernel source and the pruned configs)."""
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        return {"cache_results": True}
    return {}


@triton.autotune(
    configs=_configs(),
    # BLOCK_D / BLOCK_DT: the split and the padded head dim are different kernels (their best
    # configs may differ; bench_attention's fastdiff-padded rows time both).
    key=["N_QUERIES", "N_KEYS", "HEAD_DIM", "BLOCK_D", "BLOCK_DT"],
    prune_configs_by={"early_config_prune": _prune},
    do_bench=_time_candidate,
    **_disk_cache(),
)
@triton.heuristics({"EVEN_KEYS": lambda args: args["N_KEYS"] % args["BLOCK_N"] == 0})
@triton.jit
def attention_forward_kernel(
    q_ptr,  # queries (B, H, N, D), any strides
    k_ptr,  # keys (B, H, M, D), any strides
    v_ptr,  # values (B, H, M, D), any strides
    out_ptr,  # output (B, H, N, D), any strides
    qk_scale,  # softmax scale * log2(e)
    num_heads,
    # batch / head / row strides in units of STRIDE_UNIT elements; the head-dim strides in elements
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_on,
    stride_od,
    N_QUERIES,
    N_KEYS,
    STRIDE_UNIT: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # head-dim columns [0, BLOCK_D)
    BLOCK_DT: tl.constexpr,  # tail columns [BLOCK_D, BLOCK_D + BLOCK_DT), 0 for none
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_KEYS: tl.constexpr,
):
    # Multiplying by the constexpr unit tells the compiler every row starts on a STRIDE_UNIT
    # boundary (e.g. 8 halfs = 16 bytes for D = 40, whose strides Triton cannot specialise):
    # without it the loads of such rows fall back to narrow, unvectorised accesses.
    stride_qb = stride_qb * STRIDE_UNIT
    stride_qh = stride_qh * STRIDE_UNIT
    stride_qn = stride_qn * STRIDE_UNIT
    stride_kb = stride_kb * STRIDE_UNIT
    stride_kh = stride_kh * STRIDE_UNIT
    stride_kn = stride_kn * STRIDE_UNIT
    stride_vb = stride_vb * STRIDE_UNIT
    stride_vh = stride_vh * STRIDE_UNIT
    stride_vn = stride_vn * STRIDE_UNIT
    stride_ob = stride_ob * STRIDE_UNIT
    stride_oh = stride_oh * STRIDE_UNIT
    stride_on = stride_on * STRIDE_UNIT
    block_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = batch_head // num_heads
    head = batch_head % num_heads
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    mask_m = offs_m < N_QUERIES

    q_base = q_ptr + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    k_base = k_ptr + batch.to(tl.int64) * stride_kb + head.to(tl.int64) * stride_kh
    v_base = v_ptr + batch.to(tl.int64) * stride_vb + head.to(tl.int64) * stride_vh
    o_base = out_ptr + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
    q_rows = q_base + offs_m[:, None] * stride_qn
    k_rows = k_base + offs_n[:, None] * stride_kn
    v_rows = v_base + offs_n[:, None] * stride_vn
    q = tl.load(
        q_rows + offs_d[None, :] * stride_qd, mask=mask_m[:, None] & mask_d[None, :], other=0.0
    )
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if BLOCK_DT > 0:
        # Head dims such as 40 = 32 + 8 run as a 32-wide and a 16-wide slice (48 columns of
        # work) rather than one 64-wide padded block.
        offs_t = BLOCK_D + tl.arange(0, BLOCK_DT)
        mask_t = offs_t < HEAD_DIM
        q_t = tl.load(
            q_rows + offs_t[None, :] * stride_qd, mask=mask_m[:, None] & mask_t[None, :], other=0.0
        )
        acc_t = tl.zeros([BLOCK_M, BLOCK_DT], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)

    for start_n in range(0, N_KEYS, BLOCK_N):
        if EVEN_KEYS:
            kv_mask = mask_d[None, :]
        else:
            mask_n = (start_n + offs_n) < N_KEYS
            kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(
            k_rows + start_n * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0
        )
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if BLOCK_DT > 0:
            if EVEN_KEYS:
                tail_mask = mask_t[None, :]
            else:
                tail_mask = mask_n[:, None] & mask_t[None, :]
            k_t = tl.load(
                k_rows + start_n * stride_kn + offs_t[None, :] * stride_kd,
                mask=tail_mask,
                other=0.0,
            )
            qk = tl.dot(q_t, tl.trans(k_t), qk, input_precision=DOT_PRECISION)
        if not EVEN_KEYS:
            qk = tl.where(mask_n[None, :], qk, float("-inf"))
        # qk_scale > 0 (checked by the op), so max(qk) * scale is the max of the scaled scores.
        new_max = tl.maximum(row_max, tl.max(qk, 1) * qk_scale)
        # A row whose scores so far are all -inf (infinite inputs, or q.k overflowing) keeps
        # new_max = -inf: subtract 0 there, as exp2(-inf - -inf) is NaN and exp2(-inf) is 0.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        p = tl.math.exp2(qk * qk_scale - shift[:, None])
        correction = tl.math.exp2(row_max - shift)
        row_sum = row_sum * correction + tl.sum(p, 1)
        v = tl.load(
            v_rows + start_n * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0
        )
        p = p.to(v.dtype)
        acc = tl.dot(p, v, acc * correction[:, None], input_precision=DOT_PRECISION)
        if BLOCK_DT > 0:
            v_t = tl.load(
                v_rows + start_n * stride_vn + offs_t[None, :] * stride_vd,
                mask=tail_mask,
                other=0.0,
            )
            acc_t = tl.dot(p, v_t, acc_t * correction[:, None], input_precision=DOT_PRECISION)
        row_max = new_max

    o_rows = o_base + offs_m[:, None] * stride_on
    tl.store(
        o_rows + offs_d[None, :] * stride_od,
        (acc / row_sum[:, None]).to(out_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_d[None, :],
    )
    if BLOCK_DT > 0:
        tl.store(
            o_rows + offs_t[None, :] * stride_od,
            (acc_t / row_sum[:, None]).to(out_ptr.dtype.element_ty),
            mask=mask_m[:, None] & mask_t[None, :],
        )


class ParallelCompile:
    """Compile the autotuner's candidates for a new shape all at once, in threads, before it
    times them: its timing loop otherwise compiles each in turn (0.3-0.8 s per configuration on
    the development machine's CPU, for sm_90). Triton's compiler spends much of that outside the
    GIL (MLIR and LLVM passes, ptxas in its own process); each thread's result lands in the
    kernel cache the timing launches then read.

    Installed on the autotuner instance: ``prune_configs`` (called once per new shape, before
    Triton's on-disk cache of winners is consulted) notes the candidates, and the first
    ``_bench`` (called only when they are to be timed, so never on a disk-cache hit) compiles
    them. A configuration that fails to compile here is left to the timing loop, which meets the
    same error and handles it as it always has."""

    def __init__(self, autotuner) -> None:
        self.autotuner = autotuner
        self.prune_configs = autotuner.prune_configs
        self.bench = autotuner._bench
        self.pending: list | None = None
        autotuner.prune_configs = self._prune_configs
        autotuner._bench = self._bench

    def _prune_configs(self, kwargs):
        configs = self.prune_configs(kwargs)
        self.pending = list(configs) if len(configs) > 1 else None
        return configs

    def _bench(self, *args, config, **meta):
        pending, self.pending = self.pending, None
        if pending is not None and compile_threads() > 1:
            self.compile_all(pending, args, meta)
        return self.bench(*args, config=config, **meta)

    def compile_all(self, configs, args, meta) -> None:
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)

        def on_device():  # Triton compiles for (and caches under) the current device
            return torch.cuda.device(device) if device and device.type == "cuda" else nullcontext()

        def compile_one(config) -> None:
            options = {**meta, **config.all_kwargs(), "warmup": True}
            try:
                with on_device():
                    prepare_launcher(self.autotuner.fn.run(*args, **options))
            except Exception:  # the timing loop compiles it again and reports or skips it
                pass

        with on_device():
            _create_device_caches(self.autotuner.fn)
        with ThreadPoolExecutor(min(compile_threads(), len(configs))) as pool:
            list(pool.map(compile_one, configs))


def _create_device_caches(kernel) -> None:
    """Set up the JIT function's kernel cache for the current device here, before threads
    compile into it: created by two threads at once, one thread's kernels would land in a cache
    that is then replaced (a lost compile, not a wrong result). Triton internals: skipped where
    they differ."""
    try:
        from triton.runtime import driver
        from triton.runtime.jit import JITFunction

        while not isinstance(kernel, JITFunction):
            kernel = kernel.fn
        kernel.device_caches[driver.active.get_current_device()]
    except Exception:
        pass


if hasattr(attention_forward_kernel, "_bench") and hasattr(
    attention_forward_kernel, "prune_configs"
):
    ParallelCompile(attention_forward_kernel)


@functools.lru_cache(maxsize=64)
def head_blocks(head_dim: int, split: bool = True) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_DT): a power-of-two block plus a power-of-two tail (>= 16, as tl.dot
    needs) when that pads less than one block of next_power_of_2(head_dim); else (pow2, 0)."""
    padded = max(16, next_power_of_2(head_dim))
    main = 1 << (head_dim.bit_length() - 1)  # largest power of two <= head_dim
    if not split or main < 16 or main == head_dim:
        return padded, 0
    tail = max(16, next_power_of_2(head_dim - main))
    return (main, tail) if main + tail < padded else (padded, 0)


def scaled_strides(t: torch.Tensor, unit: int) -> tuple[int, int, int, int]:
    """(B, H, N) strides in units of ``unit`` (0 for size-1 dims, never indexed) and D's stride."""
    shape, stride = t.shape, t.stride()
    return (
        stride[0] // unit if shape[0] > 1 else 0,
        stride[1] // unit if shape[1] > 1 else 0,
        stride[2] // unit if shape[2] > 1 else 0,
        stride[3],
    )


def stride_unit(*tensors: torch.Tensor) -> int:
    """Largest power of two (<= 16) dividing every batch / head / row stride that is indexed."""
    divisor = 0
    for t in tensors:
        shape, stride = t.shape, t.stride()
        for d in range(3):
            if shape[d] > 1:
                divisor = math.gcd(divisor, stride[d])
    if divisor == 0:
        return 16
    return min(divisor & -divisor, 16)


def empty_attention_output(q: torch.Tensor, head_dim_v: int) -> torch.Tensor:
    """(B, H, N, Dv) output stored as (B, N, H, Dv): merging the heads after is a free view."""
    batch, heads, queries, _ = q.shape
    return q.new_empty((batch, queries, heads, head_dim_v)).transpose(1, 2)


# (configs, dtype, device, queries, keys, head dim, BLOCK_D, BLOCK_DT, FASTDIFF_AUTOTUNE,
# FASTDIFF_ATTENTION_CONFIGS) -> lone_config's answer: pruning costs ~30 us of Python, too much
# for every un-graphed launch.
_lone_configs: dict[tuple, tuple[object, dict]] = {}


def _direct(config) -> tuple[object, dict]:
    options = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
    return attention_forward_kernel.fn, options


def tuned_config(q: torch.Tensor, configs, args: dict):
    """The config the shipped table (attention_configs) names for this launch, when it is one
    of the candidates that fit the shape; else None."""
    table = attention_configs.table_for(q)
    if not table:
        return None
    key = attention_configs.entry_key(
        q.dtype, args["N_QUERIES"], args["N_KEYS"], q.shape[-1], args["BLOCK_D"], args["BLOCK_DT"]
    )
    wanted = table.get(key)
    if wanted is None:
        return None
    return next((c for c in _fitting(configs, args) if _shape(c) == wanted), None)


def lone_config(
    q: torch.Tensor, queries: int, keys: int, block_d: int, block_dt: int
) -> tuple[object, dict]:
    """(kernel, launch options): the kernel under the autotuner with one config (the one the
    shipped table names for this shape, or the only one the pruning keeps: fp32, or
    ``FASTDIFF_AUTOTUNE=0``), else the autotuner with none. Triton 3.6's autotuner times even a
    lone config, about 0.1 s of benchmarking per new shape for nothing; launched directly, the
    config only compiles."""
    configs = attention_forward_kernel.configs
    key = (
        id(configs),
        q.dtype,
        q.device,
        queries,
        keys,
        q.shape[-1],
        block_d,
        block_dt,
        os.environ.get("FASTDIFF_AUTOTUNE", "1"),
        os.environ.get(attention_configs.ENV, ""),
    )
    if key not in _lone_configs:
        args = prune_args(q, queries, keys, block_d, block_dt)
        tuned = tuned_config(q, configs, args) if len(configs) > 1 else None
        kept = [tuned] if tuned is not None else _prune(configs, args)
        if len(kept) != 1:
            _lone_configs[key] = (attention_forward_kernel, {})
        else:
            _lone_configs[key] = _direct(kept[0])
    return _lone_configs[key]


def attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Launch the kernel. q (B, H, N, D), k and v (B, H, M, D), D <= 256; scale > 0."""
    batch, heads, queries, head_dim = q.shape
    keys = k.shape[2]
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"attention kernel: head dim {head_dim} > {MAX_HEAD_DIM}")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    out = empty_attention_output(q, head_dim)
    if out.numel() == 0:
        return out
    unit = stride_unit(q, k, v, out)
    strides = (
        *scaled_strides(q, unit),
        *scaled_strides(k, unit),
        *scaled_strides(v, unit),
        *scaled_strides(out, unit),
    )

    def grid(meta):
        return (cdiv(queries, meta["BLOCK_M"]), batch * heads)

    def run(split: bool) -> None:
        block_d, block_dt = head_blocks(head_dim, split)
        kernel, config = lone_config(q, queries, keys, block_d, block_dt)
        if compiling_ahead() and kernel is attention_forward_kernel:
            # The autotuner would time its candidates (on outputs that compile_ahead skips):
            # compile every candidate instead, and leave the timing to the real run.
            args = prune_args(q, queries, keys, block_d, block_dt)
            candidates = _prune(kernel.configs, args)
            # all_kwargs(): the launch options exactly as the autotuner passes them, so its
            # timing launches find these kernels in the cache.
            launches = [(kernel.fn, c.all_kwargs()) for c in candidates]
        else:
            launches = [(kernel, config)]
        for target, options in launches:
            block_m = options.get("BLOCK_M")  # a lone config's: the grid without a function
            launch(
                target,
                grid if block_m is None else (cdiv(queries, block_m), batch * heads),
                q,
                k,
                v,
                out,
                scale * LOG2_E,
                heads,
                *strides,
                queries,
                keys,
                STRIDE_UNIT=unit,
                HEAD_DIM=head_dim,
                BLOCK_D=block_d,
                BLOCK_DT=block_dt,
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                outputs=(out,),
                # Options in the autotuner's order (its own, then the config's): Triton's kernel
                # cache key is the options dict as written, so the same options in another
                # order would compile the kernel again.
                **COMPILE_OPTIONS,
                **options,
            )

    global _split_head_dim_works
    if SPLIT_HEAD_DIM and _split_head_dim_works and head_blocks(head_dim)[1] > 0:
        try:
            run(split=True)
            return out
        except Exception as error:  # a compiler that rejects the split: keep the padded kernel
            _split_head_dim_works = False
            warnings.warn(
                f"attention kernel: split head dim failed to compile ({type(error).__name__}: "
                f"{str(error)[:200]}); using power-of-two padded head dims from now on",
                RuntimeWarning,
                stacklevel=2,
            )
    run(split=False)
    return out
