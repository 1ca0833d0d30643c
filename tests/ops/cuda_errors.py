"""Runs calls that must raise in a child process, so that a crash in the native error path (it
segfaulted once on the GPU machine) fails one test instead of killing the whole pytest run."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PRELUDE = """
import json
import torch
import fastdiff.ops.cuda_extension as cuda_extension

assert cuda_extension.available(), cuda_extension.unavailable_reason()


def check(name, call):
    try:
        call()
    except Exception as error:  # the type and text are what the parent checks
        outcome = [type(error).__name__, str(error)]
    else:
        outcome = ["no error", ""]
    print("CASE " + json.dumps([name, *outcome]), flush=True)
"""


def run_error_cases(body: str) -> dict[str, tuple[str, str]]:
    """Run ``body`` (calls to ``check(name, callable)``) in a fresh interpreter; returns
    {name: (exception type name, message)}."""
    script = PRELUDE + textwrap.dedent(body)
    result = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", script],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    cases = {}
    for line in result.stdout.splitlines():
        if line.startswith("CASE "):
            name, kind, message = json.loads(line[len("CASE ") :])
            cases[name] = (kind, message)
    assert result.returncode == 0, (
        f"child exited with {result.returncode} after cases {list(cases)}\n"
        f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    )
    return cases


def assert_errors(cases: dict[str, tuple[str, str]], expected: dict[str, tuple[str, str]]) -> None:
    """Each expected case raised that exception type with the given text in its message."""
    assert set(cases) == set(expected), f"cases run: {sorted(cases)}"
    for name, (kind, text) in expected.items():
        got_kind, got_message = cases[name]
        assert got_kind == kind and text in got_message, f"{name}: {got_kind}: {got_message}"
