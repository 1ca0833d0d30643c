"""benchmarks/parts.sh: the bounded-part runner the GPU check scripts share."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_parts(script: str, tmp_path: Path, total: str | None) -> tuple[str, str]:
    """(what the script printed, the log) for ``script`` run after sourcing parts.sh."""
    log = tmp_path / "parts.log"
    prelude = f'LOG="{log}"; FAILED=""; source benchmarks/parts.sh; '
    if total is not None:
        prelude = f"TOTAL={total}; " + prelude
    result = subprocess.run(
        ["bash", "-c", prelude + script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout, log.read_text()


def test_parts_are_logged_and_a_failure_is_recorded_and_the_next_part_runs(tmp_path):
    out, log = run_parts(
        'part good 10 echo hello; part bad 10 false; part next 10 echo after; echo "F=$FAILED"',
        tmp_path,
        total=None,
    )
    assert "hello" in log and "=== [good] ok in" in log
    assert "=== [bad] FAILED (exit 1)" in log and "=== [next] ok in" in log
    assert out.rstrip().endswith("F= bad")


def test_a_part_past_its_limit_is_stopped_and_recorded(tmp_path):
    out, log = run_parts('part slow 1 sleep 30; echo "F=$FAILED"', tmp_path, total=None)
    assert "=== [slow] FAILED (exit 124)" in log and out.rstrip().endswith("F= slow")


def test_with_a_budget_limits_are_cut_and_parts_skipped_near_its_end(tmp_path):
    # 25 s left: a 500 s part may run 15 s; 15 s left: the part is skipped, not started.
    out, log = run_parts(
        'SECONDS=75; part cut 500 bash -c "echo limit-ok"; '
        'SECONDS=85; part late 10 echo never; echo "F=$FAILED left=$(left)"',
        tmp_path,
        total="100",
    )
    assert "limit-ok" in log and "never" not in log
    assert "=== [late] SKIPPED: the 100 s budget is spent" in log
    assert "F= late(skipped)" in out
