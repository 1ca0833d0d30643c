"""The backend switch: names, the environment variable, and the ``auto`` choice per op and shape."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from fastdiff.ops import autoselect, backend
from fastdiff.ops.backend import select_backend, use_backend

GPU_TENSOR = SimpleNamespace(is_cuda=True)  # select_backend only asks where the tensor lives


def test_unknown_backend_names_the_allowed_values(monkeypatch):
    with pytest.raises(ValueError, match="eager, triton, cuda, auto"):
        with use_backend("fast"):
            pass
    monkeypatch.setenv("FASTDIFF_BACKEND", "tensorrt")
    with pytest.raises(ValueError, match="FASTDIFF_BACKEND.*'tensorrt'"):
        select_backend(torch.zeros(1))


def test_auto_runs_eager_on_cpu_even_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with use_backend("auto"):
        assert select_backend(torch.zeros(1), "group_norm", lambda: "1|fp32|nchw") == "eager"
    with use_backend("triton"):  # the interpreter stays reachable by asking for triton
        expected = "triton" if backend.triton_available() else "eager"
        assert select_backend(torch.zeros(1)) == expected


@pytest.fixture
def gpu_world(monkeypatch):
    """Pretend Triton and a built CUDA extension exist; the table prefers cuda for one key."""
    table = autoselect._validate(
        autoselect.table_from_rows(
            "test gpu",
            [
                ("group_norm", "2x640x32x32|fp16|nhwc", "triton", 0.011),
                ("group_norm", "2x640x32x32|fp16|nhwc", "cuda", 0.007),
                ("group_norm", "2x320x64x64|fp16|nchw", "triton", 0.011),
                ("group_norm", "2x320x64x64|fp16|nchw", "cuda", 0.019),
                ("attention", "2x8x4096x40|fp16|keys4096", "triton", 0.41),
                ("attention", "2x8x4096x40|fp16|keys4096", "eager", 0.16),
                ("attention", "2x20x1024x64|fp16|keys1024", "triton", 0.030),
                ("attention", "2x20x1024x64|fp16|keys1024", "eager", 0.034),
            ],
        ),
        "test",
    )
    monkeypatch.setattr(autoselect, "load_table", lambda: table)
    autoselect.cached_preference.cache_clear()  # answers memoised against another table
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    extension = SimpleNamespace(available=lambda build=True: True)
    monkeypatch.setattr(backend, "cuda_extension_module", lambda: extension)
    yield extension
    autoselect.cached_preference.cache_clear()


def test_auto_follows_the_measured_winner_per_shape(gpu_world):
    with use_backend("auto"):
        assert select_backend(GPU_TENSOR, "group_norm", lambda: "2x640x32x32|fp16|nhwc") == "cuda"
        assert select_backend(GPU_TENSOR, "group_norm", lambda: "2x320x64x64|fp16|nchw") == "triton"
        # not measured at all (other layout): the default kernel backend
        assert select_backend(GPU_TENSOR, "group_norm", lambda: "2x8x4x4|fp32|nhwc") == "triton"
        # attention: our kernel or PyTorch's SDPA, whichever was measured faster at the shape
        assert select_backend(GPU_TENSOR, "attention", lambda: "2x8x4096x40|fp16|keys4096") == (
            "eager"
        )
        assert select_backend(GPU_TENSOR, "attention", lambda: "2x20x1024x64|fp16|keys1024") == (
            "triton"
        )
        # no op name: triton, and no key is computed
        assert select_backend(GPU_TENSOR, None, None) == "triton"


def test_auto_uses_triton_when_the_extension_is_not_available(gpu_world):
    gpu_world.available = lambda build=True: False
    with use_backend("auto"):
        assert select_backend(GPU_TENSOR, "group_norm", lambda: "2x640x32x32|fp16|nhwc") == "triton"


def test_environment_variable_selects_auto(gpu_world, monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", "auto")
    assert select_backend(GPU_TENSOR, "group_norm", lambda: "2x640x32x32|fp16|nhwc") == "cuda"
    monkeypatch.setenv("FASTDIFF_BACKEND", "eager")
    assert select_backend(GPU_TENSOR, "group_norm", lambda: "2x640x32x32|fp16|nhwc") == "eager"


def test_packaged_table_is_valid_and_names_its_device():
    assert autoselect.PACKAGED_TABLE.exists()
    table = autoselect._validate(json.loads(autoselect.PACKAGED_TABLE.read_text()), "packaged")
    assert table and all(timings for timings in table.values())
