"""Backend choice per op and shape from measured timings (fastdiff.ops.autoselect)."""

from __future__ import annotations

import json

import pytest
import torch

from fastdiff.ops import autoselect

ROWS = [
    ("group_norm", "2x640x32x32|fp16|nhwc", "triton", 0.020),
    ("group_norm", "2x640x32x32|fp16|nhwc", "cuda", 0.010),
    ("group_norm", "2x640x32x32|fp16|nhwc", "eager", 0.060),
    ("group_norm", "2x320x64x64|fp16|nhwc", "triton", 0.030),
    ("group_norm", "2x320x64x64|fp16|nhwc", "cuda", None),  # unsupported: not measured
    ("sampler_step", "2x4x64x64|fp16|nchw|cfg", "triton", 0.006),
    ("sampler_step", "2x4x64x64|fp16|nchw|cfg", "cuda", 0.007),
]


@pytest.fixture
def table():
    return autoselect._validate(autoselect.table_from_rows("test gpu", ROWS), "test")


def test_keys_name_shape_dtype_layout_and_guidance():
    x = torch.empty(2, 640, 32, 32, dtype=torch.float16).to(memory_format=torch.channels_last)
    assert autoselect.group_norm_key(x) == "2x640x32x32|fp16|nhwc"
    latents = torch.empty(2, 4, 64, 64, dtype=torch.float16)
    assert autoselect.sampler_step_key(latents, torch.empty(4, 4, 64, 64)) == (
        "2x4x64x64|fp16|nchw|cfg"
    )
    assert autoselect.sampler_step_key(latents, latents).endswith("|plain")


def test_exact_key_picks_the_fastest_candidate(table):
    assert (
        autoselect.preferred_backend("group_norm", "2x640x32x32|fp16|nhwc", table=table) == "cuda"
    )
    assert (
        autoselect.preferred_backend("sampler_step", "2x4x64x64|fp16|nchw|cfg", table=table)
        == "triton"
    )
    # Only the candidates compete: without cuda, triton beats eager.
    only = autoselect.preferred_backend(
        "group_norm", "2x640x32x32|fp16|nhwc", candidates=("eager", "triton"), table=table
    )
    assert only == "triton"


def test_unmeasured_backend_is_never_chosen(table):
    assert autoselect.preferred_backend("group_norm", "2x320x64x64|fp16|nhwc", table=table) == (
        "triton"
    )


def test_nearest_measured_shape_of_the_same_dtype_and_layout(table):
    # 2x640x16x16 is 4x smaller than the measured 2x640x32x32 and twice 2x1280x8x8 (unmeasured).
    assert autoselect.preferred_backend("group_norm", "2x640x16x16|fp16|nhwc", table=table) == (
        "cuda"
    )
    # Another layout, a far size, or another op: the documented default.
    assert autoselect.preferred_backend("group_norm", "2x640x32x32|fp16|nchw", table=table) == (
        autoselect.DEFAULT_BACKEND
    )
    assert autoselect.preferred_backend("group_norm", "2x640x4x4|fp16|nhwc", table=table) == (
        autoselect.DEFAULT_BACKEND
    )
    assert autoselect.preferred_backend("attention", "2x640x32x32|fp16|nhwc", table=table) == (
        autoselect.DEFAULT_BACKEND
    )


def test_unmeasured_attention_shapes_follow_the_measured_majority():
    rows = [
        ("attention", "2x8x4096x40|fp16|keys4096", "eager", 0.16),
        ("attention", "2x8x4096x40|fp16|keys4096", "triton", 0.41),
        ("attention", "2x8x4096x40|fp16|keys77", "eager", 0.015),
        ("attention", "2x8x4096x40|fp16|keys77", "triton", 0.019),
        ("attention", "2x20x1024x64|fp16|keys1024", "eager", 0.0342),
        ("attention", "2x20x1024x64|fp16|keys1024", "triton", 0.0340),
        ("attention", "2x8x64x64|bf16|keys64", "triton", 0.01),
    ]
    table = autoselect._validate(autoselect.table_from_rows("gpu", rows), "test")
    # D160 at 16x16: no measured key of its own or within 4x; SDPA won 2 of 3 fp16 keys
    assert autoselect.preferred_backend("attention", "2x8x256x160|fp16|keys256", table=table) == (
        "eager"
    )
    # another dtype has its own majority; a dtype with none measured keeps the default
    assert autoselect.preferred_backend("attention", "2x8x256x160|bf16|keys256", table=table) == (
        "triton"
    )
    assert autoselect.preferred_backend("attention", "2x8x256x160|fp32|keys256", table=table) == (
        autoselect.DEFAULT_BACKEND
    )
    # a tie is no majority; group_norm is not a majority op
    tied = autoselect._validate(autoselect.table_from_rows("gpu", rows[2:6]), "test")
    assert autoselect.preferred_backend("attention", "2x8x256x160|fp16|keys256", table=tied) == (
        autoselect.DEFAULT_BACKEND
    )


def test_attention_on_views_has_its_own_key_and_falls_back_to_the_contiguous_one():
    q = torch.empty(2, 8, 64, 40, dtype=torch.float16)
    fused = torch.empty(2, 64, 3, 8, 40, dtype=torch.float16)  # the fused QKV projection
    views = fused[:, :, 0].transpose(1, 2)
    assert autoselect.attention_key(q, q) == "2x8x64x40|fp16|keys64"
    assert autoselect.attention_key(views, views) == "2x8x64x40|fp16|keys64|strided"
    rows = [
        ("attention", "2x8x4096x40|fp16|keys4096", "eager", 0.162),
        ("attention", "2x8x4096x40|fp16|keys4096", "triton", 0.161),
        ("attention", "2x8x4096x40|fp16|keys4096|strided", "eager", 0.156),
        ("attention", "2x8x4096x40|fp16|keys4096|strided", "triton", 0.176),
        ("attention", "2x8x4096x40|fp16|keys77", "eager", 0.015),
        ("attention", "2x8x4096x40|fp16|keys77", "triton", 0.013),
        ("attention", "2x20x1024x64|fp16|keys1024", "eager", 0.035),
        ("attention", "2x20x1024x64|fp16|keys1024", "triton", 0.040),
        ("attention", "2x10x4096x64|fp16|keys4096", "eager", 0.182),
        ("attention", "2x10x4096x64|fp16|keys4096", "triton", 0.204),
    ]
    table = autoselect._validate(autoselect.table_from_rows("gpu", rows), "test")
    choose = lambda key: autoselect.preferred_backend("attention", key, table=table)  # noqa: E731
    assert choose("2x8x4096x40|fp16|keys4096") == "triton"
    assert choose("2x8x4096x40|fp16|keys4096|strided") == "eager"
    # D = 80 at 64x64 (unmeasured): the strided measurement within 4x of its size
    assert choose("2x8x4096x80|fp16|keys4096|strided") == "eager"
    # no strided measurement near: the contiguous key's answer, not the majority (eager, 3 of 5)
    assert choose("2x8x4096x40|fp16|keys77|strided") == "triton"
    assert choose("2x8x1024x80|fp16|keys1024|strided") == "eager"  # nearest contiguous key


def test_table_file_from_environment(tmp_path, monkeypatch):
    path = tmp_path / "table.json"
    path.write_text(json.dumps(autoselect.table_from_rows("gpu", ROWS)))
    monkeypatch.setenv("FASTDIFF_BACKEND_TABLE", str(path))
    autoselect.reload()
    try:
        assert autoselect.preferred_backend("group_norm", "2x640x32x32|fp16|nhwc") == "cuda"
        path.write_text(json.dumps({"entries": [{"op": "group_norm", "key": "1x1x1x1|fp16|nchw"}]}))
        autoselect.reload()
        with pytest.raises(ValueError, match="entry 0 needs 'op', 'key' and 'ms'"):
            autoselect.load_table()
        monkeypatch.setenv("FASTDIFF_BACKEND_TABLE", str(tmp_path / "missing.json"))
        autoselect.reload()
        with pytest.raises(FileNotFoundError, match="FASTDIFF_BACKEND_TABLE"):
            autoselect.load_table()
    finally:
        monkeypatch.delenv("FASTDIFF_BACKEND_TABLE")
        autoselect.reload()
