"""benchmarks/gpu_stack_check.sh without a GPU, network or a usable interpreter."""

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_stack_check.sh"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_no_environment_stops_the_check(tmp_path):
    """When the venv step fails, nothing else runs (each later step would fail for that reason
    alone, and the csrc step would compile against the wrong torch)."""
    result = subprocess.run(
        ["bash", str(SCRIPT), "relative out"],
        cwd=tmp_path,
        env={
            "PATH": "/usr/bin:/bin",
            "HOME": str(tmp_path),
            "PYTHON": "false",
            "VENV": str(tmp_path / "no venv"),
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "no environment, nothing else ran" in result.stdout
    assert "[tests]" not in result.stdout
    # A relative OUT_DIR is taken from where the script is run, not from the repository root.
    assert (tmp_path / "relative out" / "venv.log").is_file()
    assert not (SCRIPT.parents[1] / "relative out").exists()
