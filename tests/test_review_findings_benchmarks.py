"""Bugs in the benchmark scripts found by review; each test failed before its fix."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

COLUMNS = ["timestamp", "device", "benchmark", "workload", "provider", "ms", "dtype", "note"]
RESID = "sd15 64x64 2x320x64x64"
RESID_KEY = ("bias_residual", "2x320x64x64|fp16|nhwc")


def write_csv(path: Path, rows: list[tuple[str, ...]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        writer.writerows(row + ("",) * (len(COLUMNS) - len(row)) for row in rows)
    return path


def entries(table: dict) -> dict:
    return {(entry["op"], entry["key"]): entry["ms"] for entry in table["entries"]}


def test_speedups_compare_with_the_eager_row_of_the_same_dtype():
    """add_speedups keyed the eager times by workload name only; bench_group_norm's and
    bench_attention's full runs time one name ("2x320x64x64 nchw", "sd15 self 64x64") in fp16
    and then bf16, so the fp16 rows' speedup column was computed against bf16's eager time."""
    from common import Row, add_speedups

    rows = [
        Row("group_norm_silu", "2x320x64x64 nchw", "eager", "fp16", ms=0.05),
        Row("group_norm_silu", "2x320x64x64 nchw", "fastdiff", "fp16", ms=0.01),
        Row("group_norm_silu", "2x320x64x64 nchw", "eager", "bf16", ms=0.20),
        Row("group_norm_silu", "2x320x64x64 nchw", "fastdiff", "bf16", ms=0.02),
    ]
    add_speedups(rows)
    assert [row.speedup for row in rows] == pytest.approx([1.0, 5.0, 1.0, 10.0])


def test_a_later_failed_row_drops_the_earlier_timing_of_its_backend(tmp_path):
    """build_table skipped failed rows (no ms) before asking which row was the latest, so when
    the new run's kernel failed at a shape, the committed CSV's older timing of it stayed in the
    table and the auto backend kept routing the op to the kernel that now fails there."""
    from backend_table import build_table

    committed = write_csv(
        tmp_path / "committed.csv",
        [
            ("2026-01-01T00:00:00", "GPU X", "bias_residual", RESID, "fastdiff", "0.003", "fp16"),
            ("2026-01-01T00:00:00", "GPU X", "bias_residual", RESID, "eager", "0.008", "fp16"),
        ],
    )
    run = write_csv(
        tmp_path / "run.csv",
        [
            ("2026-02-01T00:00:00", "GPU X", "bias_residual", RESID, "fastdiff", "", "fp16"),
            ("2026-02-01T00:00:00", "GPU X", "bias_residual", RESID, "eager", "0.007", "fp16"),
        ],
    )
    table = build_table(committed, run)
    assert entries(table)[RESID_KEY] == {"eager": 0.007}
    # and a success after a failure counts again
    later = write_csv(
        tmp_path / "later.csv",
        [("2026-03-01T00:00:00", "GPU X", "bias_residual", RESID, "fastdiff", "0.002", "fp16")],
    )
    assert entries(build_table(committed, run, later))[RESID_KEY] == {
        "eager": 0.007,
        "triton": 0.002,
    }


def test_rows_of_another_device_are_refused(tmp_path, monkeypatch):
    """Several CSVs counted as one, the latest row of a case winning whichever file held it: a
    CPU run's CSV (wall clock at reduced shapes, under the GPU shapes' workload names) or
    another GPU's, written later, silently replaced the GPU's timings in the table (e.g.
    ``backend_table.py results/*.csv``)."""
    import backend_table

    gpu = write_csv(
        tmp_path / "gpu-x.csv",
        [
            ("2026-01-01T00:00:00", "GPU X", "bias_residual", RESID, "fastdiff", "0.003", "fp16"),
            ("2026-01-01T00:00:00", "GPU X", "bias_residual", RESID, "eager", "0.008", "fp16"),
        ],
    )
    cpu = write_csv(
        tmp_path / "cpu.csv",
        [
            ("2026-02-01T00:00:00", "cpu", "bias_residual", RESID, "fastdiff", "0.9", "fp16"),
            ("2026-02-01T00:00:00", "cpu", "bias_residual", RESID, "eager", "0.1", "fp16"),
        ],
    )
    assert entries(backend_table.build_table(gpu))[RESID_KEY] == {"triton": 0.003, "eager": 0.008}
    with pytest.raises(ValueError, match="more than one device: 'GPU X'.*'cpu'"):
        backend_table.build_table(gpu, cpu)
    out = tmp_path / "table.json"
    monkeypatch.setattr(sys, "argv", ["backend_table.py", str(gpu), str(cpu), "--out", str(out)])
    with pytest.raises(SystemExit, match="more than one device"):
        backend_table.main()
    assert not out.exists()


FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for python3 in gpu_check_models.sh: records each call with the backend it was given.
echo "FASTDIFF_BACKEND=${FASTDIFF_BACKEND-unset} $*" >>"$FAKE_PYTHON_LOG"
case "$*" in
    *"cuda_extension as ext"*) echo "CUDA extension available: False (no nvcc)" ;;
esac
exit 0
"""


def test_models_step_keeps_the_auto_backend_when_the_extension_is_unavailable(tmp_path):
    """gpu_check_models.sh exported FASTDIFF_BACKEND=triton when the CUDA extension did not
    load (to stop each process retrying the build, which the auto backend no longer does:
    available(build=False)); that sent every op to its Triton kernel, so the fastdiff model
    rows no longer measured the backend table gpu_check.sh had just built for them."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    calls = tmp_path / "calls.log"
    env = {k: v for k, v in os.environ.items() if k != "FASTDIFF_BACKEND"}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
        FAKE_PYTHON_LOG=str(calls),
        STEPS="cuda_ext unet_sd15_b2",
        BUDGET="60",
    )
    result = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_check_models.sh"), str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    unet = [line for line in calls.read_text().splitlines() if "bench_unet.py" in line]
    assert len(unet) == 1 and unet[0].startswith("FASTDIFF_BACKEND=unset "), unet


FAKE_RUN_PYTHON = """#!/usr/bin/env bash
# Stands in for the interpreter of gpu_check.sh and gpu_check_models.sh: backend_table.py runs
# for real; each kernel benchmark appends one timed row to <--out>/gpu-x.csv; the rest is noted.
echo "$*" >>"$FAKE_PYTHON_LOG"
case "$1" in
    benchmarks/backend_table.py) exec "$REAL_PYTHON" "$@" ;;
    benchmarks/bench_bias_residual.py)
        while [ "$#" -gt 0 ] && [ "$1" != --out ]; do shift; done
        csv="$2/gpu-x.csv"
        [ -s "$csv" ] || echo "timestamp,device,benchmark,workload,provider,ms,dtype,note" >"$csv"
        for provider in fastdiff eager; do
            echo "2026-02-01T00:00:00,GPU X,bias_residual,$RESID,$provider,0.004,fp16," >>"$csv"
        done ;;
esac
exit 0
"""


def test_gpu_check_builds_the_table_from_this_runs_csv_only(tmp_path):
    """gpu_check.sh built a table from every CSV in OUTDIR, each overwriting the last one's; in
    its default OUTDIR, benchmarks/results, the warm-up runs' CSVs (model rows only) made that
    part fail (no table rows) and the whole check exit 1, and an older CSV there could replace
    the run's table."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python3"
    fake.write_text(FAKE_RUN_PYTHON)
    fake.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    write_csv(  # an earlier warm-up run's rows in the same folder
        out / "warmup.csv",
        [("2026-01-01T00:00:00", "GPU X", "unet", "sd15_b2", "fastdiff", "30.0", "fp16")],
    )
    tests = tmp_path / "no-tests"
    tests.mkdir()
    calls = tmp_path / "calls.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTDIFF_")}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
        PYTHON=str(fake),
        REAL_PYTHON=sys.executable,
        FAKE_PYTHON_LOG=str(calls),
        RESID=RESID,
        TESTS=str(tests),
        TOTAL="400",
    )
    result = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_check.sh"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    log = (out / "gpu_check.log").read_text()
    assert result.returncode == 0, log
    started = [line for line in log.splitlines() if line.startswith("=== [")]
    # one table and one plot, of the run's CSV
    for part in ("backend_table", "plot"):
        lines = [line for line in started if line.startswith(f"=== [{part}] ") and "/" in line]
        assert len(lines) == 1 and str(out / "gpu-x.csv") in lines[0], lines
    table = json.loads((out / "backend_table.json").read_text())
    assert entries(table) == {RESID_KEY: {"triton": 0.004, "eager": 0.004}}
