"""The CUDA extension's loader, support rules and compile check: everything that runs without a GPU.

The kernels themselves are tested on GPU in test_cuda_kernels.py.
"""

from __future__ import annotations

import importlib.machinery
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension as torch_cpp_extension

import fastdiff.ops.cuda_extension as cuda_extension
from fastdiff.ops import group_norm, group_norm_reference, sampler_step, use_backend
from fastdiff.ops.backend import select_backend
from fastdiff.ops.cuda_support import plan_group_norm, sampler_step_supported
from fastdiff.ops.group_norm import group_norm_eager
from fastdiff.ops.sampler_step import sampler_step_eager
from tests.ops.helpers import assert_within_tolerance

CHECK_SCRIPT = Path(__file__).resolve().parents[2] / "csrc" / "check_compile.sh"
NVCC = shutil.which("nvcc")


@pytest.fixture
def fresh_loader(monkeypatch):
    """A loader that has not tried yet, cannot find a prebuilt fastdiff._C, and sees no op
    registered by an earlier load, with the CUDA prerequisites reported as present."""
    monkeypatch.setattr(cuda_extension, "_state", {})
    monkeypatch.setitem(sys.modules, "fastdiff._C", None)  # import raises ImportError
    monkeypatch.setattr(cuda_extension, "_ops_registered", lambda: False)
    monkeypatch.setattr(cuda_extension, "_missing_prerequisite", lambda: None)
    monkeypatch.delenv("FASTDIFF_BACKEND", raising=False)
    return cuda_extension


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_unavailable_without_a_gpu_says_why():
    assert cuda_extension.available() is False
    reason = cuda_extension.unavailable_reason()
    assert "CPU-only build" in reason or "no CUDA device" in reason, reason


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setattr(cuda_extension, "_state", {})
    monkeypatch.setenv("FASTDIFF_CUDA_EXTENSION", "0")
    assert cuda_extension.available() is False
    assert "FASTDIFF_CUDA_EXTENSION=0" in cuda_extension.unavailable_reason()


def test_missing_nvcc_is_reported(fresh_loader, monkeypatch):
    monkeypatch.setattr(torch_cpp_extension, "CUDA_HOME", None)
    assert fresh_loader.available() is False
    assert fresh_loader.unavailable_reason().startswith("no nvcc")


def test_missing_ninja_is_reported(fresh_loader, monkeypatch, tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").touch()
    monkeypatch.setattr(torch_cpp_extension, "CUDA_HOME", str(tmp_path))
    monkeypatch.setattr(torch_cpp_extension, "is_ninja_available", lambda: False)
    assert fresh_loader.available() is False
    assert fresh_loader.unavailable_reason().startswith("no ninja")


def test_build_failure_reports_the_first_lines_of_the_error(fresh_loader, monkeypatch, tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").touch()
    monkeypatch.setattr(torch_cpp_extension, "CUDA_HOME", str(tmp_path))
    monkeypatch.setattr(torch_cpp_extension, "is_ninja_available", lambda: True)
    lines = [f"group_norm.cu({n}): error: line {n}" for n in range(40)]

    def failing_build():
        raise RuntimeError("Error building extension 'fastdiff_cuda_ext'\n" + "\n".join(lines))

    monkeypatch.setattr(fresh_loader, "_jit_build", failing_build)
    with pytest.warns(RuntimeWarning, match="unavailable"):
        monkeypatch.setenv("FASTDIFF_BACKEND", "cuda")
        assert fresh_loader.available() is False
    reason = fresh_loader.unavailable_reason()
    assert reason.startswith("build failed: RuntimeError: Error building extension")
    assert "line 0" in reason and "line 10" in reason
    assert "line 11" not in reason  # only the first ERROR_LINES lines are kept


def test_wrappers_raise_clearly_when_unavailable(monkeypatch):
    monkeypatch.setattr(cuda_extension, "_state", {"reason": "no CUDA device: test"})
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(RuntimeError, match="CUDA extension unavailable: no CUDA device: test"):
        cuda_extension.group_norm(x, 2)
    with pytest.raises(RuntimeError, match="CUDA extension unavailable"):
        cuda_extension.sampler_step(x, x, torch.zeros(10), None, None, None, 1.0, None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback without a GPU")
def test_backend_cuda_falls_back_without_the_extension():
    x = torch.randn(2, 8, 5, 5)
    weight, bias = torch.randn(8), torch.randn(8)
    with use_backend("cuda"):
        assert select_backend(x) != "cuda"
        out = group_norm(x, 4, weight, bias, 1e-5, True)
        table = torch.rand(3, 10, dtype=torch.float64)
        model_output = torch.randn(4, 8, 5, 5)
        step = torch.tensor(1)
        x_next, x0 = sampler_step(x, model_output, table, step, None, 5.0, None)
    reference = group_norm_reference(x, 4, weight, bias, 1e-5, True)
    assert_within_tolerance(out, reference, group_norm_eager(x, 4, weight, bias, 1e-5, True))
    want_next, want_x0 = sampler_step_eager(x, model_output, table, step, None, 5.0, None)
    torch.testing.assert_close(x_next, want_next, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x0, want_x0, rtol=1e-5, atol=1e-5)


def test_supports_is_false_for_cpu_tensors():
    x = torch.randn(2, 8, 4, 4)
    assert not cuda_extension.supports_group_norm(x, 4)
    table, step = torch.zeros(3, 10), torch.tensor(0)
    assert not cuda_extension.supports_sampler_step(x, x, table, step, None, None, 1.0, None)
    assert not sampler_step_supported(x, x, table, step, None, None, None)


# Launch plans worked out by hand from csrc/group_norm.cu (1024 threads, 64 bytes per thread).
@pytest.mark.parametrize(
    ("shape", "element_bytes", "channels_last", "address", "groups", "expected"),
    [
        # C/G = 20 fp16 channels: 8 does not divide 20 -> 4-wide packs, 5 per pixel,
        # 204 pixels per pass of 1020 active threads -> 6 loads of 8 bytes (<= 8).
        pytest.param((2, 640, 32, 32), 2, True, 0, 32, (True, 4, 1024, 6), id="sd-640-nhwc"),
        # NCHW: 1024 pixels per channel -> 8-wide packs; 2560 packs over 1024 threads -> 3.
        pytest.param((2, 640, 32, 32), 2, False, 0, 32, (True, 8, 1024, 3), id="sd-640-nchw"),
        pytest.param((2, 1280, 8, 8), 2, True, 0, 32, (True, 8, 320, 1), id="sd-1280-8x8"),
        # An input 2 bytes off alignment can only use the scalar path: 20 per pixel,
        # 51 pixels per pass -> 21 loads of 2 bytes (<= 32).
        pytest.param((2, 640, 32, 32), 2, True, 2, 32, (True, 1, 1024, 21), id="misaligned"),
        # fp32 packs are at most 4 wide; 40960 elements need 10 loads of 16 bytes (> 4).
        pytest.param((2, 1280, 32, 32), 4, False, 0, 32, (False, 4, 1024, 10), id="too-big"),
        pytest.param((1, 15, 5, 7), 4, False, 0, 5, (True, 1, 128, 1), id="odd-channels"),
    ],
)
def test_group_norm_plan(shape, element_bytes, channels_last, address, groups, expected):
    assert tuple(plan_group_norm(shape, element_bytes, channels_last, address, groups)) == expected


@pytest.mark.parametrize(
    ("shape", "groups"),
    [
        pytest.param((2, 4096, 1, 1), 2, id="too-many-channels-per-group"),
        pytest.param((2, 30, 4, 4), 4, id="groups-do-not-divide"),
        pytest.param((2, 8, 4, 4), 0, id="zero-groups"),
        pytest.param((8,), 1, id="1d"),
    ],
)
def test_group_norm_plan_rejects(shape, groups):
    assert not plan_group_norm(shape, 2, False, 0, groups).supported


def test_group_norm_plan_empty_batch_needs_no_launch():
    assert plan_group_norm((0, 32, 4, 4), 2, True, 0, 8).supported


def run_check_script(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(CHECK_SCRIPT), *args], capture_output=True, text=True, env=env, timeout=120
    )


@pytest.mark.skipif(
    shutil.which("nvcc", path="/usr/bin:/bin") is not None, reason="nvcc is in /usr/bin here"
)
def test_check_compile_skips_without_nvcc(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}
    result = run_check_script(str(tmp_path), env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SKIPPED - nvcc not found" in result.stdout


@pytest.mark.skipif(NVCC is None, reason="needs nvcc")
def test_check_compile_fails_on_a_broken_kernel_and_passes_a_good_one(tmp_path):
    env = dict(os.environ)
    good = "__global__ void scale(float* x, float a) { x[threadIdx.x] *= a; }\n"
    (tmp_path / "good.cu").write_text(good)
    result = run_check_script(str(tmp_path), env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok      good.cu" in result.stdout
    broken = "template <typename T> __global__ void k(T* x) { x[0] = undefined_name; }\n"
    (tmp_path / "broken.cu").write_text(broken + "template __global__ void k<float>(float*);\n")
    result = run_check_script(str(tmp_path), env=env)
    assert result.returncode == 1
    assert "FAILED  broken.cu" in result.stdout and "undefined_name" in result.stdout


def test_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path):
    """torch waits on its build lock with no timeout: a lock left by a killed build would hang
    every later load, while a live build's lock must stay."""
    lock = tmp_path / "lock"
    cuda_extension._remove_stale_lock(tmp_path)  # no lock: nothing to do
    lock.touch()
    cuda_extension._remove_stale_lock(tmp_path)
    assert lock.exists()
    old = lock.stat().st_mtime - cuda_extension.STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    cuda_extension._remove_stale_lock(tmp_path)
    assert not lock.exists()


def test_the_auto_backend_never_builds_the_extension(fresh_loader, monkeypatch, tmp_path):
    """available(build=False): only an extension that loads without compiling counts."""
    monkeypatch.setenv("FASTDIFF_CUDA_BUILD_DIR", str(tmp_path))
    monkeypatch.setattr(fresh_loader, "_jit_prerequisite", lambda: None)
    builds = []

    def build():
        builds.append(True)
        fresh_loader._ops_registered = lambda: True  # what loading the library does

    monkeypatch.setattr(fresh_loader, "_jit_build", build)
    assert fresh_loader.available(build=False) is False
    reason = fresh_loader.unavailable_reason(build=False)
    assert reason.startswith("not built") and "FASTDIFF_BACKEND=cuda builds it" in reason
    assert str(tmp_path) in reason and builds == []
    # An explicit request builds it; then the auto backend's answer is True as well.
    assert fresh_loader.available() is True and builds == [True]
    assert fresh_loader.available(build=False) is True
    assert fresh_loader.unavailable_reason(build=False) == ""


def test_a_cached_jit_build_is_loaded_by_the_auto_backend(fresh_loader, monkeypatch, tmp_path):
    monkeypatch.setenv("FASTDIFF_CUDA_BUILD_DIR", str(tmp_path))
    fresh_loader.library_path().touch()
    monkeypatch.setattr(fresh_loader, "_jit_prerequisite", lambda: None)
    loads = []

    def load():  # torch's load() of an up-to-date build only opens the library
        loads.append(True)
        fresh_loader._ops_registered = lambda: True

    monkeypatch.setattr(fresh_loader, "_jit_build", load)
    assert fresh_loader.available(build=False) is True and loads == [True]


def test_the_cached_build_looked_for_is_the_library_torch_loads(monkeypatch, tmp_path):
    """torch's load() of an extension that is not a Python module opens
    ``<build_directory>/<name><LIB_EXT>``: the file whose presence tells the auto backend that a
    JIT build is cached."""
    monkeypatch.setenv("FASTDIFF_CUDA_BUILD_DIR", str(tmp_path))
    expected = tmp_path / f"{cuda_extension.EXTENSION_NAME}{torch_cpp_extension.LIB_EXT}"
    assert cuda_extension.library_path() == expected


def test_a_prebuilt_extension_is_used_by_the_auto_backend(fresh_loader, monkeypatch, tmp_path):
    """``FASTDIFF_BUILD_CUDA=1 pip install`` (fastdiff._C importable, no JIT build cached):
    loading needs no compiler, so the auto backend uses it."""
    monkeypatch.setenv("FASTDIFF_CUDA_BUILD_DIR", str(tmp_path))
    prebuilt = types.ModuleType("fastdiff._C")
    prebuilt.__spec__ = importlib.machinery.ModuleSpec("fastdiff._C", None)
    monkeypatch.setitem(sys.modules, "fastdiff._C", prebuilt)
    monkeypatch.setattr(fresh_loader, "_jit_build", lambda: pytest.fail("built"))
    assert fresh_loader.available(build=False) is True
    assert fresh_loader._state["origin"] == "prebuilt fastdiff._C"


def test_ops_registered_elsewhere_are_used_by_the_auto_backend(fresh_loader, monkeypatch, tmp_path):
    """The ops already registered in the process (loaded by an earlier call or another module)
    with neither a cached build nor fastdiff._C: nothing to compile, so auto uses them."""
    monkeypatch.setenv("FASTDIFF_CUDA_BUILD_DIR", str(tmp_path))
    monkeypatch.setattr(fresh_loader, "_ops_registered", lambda: True)
    monkeypatch.setattr(fresh_loader, "_jit_build", lambda: pytest.fail("built"))
    assert fresh_loader.available(build=False) is True
    assert fresh_loader._state["origin"] == "already registered"


def test_without_a_gpu_the_auto_backend_question_names_the_missing_prerequisite(monkeypatch):
    monkeypatch.setattr(cuda_extension, "_state", {})
    monkeypatch.setenv("FASTDIFF_CUDA_EXTENSION", "0")
    assert cuda_extension.available(build=False) is False
    assert cuda_extension.unavailable_reason(build=False) == "disabled by FASTDIFF_CUDA_EXTENSION=0"


class CudaTensor:
    """Just what select_backend reads of a tensor."""

    is_cuda = True


def test_auto_takes_triton_where_the_table_prefers_an_unbuilt_extension(monkeypatch):
    from fastdiff.ops import autoselect
    from fastdiff.ops import backend as ops_backend

    monkeypatch.setattr(ops_backend, "triton_available", lambda: True)
    monkeypatch.setattr(autoselect, "cached_preference", lambda op, key: "cuda")
    asked = []

    def available(build=True):
        asked.append(build)
        return not build  # a stand-in whose answer differs: the build=False answer must count

    monkeypatch.setattr(cuda_extension, "available", available)
    with use_backend("auto"):
        assert select_backend(CudaTensor(), "group_norm", lambda: "key") == "cuda"
        assert asked == [False]
        monkeypatch.setattr(cuda_extension, "available", lambda build=True: False)
        assert select_backend(CudaTensor(), "group_norm", lambda: "key") == "triton"
