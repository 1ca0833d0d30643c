"""Compile every Triton kernel for an H100/H200 (sm_90) on a machine without a GPU, and report
what the compiler says about each: registers, spills, shared memory, and the matrix instructions.

The launchers in ``kernels/`` run as they would on a GPU, on CPU tensors of the real shapes and
dtypes, with Triton's driver replaced by one that names an sm_90 target: Triton specialises and
compiles each launch exactly as it would there (tensor alignment, integer divisibility,
constexprs, the heuristic configs), and the launch itself is skipped. ``ptxas -v`` (shipped with
Triton) gives the resource figures and ``cuobjdump -sass`` the instruction mix: a dot kernel whose
SASS has no ``HGMMA`` (wgmma) runs on Hopper's slower ``HMMA`` path.

This is the Triton counterpart of ``csrc/check_compile.sh``: it catches kernels that the CPU
interpreter runs but the GPU compiler rejects (bfloat16 above all, which the interpreter cannot
run), before a GPU session spends device time on them. The Triton here may be newer than the GPU
machine's: ``benchmarks/gpu_stack_check.sh`` runs this script (and the CPU tests) under the GPU
machine's torch and Triton versions.

    python benchmarks/triton_sm90.py            # every SD shape, all dtypes (a few minutes)
    python benchmarks/triton_sm90.py --quick    # one shape per kernel family (CI)
    python benchmarks/triton_sm90.py --all-configs   # also every attention autotune config

Exit status 1 when a kernel fails to compile (or a launcher falls back to a slower kernel).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    # Kernels decorated under the interpreter are not compiled: start over without it.
    os.execve(
        sys.executable,
        [sys.executable, *sys.argv],
        {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
    )
os.environ["FASTDIFF_AUTOTUNE"] = "0"  # the heuristic config, as gpu_check's tests use

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class Sm90Driver:
    """Just enough of Triton's driver for compilation: the target, a device and a stream id."""

    def get_current_target(self) -> GPUTarget:
        return TARGET

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_benchmarker(self) -> Callable:
        """Older Triton (3.6, the GPU machine's) benchmarks even a lone pruned autotune config:
        compile it, as the real benchmarker would, and report a dummy time."""

        def bench(kernel_call: Callable, quantiles=None, **_) -> float | list[float]:
            kernel_call()
            return [1.0] * len(quantiles) if quantiles else 1.0

        return bench


@dataclass
class Compiled:
    case: str
    kernel: str
    num_warps: int
    num_stages: int
    shared: int
    registers: int | None = None
    spilled: int | None = None  # bytes of spill stores
    hgmma: int | None = None  # wgmma instructions in the SASS (dot kernels only)


@contextlib.contextmanager
def compile_only() -> Iterator[list]:
    """Inside: Triton launches compile for sm_90 and return without running; yields the list of
    (kernel name, CompiledKernel) they produced."""
    produced: list = []
    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
        # Triton 3.6's autotuner launches a lone config twice (benchmark, then run): one row.
        if not any(seen is kernel for _, seen in produced):
            produced.append((self.fn.__name__, kernel))
        return kernel

    previous = driver._active  # reset_active() would look for a real GPU driver
    driver.set_active(Sm90Driver())
    JITFunction.run = run
    try:
        yield produced
    finally:
        JITFunction.run = original
        driver._active = previous


class _StubModule:
    """The module handle the stub driver's ``load_binary`` gives every kernel it loads."""


STUB_MODULE = _StubModule()


class _StubUtils:
    """What ``CompiledKernel._init_handles`` asks the driver for, without a GPU: H100/H200
    limits, a fake function handle per loaded kernel."""

    def __init__(self) -> None:
        self.loaded = 0

    def get_device_properties(self, device: int) -> dict:
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536}

    def load_binary(self, name, binary, shared, device) -> tuple:
        """(module, function handle, registers, spills, most threads a block may have)."""
        self.loaded += 1
        return STUB_MODULE, 0x1000 + self.loaded, 0, 0, 1024

    def unload_module(self, module) -> None:
        pass


class RecordingLauncher:
    """Stands in for a compiled kernel's C launcher (one per kernel, made by
    ``_init_handles``): appends ``(self, arguments)`` to ``calls`` when that is a list, else
    does nothing."""

    calls: list | None = None

    def __init__(self, src, metadata) -> None:
        self.name = getattr(src, "name", "?")

    def __call__(self, *args) -> None:
        if RecordingLauncher.calls is not None:
            RecordingLauncher.calls.append((self, args))


class StubLaunchDriver(Sm90Driver):
    """The compile-only driver with a launcher that launches nothing: Triton's whole launch path
    runs (binding, specialisation, the cache lookup, the grid, the launcher's call), and the
    kernel does not."""

    launcher_cls = RecordingLauncher

    def __init__(self) -> None:
        self.utils = _StubUtils()


@contextlib.contextmanager
def launches_stubbed() -> Iterator[list]:
    """Inside: Triton launches compile for sm_90 and call ``RecordingLauncher`` in place of the
    C launcher; yields the list of (launcher, arguments) it records. On the way out the kernels
    the stub loaded are unloaded again, so that no later driver meets the stub's handles."""
    from fastdiff.kernels import launch_cache

    calls: list = []
    previous = driver._active
    driver.set_active(StubLaunchDriver())
    RecordingLauncher.calls = calls
    launch_cache.clear()
    try:
        yield calls
    finally:
        RecordingLauncher.calls = None
        launch_cache.clear()
        for kernel in stub_loaded_kernels():
            kernel.module = kernel.function = kernel._run = None
        driver._active = previous


def stub_loaded_kernels() -> list:
    """The compiled kernels of fastdiff's Triton functions that the stub driver loaded."""
    from fastdiff.kernels import launch_cache

    found = []
    for name, module in list(sys.modules.items()):
        if not name.startswith("fastdiff.kernels"):
            continue
        for value in list(vars(module).values()):
            jit = launch_cache.innermost_jit(value) if hasattr(value, "run") else None
            for caches in getattr(jit, "device_caches", {}).values():
                for kernel in list(caches[0].values()):
                    if getattr(kernel, "module", None) is STUB_MODULE:
                        found.append(kernel)
    return found


def ptxas() -> str:
    """The ptxas Triton itself uses for sm_90 (its bundled one may be too old for its PTX)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(TARGET.arch).path
    except Exception:  # another Triton version's API: the bundled binary
        return str(TOOLS / "ptxas")


def sass_of(kernel) -> str:
    """The kernel's SASS (cuobjdump -sass of its cubin)."""
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        return subprocess.run(
            [str(TOOLS / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True
        ).stdout


def resources(kernel) -> tuple[int | None, int | None, int | None]:
    """(registers, spill-store bytes, HGMMA count) from ptxas -v and cuobjdump -sass."""
    with tempfile.TemporaryDirectory() as folder:
        ptx = Path(folder) / "k.ptx"
        ptx.write_text(kernel.asm["ptx"])
        arch = re.search(r"^\.target\s+(\S+)", kernel.asm["ptx"], re.M)
        info = subprocess.run(
            [ptxas(), f"-arch={arch.group(1) if arch else 'sm_90a'}", "-v"]
            + [str(ptx), "-o", str(Path(folder) / "v.cubin")],
            capture_output=True,
            text=True,
        ).stderr
    sass = sass_of(kernel)
    registers = re.search(r"Used (\d+) registers", info)
    spilled = re.search(r"(\d+) bytes spill stores", info)
    return (
        int(registers.group(1)) if registers else None,
        int(spilled.group(1)) if spilled else None,
        sass.count("HGMMA") if sass else None,
    )


# ------------------------------------------------------------------------------ the cases
def group_norm_cases(quick: bool) -> list[tuple[str, Callable[[], object]]]:
    from fastdiff.kernels.group_norm import group_norm_forward

    shapes = [(2, 1280, 8, 8), (2, 320, 64, 64)]  # the single-pass kernel, the split reduction
    if not quick:
        shapes += [(2, 640, 32, 32), (2, 1280, 16, 16), (1, 512, 128, 128), (2, 960, 32, 32)]
    cases = []
    for shape in shapes:
        for name, dtype in DTYPES.items():
            for nhwc in (False, True):
                if quick and nhwc and dtype != torch.float16:
                    continue

                def launch(shape=shape, dtype=dtype, nhwc=nhwc):
                    x = torch.empty(shape, dtype=dtype)
                    if nhwc:
                        x = x.contiguous(memory_format=torch.channels_last)
                    weight = torch.empty(shape[1], dtype=dtype)
                    return group_norm_forward(x, 32, weight, weight, 1e-6, True)

                layout = "nhwc" if nhwc else "nchw"
                cases.append((f"group_norm {'x'.join(map(str, shape))} {layout} {name}", launch))

        def launch_with_offset(shape=shape):  # a ResNet block's norm2 under fold_biases
            x = torch.empty(shape, dtype=torch.float16).contiguous(
                memory_format=torch.channels_last
            )
            weight = torch.empty(shape[1], dtype=torch.float16)
            offset = torch.empty(shape[:2], dtype=torch.float16)
            return group_norm_forward(x, 32, weight, weight, 1e-5, True, offset)

        shape_name = "x".join(map(str, shape))
        cases.append((f"group_norm {shape_name} nhwc fp16 offset", launch_with_offset))
    return cases + group_norm_two_launch_cases(quick)


def group_norm_two_launch_cases(quick: bool) -> list[tuple[str, Callable[[], object]]]:
    """The split reduction in two launches (SPLIT_LAUNCHES = 2, off by default) at the shapes
    that take the split reduction, with and without the folded time-embedding offset."""
    import fastdiff.kernels.group_norm as group_norm_kernels
    import fastdiff.kernels.group_norm_split as group_norm_split

    shapes = [(2, 320, 64, 64)] if quick else [(2, 320, 64, 64), (1, 512, 128, 128)]
    cases = []
    for shape in shapes:
        for name, dtype in DTYPES.items():
            for nhwc, with_offset in ((False, False), (True, False), (True, True)):
                if quick and (dtype != torch.float16 or not nhwc):
                    continue

                def launch(shape=shape, dtype=dtype, nhwc=nhwc, with_offset=with_offset):
                    x = torch.empty(shape, dtype=dtype)
                    if nhwc:
                        x = x.contiguous(memory_format=torch.channels_last)
                    weight = torch.empty(shape[1], dtype=dtype)
                    offset = torch.empty(shape[:2], dtype=dtype) if with_offset else None
                    settings = {"SPLIT_LAUNCHES": 2, "SINGLE_PASS_MAX_GROUP": 0}
                    saved = {key: getattr(group_norm_kernels, key) for key in settings}
                    vars(group_norm_kernels).update(settings)
                    count = group_norm_split.multiprocessors
                    # The H200's 132 SMs size the splits (and BLOCK_SPLIT), as on the GPU.
                    group_norm_split.multiprocessors = lambda device: 132
                    try:
                        return group_norm_kernels.group_norm_forward(
                            x, 32, weight, weight, 1e-6, True, offset
                        )
                    finally:
                        vars(group_norm_kernels).update(saved)
                        group_norm_split.multiprocessors = count

                layout = ("nhwc" if nhwc else "nchw") + (" offset" if with_offset else "")
                label = f"group_norm {'x'.join(map(str, shape))} {layout} {name} two launches"
                cases.append((label, launch))
    return cases


def attention_cases(quick: bool) -> list[tuple[str, Callable[[], object]]]:
    from fastdiff.kernels.attention import attention_forward

    # (B, H, N, M, D): SD1.5 self at each level and cross (77 keys), SD2/SDXL head dim 64
    shapes = [(2, 8, 4096, 4096, 40), (2, 8, 4096, 77, 40)]
    if not quick:
        shapes += [(2, 8, 1024, 1024, 80), (2, 8, 256, 256, 160), (2, 10, 4096, 4096, 64)]
        shapes += [(2, 20, 1024, 77, 64), (1, 1, 4096, 4096, 256)]
    cases = []
    for batch, heads, queries, keys, dim in shapes:
        for name, dtype in DTYPES.items():
            if quick and dtype == torch.float32 and queries != keys:
                continue

            def launch(b=batch, h=heads, n=queries, m=keys, d=dim, dtype=dtype):
                q = torch.empty(b, h, n, d, dtype=dtype)
                k = torch.empty(b, h, m, d, dtype=dtype)
                return attention_forward(q, k, torch.empty_like(k))

            label = f"attention B{batch} H{heads} N{queries} M{keys} D{dim} {name}"
            cases.append((label, launch))
    return cases


def row_cases(quick: bool) -> list[tuple[str, Callable[[], object]]]:
    from fastdiff.kernels.geglu import geglu_forward
    from fastdiff.kernels.layer_norm import layer_norm_forward

    widths = [320] if quick else [320, 640, 1280, 2048]
    cases = []
    for width in widths:
        for name, dtype in DTYPES.items():

            def norm(width=width, dtype=dtype):
                x = torch.empty(2, 1024, width, dtype=dtype)
                weight = torch.empty(width, dtype=dtype)
                return layer_norm_forward(x, weight, weight, 1e-5)

            def gate(width=width, dtype=dtype):
                return geglu_forward(torch.empty(2, 1024, 2 * 4 * width, dtype=dtype))

            def add_norm(width=width, dtype=dtype):  # a transformer block's residual + norm
                x = torch.empty(2, 1024, width, dtype=dtype)
                weight = torch.empty(width, dtype=dtype)
                residual = torch.empty_like(x)  # and the feed-forward bias: the fold's call
                return layer_norm_forward(x, weight, weight, 1e-5, residual, weight)

            def add_norm_biased(width=width, dtype=dtype):  # norm3's call: both biases
                x = torch.empty(2, 1024, width, dtype=dtype)
                weight = torch.empty(width, dtype=dtype)
                residual = torch.empty_like(x)  # and the attention's output bias, left to it
                return layer_norm_forward(x, weight, weight, 1e-5, residual, weight, weight)

            cases += [(f"layer_norm 2x1024x{width} {name}", norm)]
            cases += [(f"add_layer_norm 2x1024x{width} {name}", add_norm)]
            cases += [(f"add_layer_norm 2x1024x{width} {name} x_bias", add_norm_biased)]
            cases += [(f"geglu 2x1024x{2 * 4 * width} {name}", gate)]
    return cases


def polynomial_erf_cases(quick: bool) -> list[tuple[str, Callable[[], object]]]:
    """The GEGLU kernel and the fused projection with kernels/gelu.py's POLYNOMIAL_ERF on
    (bench_geglu's and bench_linear_geglu's fastdiff-polyerf rows), half precision only."""
    import fastdiff.kernels.gelu as gelu
    from fastdiff.kernels.geglu import geglu_forward
    from fastdiff.kernels.linear_geglu import linear_geglu_forward

    def polynomial(launch: Callable[[], object]) -> Callable[[], object]:
        def launch_polynomial():
            gelu.POLYNOMIAL_ERF = True
            try:
                return launch()
            finally:
                gelu.POLYNOMIAL_ERF = False

        return launch_polynomial

    cases = []
    for name in ("fp16",) if quick else ("fp16", "bf16"):
        dtype = DTYPES[name]

        def gate(dtype=dtype):
            return geglu_forward(torch.empty(2, 4096, 2 * 1280, dtype=dtype))

        def projection(dtype=dtype):
            x, weight = torch.empty(8192, 320, dtype=dtype), torch.empty(2560, 320, dtype=dtype)
            return linear_geglu_forward(x, weight, weight[:, 0].contiguous())

        cases.append((f"geglu 2x4096x2560 {name} polynomial erf", polynomial(gate)))
        cases.append((f"linear_geglu 8192x320->1280 {name} polynomial erf", polynomial(projection)))
    return cases


# (rows, input features, inner) of the feed-forward's GEGLU projection at SD1.5's three levels
LINEAR_GEGLU_SHAPES = [(8192, 320, 1280), (2048, 640, 2560), (512, 1280, 5120)]


def linear_geglu_case(rows: int, depth: int, inner: int, dtype, config: str | None = None):
    """A launch of the fused GEGLU projection at one shape, with ``config`` (a name in
    kernels/linear_geglu.py's CONFIGS) in place of the default."""
    import fastdiff.kernels.linear_geglu as linear_geglu

    def launch():
        saved = linear_geglu.config_override
        linear_geglu.config_override = config
        try:
            x = torch.empty(rows, depth, dtype=dtype)
            weight = torch.empty(2 * inner, depth, dtype=dtype)
            return linear_geglu.linear_geglu_forward(x, weight, weight[:, 0].contiguous())
        finally:
            linear_geglu.config_override = saved

    name = next(label for label, value in DTYPES.items() if value == dtype)
    label = f"linear_geglu {rows}x{depth}->{inner} {name}"
    return (label if config is None else f"{label} config {config}"), launch


def linear_geglu_cases(quick: bool) -> list[tuple[str, Callable[[], object]]]:
    shapes = LINEAR_GEGLU_SHAPES[:1] if quick else LINEAR_GEGLU_SHAPES
    dtypes = [torch.float16] if quick else list(DTYPES.values())
    return [linear_geglu_case(*shape, dtype) for shape in shapes for dtype in dtypes]


def linear_geglu_config_cases() -> list[tuple[str, Callable[[], object]]]:
    """Every fp16 tile config of the fused GEGLU projection (bench_linear_geglu times them all
    on the GPU, so each must compile) at each SD1.5 shape."""
    from fastdiff.kernels.linear_geglu import CONFIGS

    return [
        linear_geglu_case(*shape, torch.float16, config)
        for shape in LINEAR_GEGLU_SHAPES
        for config in CONFIGS
    ]


# (batch, in channels, height, width, out channels) of SD1.5's ResNet convolutions at the
# feature maps the split-reduction conv3x3 kernel is for
CONV3X3_SHAPES = [(2, 1280, 8, 8, 1280), (2, 2560, 8, 8, 1280), (2, 1280, 16, 16, 1280)]


def conv3x3_cases(quick: bool) -> list[tuple[str, Callable[[], object]]]:
    """The conv3x3 kernel (and, with a split reduction, its summing kernel) on the H200's 132
    SMs, as the launcher sizes the split there."""
    import fastdiff.kernels.conv3x3 as conv3x3

    shapes = CONV3X3_SHAPES[:1] if quick else CONV3X3_SHAPES
    dtypes = {"fp16": torch.float16} if quick else DTYPES
    cases = []
    for batch, channels, height, width, out_channels in shapes:
        for name, dtype in dtypes.items():

            def launch(b=batch, c=channels, h=height, w=width, n=out_channels, dtype=dtype):
                saved = conv3x3.programs_available
                conv3x3.programs_available = lambda device: 132
                try:
                    x = torch.empty(b, c, h, w, dtype=dtype, memory_format=torch.channels_last)
                    weight = torch.empty(n, c, 3, 3, dtype=dtype)
                    return conv3x3.conv3x3_forward(x, weight, weight[:, 0, 0, 0].contiguous())
                finally:
                    conv3x3.programs_available = saved

            label = f"conv3x3 {batch}x{channels}x{height}x{width}->{out_channels} {name}"
            cases.append((label, launch))
    return cases


# (batch, channels of the upsampled map, of the skip, height, width): SD1.5's up blocks
CAT_CHANNELS_SHAPES = [(2, 640, 320, 64, 64), (2, 1280, 640, 32, 32), (2, 1280, 1280, 8, 8)]


def cat_channels_cases(quick: bool) -> list[tuple[str, Callable[[], object]]]:
    """The skip concatenation's row-copy kernel at SD1.5's up-block shapes, channels-last."""
    from fastdiff.kernels.cat_channels import cat_channels_forward

    shapes = CAT_CHANNELS_SHAPES[:1] if quick else CAT_CHANNELS_SHAPES
    dtypes = {"fp16": torch.float16} if quick else DTYPES
    cases = []
    for batch, channels_a, channels_b, height, width in shapes:
        for name, dtype in dtypes.items():

            def launch(b=batch, ca=channels_a, cb=channels_b, h=height, w=width, dtype=dtype):
                a = torch.empty(b, ca, h, w, dtype=dtype, memory_format=torch.channels_last)
                skip = torch.empty(b, cb, h, w, dtype=dtype, memory_format=torch.channels_last)
                return cat_channels_forward(a, skip)

            label = f"cat_channels {batch}x{channels_a}+{channels_b}x{height}x{width} {name}"
            cases.append((label, launch))
    return cases


def bias_residual_cases(quick: bool) -> list[tuple[str, Callable[[], object]]]:
    """A ResNet block's end (x + h + bias) at SD1.5's 64x64 map and the VAE's 512x512 one."""
    from fastdiff.kernels.bias_residual import bias_residual_forward

    shapes = (
        [(2, 320, 64, 64)] if quick else [(2, 320, 64, 64), (2, 1280, 8, 8), (1, 128, 512, 512)]
    )
    dtypes = {"fp16": torch.float16} if quick else DTYPES
    cases = []
    for shape in shapes:
        for name, dtype in dtypes.items():

            def launch(shape=shape, dtype=dtype):
                x = torch.empty(shape, dtype=dtype, memory_format=torch.channels_last)
                bias = torch.empty(shape[1], dtype=dtype)
                return bias_residual_forward(x, torch.empty_like(x), bias)

            cases.append((f"bias_residual {'x'.join(map(str, shape))} {name}", launch))
    return cases


def sampler_step_cases(quick: bool) -> list[tuple[str, Callable[[], object]]]:
    from fastdiff.kernels.sampler_step import sampler_step_forward

    cases = []
    for name, dtype in DTYPES.items():
        variants = [(True, True, True)] if quick else [(c, s, n) for c in (0, 1) for s in (0, 1)
                                                       for n in (0, 1)]  # fmt: skip
        for cfg, on_device, noise in variants:

            def launch(dtype=dtype, cfg=cfg, on_device=on_device, noise=noise):
                x = torch.empty(2, 4, 64, 64, dtype=dtype)
                model = torch.empty(4 if cfg else 2, 4, 64, 64, dtype=dtype)
                table = torch.empty(20, 10, dtype=torch.float32)
                step = torch.zeros((), dtype=torch.int64) if on_device else None
                guidance = torch.empty((), dtype=torch.float32) if on_device else None
                return sampler_step_forward(
                    x,
                    model,
                    table if on_device else table[0],
                    step,
                    torch.empty_like(x),
                    guidance,
                    7.5,
                    torch.empty_like(x) if noise else None,
                )

            label = f"sampler_step {name} cfg={int(cfg)} device_row={int(on_device)}"
            cases.append((f"{label} noise={int(noise)}", launch))

        def launch_prev2(dtype=dtype):  # UniPC's plans: the x0 of two rows back as well
            x = torch.empty(2, 4, 64, 64, dtype=dtype)
            model = torch.empty(4, 4, 64, 64, dtype=dtype)
            table = torch.empty(20, 10, dtype=torch.float32)
            step = torch.zeros((), dtype=torch.int64)
            guidance = torch.empty((), dtype=torch.float32)
            previous = torch.empty_like(x)
            return sampler_step_forward(
                x,
                model,
                table,
                step,
                previous,
                guidance,
                7.5,
                None,
                torch.empty(1, *x.shape, dtype=dtype),
            )

        cases.append((f"sampler_step {name} cfg=1 device_row=1 noise=0 prev2=1", launch_prev2))
    return cases


def all_config_cases() -> list[tuple[str, Callable[[], object]]]:
    """Every attention autotune config at SD self-attention shapes (the autotuner compiles all
    of them on the GPU, so each must compile), fp16 and fp32."""
    import fastdiff.kernels.attention as attention

    cases = []
    half, full = torch.float16, torch.float32
    for dim, dtype in ((40, half), (64, half), (160, half), (64, full), (160, full)):
        shapes = attention._FP32_SHAPES if dtype == full else attention._GPU_SHAPES
        for shape in shapes:

            def launch(shape=shape, dim=dim, dtype=dtype):
                saved = attention.heuristic_shape
                attention.heuristic_shape = lambda *args, **kwargs: shape
                attention.attention_forward_kernel.cache.clear()  # the per-key config choice
                attention._lone_configs.clear()
                try:
                    q = torch.empty(2, 8, 4096, dim, dtype=dtype)
                    return attention.attention_forward(q, q, q)
                finally:
                    attention.heuristic_shape = saved
                    attention.attention_forward_kernel.cache.clear()
                    attention._lone_configs.clear()

            name = "fp32" if dtype == torch.float32 else "fp16"
            cases.append((f"attention D{dim} {name} config {shape}", launch))
    return cases


def autotune_compile(threads: int) -> int:
    """Autotune the attention kernel at SD1.5's 64x64 self-attention shape (fp16) with the
    shipped table off, compiling the candidates in ``threads`` threads (ParallelCompile), and
    print how many candidates there were, how many kernels were compiled and how long it took.
    As many kernels as candidates means the timing loop reused every kernel the threads built."""
    from fastdiff.kernels import attention

    os.environ.update(
        FASTDIFF_AUTOTUNE="1",
        FASTDIFF_ATTENTION_CONFIGS="off",
        FASTDIFF_COMPILE_THREADS=str(threads),
    )
    q = torch.empty(2, 8, 4096, 40, dtype=torch.float16)
    block_d, block_dt = attention.head_blocks(40)
    args = attention.prune_args(q, 4096, 4096, block_d, block_dt)
    candidates = len(attention._prune(attention.attention_forward_kernel.configs, args))
    with compile_only() as produced:
        begin = time.perf_counter()
        attention.attention_forward(q, q, q)
        seconds = time.perf_counter() - begin
    print(
        f"autotune compile: {candidates} candidates, {len(produced)} kernels compiled, "
        f"{threads} threads, {seconds:.2f} s"
    )
    return 0 if len(produced) == candidates else 1


def compiled_kernels() -> int:
    """Kernels compiled so far in this process, over fastdiff's Triton kernels: every
    ``fastdiff.kernels`` module loaded (a new kernel module counts without being listed here),
    each kernel once however many modules import it."""
    import fastdiff.kernels  # noqa: F401  (the package whose modules are walked)

    total, seen = 0, set()
    modules = [
        module
        for name, module in list(sys.modules.items())
        if name.startswith("fastdiff.kernels.") and module is not None
    ]
    for module in modules:
        for value in vars(module).values():
            while hasattr(value, "fn") and not isinstance(value, JITFunction):
                value = value.fn  # autotuner / heuristics wrappers
            if isinstance(value, JITFunction) and id(value) not in seen:
                seen.add(id(value))
                total += sum(len(caches[0]) for caches in value.device_caches.values())
    return total


# The driver functions a Triton 3.6 launcher links against: a machine without a GPU builds and
# loads launchers against this stand-in (``--launchers``), which nothing ever calls.
STUB_LIBCUDA = """
int cuCtxGetCurrent(void *c) { return 999; }
int cuCtxSetCurrent(void *c) { return 999; }
int cuDeviceGet(void *d, int o) { return 999; }
int cuDevicePrimaryCtxRetain(void *c, int d) { return 999; }
int cuFuncSetAttribute(void *f, int a, int v) { return 999; }
int cuGetErrorString(int e, const char **s) { return 999; }
int cuPointerGetAttribute(void *d, int a, unsigned long long p) { return 999; }
"""


def with_libcuda() -> None:
    """Make sure launchers can link and load against a libcuda.so.1: where the machine has none
    (and TRITON_LIBCUDA_PATH names none), build STUB_LIBCUDA and start this script again with it
    on the loader's path (read only when a process starts)."""
    if os.environ.get("TRITON_LIBCUDA_PATH"):
        return
    found = subprocess.run(["/sbin/ldconfig", "-p"], capture_output=True, text=True).stdout
    if "libcuda.so.1" in found:
        return
    stub = Path(tempfile.mkdtemp(prefix="fastdiff-libcuda-"))
    (stub / "stub.c").write_text(STUB_LIBCUDA)
    subprocess.run(
        ["cc", "-shared", "-fPIC", "-o", str(stub / "libcuda.so.1"), str(stub / "stub.c")],
        check=True,
    )
    (stub / "libcuda.so").symlink_to("libcuda.so.1")
    path = ":".join(p for p in (str(stub), os.environ.get("LD_LIBRARY_PATH", "")) if p)
    env = {**os.environ, "TRITON_LIBCUDA_PATH": str(stub), "LD_LIBRARY_PATH": path}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def prepared_unet(config: str, size: int, dtype: torch.dtype) -> tuple[torch.nn.Module, dict]:
    """A U-Net (``config`` of benchmarks/model_configs.py) on the CPU in ``dtype``, prepared as
    ``optimize()`` prepares it (fused QKV, folded biases, channels-last), and its batch-2
    inputs at ``size`` x ``size`` latents."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_unet
    import model_bench
    from model_configs import model_config

    context_dim = model_config(config)["cross_attention_dim"]
    work = bench_unet.UNetWorkload("check", config, 2, size, 77, context_dim)
    holder = model_bench.ModelHolder("unet", config, torch.device("cpu"), dtype)
    model = holder.fastdiff_model(prepared=True)
    model.fold_conv_biases(True)
    model.to(memory_format=torch.channels_last)
    inputs = bench_unet.unet_inputs(work, "cpu", dtype)
    inputs["sample"] = inputs["sample"].contiguous(memory_format=torch.channels_last)
    return model, inputs


def compile_ahead_check(
    threads: int,
    config: str,
    size: int,
    autotune: bool = True,
    launchers: str | None = None,
) -> int:
    """A U-Net forward (``config`` of benchmarks/model_configs.py, prepared as optimize() does,
    fp16, latent ``size``) run twice with every op on the triton backend, kernels compiled for
    sm_90 and never run: first inside ``compile_ahead(threads)``, then plainly. Prints the
    kernels each pass compiled and its seconds; the plain pass must compile none.

    ``launchers`` (Triton 3.6, whose launchers are C compiled per kernel signature): the
    compile-only driver gets the real CUDA launcher class, during the pass ("ahead", as on a
    GPU) or only after it ("after", as if the pass did not build them); then each kernel's
    launcher is made as its first launch would make it, and those seconds are printed: what the
    first launches after the pass spend building launchers, one after another."""
    from fastdiff.kernels import compile_ahead

    import fastdiff.ops.backend as ops_backend
    from fastdiff.ops import use_backend

    os.environ.update(FASTDIFF_AUTOTUNE="1" if autotune else "0", FASTDIFF_ATTENTION_CONFIGS="off")
    ops_backend.triton_can_run = lambda tensor: True  # CPU tensors too: nothing runs
    model, inputs = prepared_unet(config, size, torch.float16)
    counts, seconds = [], []
    cuda_launcher = None
    if launchers:
        from triton.backends.nvidia import driver as nvidia_driver

        if not hasattr(nvidia_driver, "make_launcher"):
            print(f"triton {triton.__version__}: one generic launcher, none to build per kernel")
            return 0
        cuda_launcher = nvidia_driver.CudaLauncher
    with torch.no_grad(), use_backend("triton"), compile_only() as produced:
        if launchers == "ahead":
            driver.active.launcher_cls = cuda_launcher
        timing: dict = {}
        for ahead in (True, False):
            before, begin = compiled_kernels(), time.perf_counter()
            with compile_ahead(threads, timing=timing) if ahead else contextlib.nullcontext():
                model(**inputs)
            seconds.append(time.perf_counter() - begin)
            counts.append(compiled_kernels() - before)
    print(
        f"compile ahead ({config}, latent {size}, {threads} threads): {counts[0]} kernels in "
        f"{seconds[0]:.2f} s (the forward {timing['forward_s']:.2f} s, then waiting "
        f"{timing['wait_s']:.2f} s); then the forward compiled {counts[1]} more in "
        f"{seconds[1]:.2f} s"
    )
    if cuda_launcher is not None:
        # Each kernel once: the threaded pass gave futures (FutureKernel), the plain forward the
        # compiled kernels.
        kernels = {}
        for _, kernel in produced:
            kernel = kernel.result() if hasattr(kernel, "result") else kernel
            if kernel is not None:
                kernels[id(kernel)] = kernel
        begin = time.perf_counter()
        for kernel in kernels.values():
            cuda_launcher(kernel.src, kernel.metadata)
        print(
            f"launchers built {'in' if launchers == 'ahead' else 'after'} the pass: the first "
            f"launches of its {len(kernels)} kernels then spent "
            f"{time.perf_counter() - begin:.2f} s making their launchers"
        )
    return 0 if counts[0] > 0 and counts[1] == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one shape per kernel family")
    parser.add_argument("--all-configs", action="store_true", help="every attention config")
    parser.add_argument(
        "--autotune-compile",
        type=int,
        metavar="THREADS",
        help="only: time the attention autotuner's compilation with THREADS threads",
    )
    parser.add_argument(
        "--compile-ahead",
        type=int,
        metavar="THREADS",
        help="only: compile a U-Net forward's kernels with compile_ahead(THREADS), then check "
        "that the forward itself compiles none",
    )
    parser.add_argument("--model", default="tiny_sd15_unet", help="with --compile-ahead")
    parser.add_argument("--latent", type=int, default=8, help="with --compile-ahead")
    parser.add_argument(
        "--no-autotune",
        action="store_true",
        help="with --compile-ahead: one heuristic attention config per shape, not every candidate",
    )
    parser.add_argument(
        "--launchers",
        choices=("ahead", "after"),
        help="with --compile-ahead, Triton 3.6: build each kernel's C launcher in the pass "
        "(ahead) or not (after), then time what the first launches spend on launchers",
    )
    args = parser.parse_args(argv)
    if args.compile_ahead is not None:
        if args.launchers:
            with_libcuda()
        return compile_ahead_check(
            args.compile_ahead,
            args.model,
            args.latent,
            autotune=not args.no_autotune,
            launchers=args.launchers,
        )
    if args.autotune_compile is not None:
        return autotune_compile(args.autotune_compile)
    cases = group_norm_cases(args.quick) + attention_cases(args.quick)
    cases += row_cases(args.quick) + linear_geglu_cases(args.quick)
    cases += polynomial_erf_cases(args.quick)
    cases += conv3x3_cases(args.quick) + sampler_step_cases(args.quick)
    cases += cat_channels_cases(args.quick) + bias_residual_cases(args.quick)
    if args.all_configs:
        cases += all_config_cases() + linear_geglu_config_cases()
    rows: list[Compiled] = []
    failures: list[str] = []
    print(f"triton {triton.__version__}, target sm_{TARGET.arch}")
    for label, launch in cases:
        with compile_only() as produced, warnings.catch_warnings():
            # A launcher that falls back to another kernel after a compile error warns: a failure.
            warnings.simplefilter("error", RuntimeWarning)
            try:
                launch()
            except Exception as error:  # report every case, then fail
                failures.append(f"{label}: {type(error).__name__}: {str(error)[:300]}")
                continue
        for name, kernel in produced:
            meta = kernel.metadata
            if getattr(meta, "enable_fp_fusion", True) is not True:
                # kernels/__init__.py's COMPILE_OPTIONS missing from this launch: the kernel
                # follows the installed Triton's default (off from 3.10), not what was measured.
                failures.append(f"{label}: {name} compiled without FP fusion")
            row = Compiled(label, name, meta.num_warps, meta.num_stages, meta.shared)
            row.registers, row.spilled, hgmma = resources(kernel)
            dots = ("attention", "linear_geglu", "conv3x3_kernel")
            row.hgmma = hgmma if any(kind in name for kind in dots) else None
            rows.append(row)
    header = f"{'case':58} {'kernel':34} {'warps':>5} {'stages':>6} {'regs':>5} {'spill B':>7}"
    print(header + f" {'smem B':>7} {'HGMMA':>5}")
    for row in rows:
        print(
            f"{row.case:58} {row.kernel:34} {row.num_warps:5d} {row.num_stages:6d} "
            f"{row.registers if row.registers is not None else '?':>5} "
            f"{row.spilled if row.spilled is not None else '?':>7} {row.shared:7d} "
            f"{'' if row.hgmma is None else row.hgmma:>5}"
        )
    for failure in failures:
        print("FAILED", failure)
    print(f"{len(rows)} kernels compiled for sm_90, {len(failures)} cases failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
