"""benchmarks/backend_table.py: the auto backend's table built from a results CSV."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdiff.ops import autoselect

ROOT = Path(__file__).resolve().parents[1]
VIEWS = "sd15 self 64x64 (fused-qkv views)"
LINEAR = "sd15 64x64 8192x320x2560"
CONV = "sd15 8x8 2x1280x8x8 out1280"
CONV_UP = "sd15 8x8 up 2x2560x8x8 out1280"
CAT = "sd15 64x64 2x960x64x64 a640"
RESID = "sd15 64x64 2x320x64x64"
UP = "vae decode 128x128 1x512x128x128"
COLUMNS = ["timestamp", "device", "benchmark", "workload", "provider", "ms", "dtype", "note"]
ROWS = [
    (
        "2026-01-01T00:00:00",
        "GPU X",
        "group_norm_silu",
        "2x640x32x32 nhwc",
        "eager",
        "0.03",
        "fp16",
    ),
    (
        "2026-01-01T00:00:00",
        "GPU X",
        "group_norm_silu",
        "2x640x32x32 nhwc",
        "fastdiff",
        "0.02",
        "fp16",
    ),
    ("2026-01-01T00:00:00", "GPU X", "group_norm_silu", "2x640x32x32 nhwc", "cuda", "0.01", "fp16"),
    # measured again later: the later row wins
    ("2026-01-02T00:00:00", "GPU X", "group_norm_silu", "2x640x32x32 nhwc", "cuda", "0.05", "fp16"),
    ("2026-01-01T00:00:00", "GPU X", "attention", "sd15 self 64x64", "eager", "0.16", "fp16"),
    ("2026-01-01T00:00:00", "GPU X", "attention", "sd15 self 64x64", "fastdiff", "0.41", "fp16"),
    ("2026-01-01T00:00:00", "GPU X", "attention", "sd15 self 64x64", "sdpa-flash", "0.27", "fp16"),
    # q, k, v as views of one fused QKV projection (what the optimized runtime passes)
    ("2026-01-01T00:00:00", "GPU X", "attention", VIEWS, "eager", "0.15", "fp16"),
    ("2026-01-01T00:00:00", "GPU X", "attention", VIEWS, "fastdiff", "0.18", "fp16"),
    # linear_geglu: fastdiff is the fused kernel, fastdiff-two-steps the op's eager backend;
    # the plain-PyTorch eager row is no backend of the op and stays out of the table
    ("2026-01-01T00:00:00", "GPU X", "linear_geglu", LINEAR, "fastdiff", "0.025", "fp16"),
    ("2026-01-01T00:00:00", "GPU X", "linear_geglu", LINEAR, "fastdiff-two-steps", "0.05", "fp16"),
    ("2026-01-01T00:00:00", "GPU X", "linear_geglu", LINEAR, "eager", "0.01", "fp16"),
    ("2026-01-01T00:00:00", "GPU X", "linear_geglu", LINEAR, "fastdiff-64x64", "0.02", "fp16"),
    # conv3x3: rows timed with cuDNN's algorithm search on (bench_conv3x3's note) only
    (
        "2026-01-01T00:00:00",
        "GPU X",
        "conv3x3",
        CONV,
        "fastdiff",
        "0.012",
        "fp16",
        "cudnn.benchmark",
    ),
    (
        "2026-01-01T00:00:00",
        "GPU X",
        "conv3x3",
        CONV,
        "eager",
        "0.023",
        "fp16",
        "cudnn.benchmark; launch_ms=0.05 graph of 4 input sets",
    ),
    ("2026-01-01T00:00:00", "GPU X", "conv3x3", CONV_UP, "fastdiff", "0.030", "fp16", "launch"),
    ("2026-01-01T00:00:00", "GPU X", "conv3x3", CONV_UP, "eager", "0.034", "fp16", ""),
    # cat_channels: keyed by the output's shape (bench_cat_channels' workload names)
    ("2026-01-01T00:00:00", "GPU X", "cat_channels", CAT, "fastdiff", "0.004", "fp16"),
    ("2026-01-01T00:00:00", "GPU X", "cat_channels", CAT, "eager", "0.009", "fp16"),
    # bias_residual: keyed by the map's shape, channels-last
    ("2026-01-01T00:00:00", "GPU X", "bias_residual", RESID, "fastdiff", "0.003", "fp16"),
    ("2026-01-01T00:00:00", "GPU X", "bias_residual", RESID, "eager", "0.008", "fp16"),
    # upsample: keyed by the small map's shape, channels-last; eager = the two steps,
    # fastdiff = the transposed fold, fastdiff-phases = the phases fold (torch.compile: no way
    # Upsample2D runs)
    ("2026-01-01T00:00:00", "GPU X", "upsample", UP, "eager", "0.30", "fp16", "cudnn.benchmark"),
    ("2026-01-01T00:00:00", "GPU X", "upsample", UP, "fastdiff", "0.20", "fp16", "cudnn.benchmark"),
    ("2026-01-01T00:00:00", "GPU X", "upsample", UP, "fastdiff-phases", "0.10", "fp16", ""),
    ("2026-01-01T00:00:00", "GPU X", "upsample", UP, "torch.compile", "0.05", "fp16", ""),
    (
        "2026-01-01T00:00:00",
        "GPU X",
        "sampler_step",
        "sd15 2x4x64x64 ddim cfg",
        "fastdiff",
        "",
        "fp16",
    ),
]


@pytest.fixture
def results_csv(tmp_path):
    path = tmp_path / "gpu-x.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        writer.writerows(row + ("",) * (len(COLUMNS) - len(row)) for row in ROWS)
    return path


def test_table_from_csv_keys_backends_and_latest_rows(results_csv, tmp_path):
    out = tmp_path / "table.json"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "backend_table.py"),
            str(results_csv),
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    table = json.loads(out.read_text())
    assert table["device"] == "GPU X"
    entries = {(e["op"], e["key"]): e["ms"] for e in table["entries"]}
    assert entries == {
        ("group_norm", "2x640x32x32|fp16|nhwc"): {"eager": 0.03, "triton": 0.02, "cuda": 0.05},
        ("attention", "2x8x4096x40|fp16|keys4096"): {"eager": 0.16, "triton": 0.41},
        ("attention", "2x8x4096x40|fp16|keys4096|strided"): {"eager": 0.15, "triton": 0.18},
        ("linear_geglu", "8192x320x2560|fp16"): {"triton": 0.025, "eager": 0.05},
        ("conv3x3", "2x1280x8x8|fp16|nhwc|out1280"): {"triton": 0.012, "eager": 0.023},
        ("cat_channels", "2x960x64x64|fp16|nhwc"): {"triton": 0.004, "eager": 0.009},
        ("bias_residual", "2x320x64x64|fp16|nhwc"): {"triton": 0.003, "eager": 0.008},
        ("upsample", "1x512x128x128|fp16|nhwc"): {"eager": 0.3, "transposed": 0.2, "phases": 0.1},
    }
    timings = autoselect._validate(table, "test")
    assert autoselect.preferred_backend("group_norm", "2x640x32x32|fp16|nhwc", table=timings) == (
        "triton"
    )
    assert autoselect.preferred_backend(
        "attention", "2x8x4096x40|fp16|keys4096", table=timings
    ) == ("eager")
    assert (
        autoselect.preferred_backend("linear_geglu", "8192x320x2560|fp16", table=timings)
        == "triton"
    )
    # the key the table writes is the one the op looks up for the same input
    x = torch.empty(2, 1280, 8, 8, dtype=torch.float16).contiguous(
        memory_format=torch.channels_last
    )
    key = autoselect.conv3x3_key(x, torch.empty(1280, 1280, 3, 3))
    assert autoselect.preferred_backend("conv3x3", key, table=timings) == "triton"
    a, b = (
        torch.empty(2, channels, 64, 64, dtype=torch.float16).contiguous(
            memory_format=torch.channels_last
        )
        for channels in (640, 320)
    )
    key = autoselect.cat_channels_key(a, b)
    assert autoselect.preferred_backend("cat_channels", key, table=timings) == "triton"
    key = autoselect.group_norm_key(b[:, :320].contiguous(memory_format=torch.channels_last))
    assert autoselect.preferred_backend("bias_residual", key, table=timings) == "triton"
    x = torch.empty(1, 512, 128, 128, dtype=torch.float16)
    key = autoselect.upsample_key(x.contiguous(memory_format=torch.channels_last))
    assert autoselect.preferred_backend("upsample", key, table=timings) == "phases"
    assert autoselect.preferred_backend("upsample", autoselect.upsample_key(x), table={}) == (
        "eager"
    )


def test_rows_of_several_csvs_count_as_one_the_latest_winning(results_csv, tmp_path):
    """gpu_check.sh's table for its model step: the committed CSV and the new run's. A case
    measured again in the run takes the run's timings; the others keep the committed ones."""
    run_csv = tmp_path / "run" / "gpu-x.csv"
    run_csv.parent.mkdir()
    with run_csv.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for provider, ms in (("fastdiff", "0.004"), ("eager", "0.002")):
            row = ("2026-02-01T00:00:00", "GPU X", "bias_residual", RESID, provider, ms, "fp16")
            writer.writerow(row + ("",) * (len(COLUMNS) - len(row)))
    out = tmp_path / "table.json"
    script = str(ROOT / "benchmarks" / "backend_table.py")
    # The run's CSV first: the timestamps decide, not the order of the files.
    subprocess.run(
        [sys.executable, script, str(run_csv), str(results_csv), "--out", str(out)],
        check=True,
        capture_output=True,
    )
    table = json.loads(out.read_text())
    entries = {(e["op"], e["key"]): e["ms"] for e in table["entries"]}
    assert entries[("bias_residual", "2x320x64x64|fp16|nhwc")] == {"triton": 0.004, "eager": 0.002}
    assert entries[("cat_channels", "2x960x64x64|fp16|nhwc")] == {"triton": 0.004, "eager": 0.009}
    assert table["source"].endswith(f"from run/gpu-x.csv + {tmp_path.name}/gpu-x.csv")
    timings = autoselect._validate(table, "test")
    assert autoselect.preferred_backend(
        "bias_residual", "2x320x64x64|fp16|nhwc", table=timings
    ) == ("eager")
