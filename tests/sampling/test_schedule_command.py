"""``fastdiff schedule``: the table, the PNG and the clean errors."""

from __future__ import annotations

import sys

import pytest

from fastdiff.cli import main


def test_prints_alpha_bar_and_writes_png(tmp_path, capsys):
    target = tmp_path / "snr.png"
    assert main(["schedule", "--plot", str(target), "--steps", "10"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()[1:] if line.startswith("scaled_linear ")]
    # scaled_linear, leading spacing, 10 steps: first t = 900, alphā(900) = 1.415e-02.
    leading = next(row for row in rows if row[1] == "leading")
    assert leading[2] == "900" and leading[3] == "1.415e-02"
    assert "cosine zero-SNR" in out and "wrote" in out
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [path for path in tmp_path.iterdir() if path.name != "snr.png"]  # no temp left


def test_missing_matplotlib_is_a_clean_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert main(["schedule", "--plot", str(tmp_path / "x.png")]) == 2
    assert "matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_bad_arguments(tmp_path, capsys):
    assert main(["schedule", "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
    assert main(["schedule", "--plot", str(tmp_path / "missing" / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "folder.png").mkdir()  # used to end in an IsADirectoryError traceback
    assert main(["schedule", "--steps", "2", "--plot", str(tmp_path / "folder.png")]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["folder.png"]  # no temp left
    with pytest.raises(SystemExit) as exit_info:
        main(["schedule", "--help"])
    assert exit_info.value.code == 0
