"""kernels/launch_cache.py: a repeated launch skips Triton's launch front end and launches
exactly what Triton would have (checked on sm_90 kernels with a recording launcher, no GPU)."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import triton
import triton.language as tl
from fastdiff.kernels import launch_cache
from triton.runtime.jit import JITFunction

REPO = Path(__file__).resolve().parents[2]
NEEDS_CUDA_BACKEND = pytest.mark.skipif(
    not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists(),
    reason="no Triton CUDA backend",
)
SUMMARY = re.compile(r"(\d+) launches compared, (\d+) from the cache, (\d+) differences")


@pytest.fixture(scope="module")
def triton_cache(tmp_path_factory) -> Path:
    """One Triton cache for this module's checks: the second compiles nothing."""
    return tmp_path_factory.mktemp("triton-cache")


def run_check(code: str, cache: Path) -> tuple[int, str]:
    """``code`` in a fresh process outside the interpreter, with the Triton cache ``cache``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache)
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=600,
    )
    return result.returncode, result.stdout + result.stderr


CHECK = """
import sys
sys.path.insert(0, "benchmarks")
import launch_cache_check
{sabotage}
sys.exit(launch_cache_check.main())
"""


@NEEDS_CUDA_BACKEND
def test_every_cached_launch_is_the_launch_triton_makes(triton_cache):
    """Every op at SD1.5 shapes and two whole narrow U-Net forwards (fp32, fp16): each launch
    from the cache called the same compiled kernel's launcher with the same grid and arguments
    as Triton's own launch path, and did not enter Triton's JITFunction.run."""
    status, output = run_check(CHECK.format(sabotage=""), triton_cache)
    assert status == 0, output[-3000:]
    compared, cached, differences = map(int, SUMMARY.search(output).groups())
    assert compared == cached >= 300 and differences == 0, output[-3000:]


@NEEDS_CUDA_BACKEND
def test_the_check_catches_a_signature_blind_to_alignment(triton_cache):
    """The comparison can fail: with every tensor reported 16-byte aligned, the misaligned
    GroupNorm input reuses the aligned input's kernel, and the check says so."""
    sabotage = """
import torch
from fastdiff.kernels import launch_cache
real = launch_cache.signature
def blind(kernel, args, kwargs, device):
    key = real(kernel, args, kwargs, device)
    values = tuple((v[0], True) if isinstance(v, tuple) and isinstance(v[0], torch.dtype) else v
                   for v in key[3])
    return (*key[:3], values, *key[4:])
launch_cache.signature = blind
"""
    status, output = run_check(CHECK.format(sabotage=sabotage), triton_cache)
    assert status == 1, output[-3000:]
    assert "aligned then not: launch 1" in output and "differs in compiled kernel" in output


def test_signature_separates_what_triton_specialises_on():
    aligned = torch.empty(64, dtype=torch.float16)
    other_aligned = torch.empty(64, dtype=torch.float16)
    misaligned = aligned[1:]

    def key(*args, **kwargs):
        return launch_cache.signature(
            test_signature_separates_what_triton_specialises_on, args, kwargs, 0
        )

    assert key(aligned, 8) == key(other_aligned, 8)  # tensors by dtype and alignment only
    assert key(aligned, 8) != key(misaligned, 8)
    assert key(aligned, 8) != key(aligned.float(), 8)
    assert key(aligned, 8) != key(aligned, 16)  # other scalars by value
    assert len({key(aligned, 1), key(aligned, True), key(aligned, 1.0)}) == 3  # and by type
    assert key(aligned, BLOCK=1) != key(aligned, BLOCK=True)
    assert key(aligned, A=1, B=2) != key(aligned, A=2, B=1)
    assert key(aligned, 8) != launch_cache.signature(len, (aligned, 8), {}, 0)  # the kernel
    assert key(aligned, 8) != launch_cache.signature(
        test_signature_separates_what_triton_specialises_on, (aligned, 8), {}, 1
    )  # and the device


def fake_kernel(signature: str):
    """A stand-in JITFunction with the parameters of ``def kernel{signature}: ...``."""
    namespace: dict = {}
    exec(f"def kernel{signature}: pass", namespace)
    parameters = inspect.signature(namespace["kernel"])
    return SimpleNamespace(
        params=[SimpleNamespace(name=name) for name in parameters.parameters],
        signature=parameters,
    )


def test_the_launch_values_after_the_arguments_come_in_parameter_order():
    jit = fake_kernel("(x, n, BLOCK, SILU=False, EPS=1e-5)")
    compiled = SimpleNamespace(packed_metadata=(), src=SimpleNamespace(fn=jit))
    x = torch.empty(4)
    recorded = [((x, 4), {"SILU": True, "BLOCK": 32, "num_warps": 4})]
    assert launch_cache._plan(jit, compiled, (x, 4), recorded) == (
        compiled,
        (32, True, 1e-5),  # keywords in the kernel's order, the default last; no options
        ("x", "n", "BLOCK", "SILU", "EPS"),
    )


def test_a_launch_that_cannot_be_repeated_as_recorded_is_not_remembered():
    jit = fake_kernel("(x, n, BLOCK)")
    compiled = SimpleNamespace(packed_metadata=(), src=SimpleNamespace(fn=jit))
    x = torch.empty(4)
    plan = launch_cache._plan
    assert plan(jit, compiled, (x, 4), []) is None  # nothing recorded
    assert plan(jit, compiled, (x, 4), [((x.clone(), 4), {"BLOCK": 8})]) is None  # a wrapper's
    assert plan(jit, compiled, (x, 4), [((x, 4), {})]) is None  # BLOCK has no value
    assert plan(jit, compiled, (x, 4), [((x, 4), {"BLOCK": x})]) is None  # a tensor by keyword
    other = SimpleNamespace(packed_metadata=(), src=SimpleNamespace(fn=fake_kernel("(x)")))
    assert plan(jit, other, (x, 4), [((x, 4), {"BLOCK": 8})]) is None  # another kernel's
    assert plan(jit, None, (x, 4), [((x, 4), {"BLOCK": 8})]) is None  # no compiled kernel


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter's path")
def test_under_the_interpreter_every_launch_goes_through_triton():
    from fastdiff.kernels.geglu import geglu_forward, geglu_kernel

    assert launch_cache.innermost_jit(geglu_kernel) is None  # an InterpretedFunction
    before = launch_cache.remembered()
    geglu_forward(torch.randn(4, 32))
    geglu_forward(torch.randn(4, 32))
    assert launch_cache.remembered() == before


def copy_block(x_ptr, BLOCK: tl.constexpr):
    tl.store(x_ptr + tl.arange(0, BLOCK), tl.load(x_ptr + tl.arange(0, BLOCK)))


def test_kernels_under_wrappers_are_found_unless_a_config_hooks_every_launch():
    copy_kernel = JITFunction(copy_block)  # compiled, as on a GPU, even under the interpreter
    plain = triton.autotune([triton.Config({"BLOCK": 16})], key=[])(copy_kernel)
    heuristics = triton.heuristics({"BLOCK": lambda args: 16})(copy_kernel)
    hooked = triton.autotune([triton.Config({"BLOCK": 16}, pre_hook=lambda args: None)], key=[])(
        copy_kernel
    )
    assert launch_cache.innermost_jit(copy_kernel) is copy_kernel
    assert launch_cache.innermost_jit(plain) is copy_kernel
    assert launch_cache.innermost_jit(triton.autotune([triton.Config({})], key=[])(heuristics)) is (
        copy_kernel
    )
    assert launch_cache.innermost_jit(hooked) is None
    assert launch_cache.innermost_jit(copy_block) is None  # a plain function


def gpu_op_calls() -> list[tuple[str, object]]:
    """(label, call) of every op on the GPU, with the variants the signature must tell apart."""
    from fastdiff import ops

    half, cuda = torch.float16, "cuda"
    x = torch.randn(2, 320, 64, 64, device=cuda, dtype=half)
    nhwc = x.contiguous(memory_format=torch.channels_last)
    small = torch.randn(2 * 1280 * 8 * 8 + 8, device=cuda, dtype=half)
    aligned, misaligned = small[:-8].view(2, 1280, 8, 8), small[1:-7].view(2, 1280, 8, 8)
    weight = torch.randn(320, device=cuda, dtype=half)
    wide = torch.randn(1280, device=cuda, dtype=half)
    offset = torch.randn(2, 320, device=cuda, dtype=half)
    rows = torch.randn(2, 4096, 320, device=cuda, dtype=half)
    other = torch.randn_like(rows)
    qkv = torch.randn(3, 4096, 3, 8, 40, device=cuda, dtype=half).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # batch 3, fused-QKV views
    context = torch.randn(3, 77, 2, 8, 40, device=cuda, dtype=half).permute(2, 0, 3, 1, 4)
    gates = torch.randn(2, 1024, 2560, device=cuda, dtype=half)
    projection = torch.randn(2560, 320, device=cuda, dtype=half) / 18
    bias = torch.randn(2560, device=cuda, dtype=half)
    latents = torch.randn(1, 4, 64, 64, device=cuda)
    model_output = torch.randn(2, 4, 64, 64, device=cuda)
    table = torch.randn(20, 10, device=cuda)
    step = torch.tensor(3, device=cuda)
    return [
        ("group_norm NCHW, split", lambda: ops.group_norm(x, 32, weight, weight, 1e-5, True)),
        (
            "group_norm NHWC + offset",
            lambda: ops.group_norm(nhwc, 32, weight, weight, 1e-5, True, offset),
        ),
        (
            "group_norm aligned, misaligned",
            lambda: torch.cat(
                [
                    ops.group_norm(aligned, 32, wide, wide).flatten(),
                    ops.group_norm(misaligned, 32, wide, wide).flatten(),
                ]
            ),
        ),
        ("layer_norm", lambda: ops.layer_norm(rows, weight, weight)),
        ("add_layer_norm", lambda: torch.cat(ops.add_layer_norm(rows, other, weight, weight))),
        (
            "attention views, batch 3 then 2",
            lambda: torch.cat(
                [
                    ops.attention(q, k, v).flatten(),
                    ops.attention(q[:2], k[:2], v[:2]).flatten(),
                ]
            ),
        ),
        ("attention cross", lambda: ops.attention(q, context[0], context[1])),
        ("geglu", lambda: ops.geglu(gates)),
        ("linear_geglu", lambda: ops.linear_geglu(rows, projection, bias)),
        ("sampler_step", lambda: torch.cat(ops.sampler_step(latents, model_output, table, step))),
    ]


@pytest.mark.gpu
def test_cached_launches_compute_what_triton_launches_compute_on_the_gpu():
    """On a GPU: every op's output from the launch cache (the second call with a signature) is
    bitwise the output of Triton's own launch path (the cache off)."""
    from fastdiff.ops import use_backend

    launch_cache.clear()
    with use_backend("triton"):
        for label, call in gpu_op_calls():
            with launch_cache.enabled(False):
                want = call()
            before = launch_cache.remembered()
            call()  # through Triton, remembered
            assert launch_cache.remembered() > before, label
            got = call()  # from the cache
            torch.cuda.synchronize()
            # bitwise equal, a NaN where the other has one (random sampler coefficients)
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=label)
