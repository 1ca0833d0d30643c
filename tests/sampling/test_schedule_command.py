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
    for name in ("snr.jpg", "snr"):  # the plot is PNG data: another name would mislabel it
        assert main(["schedule", "--steps", "2", "--plot", str(tmp_path / name)]) == 2
        assert "--plot must name a .png file" in capsys.readouterr().err
    kept = tmp_path / "kept.png"
    kept.write_bytes(b"earlier work")
    assert main(["schedule", "--steps", "2", "--plot", str(kept)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert kept.read_bytes() == b"earlier work"
    assert main(["schedule", "--steps", "2", "--plot", str(kept), "--overwrite"]) == 0
    assert kept.read_bytes().startswith(b"\x89PNG")
    with pytest.raises(SystemExit) as exit_info:
        main(["schedule", "--help"])
    assert exit_info.value.code == 0


def test_a_closed_pipe_is_not_an_error_but_other_os_errors_are(monkeypatch, capsys):
    """`fastdiff schedule | head` ends quietly with 0; an OSError (BrokenPipeError's base class)
    from anywhere else is a clean error with exit code 2."""
    monkeypatch.setattr(sys, "stdout", sys.stdout)  # main swaps in os.devnull; restored after

    def closed_pipe(*args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("fastdiff.commands.schedule.format_table", closed_pipe)
    assert main(["schedule"]) == 0
    monkeypatch.undo()

    def no_space(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("fastdiff.commands.schedule.format_table", no_space)
    assert main(["schedule"]) == 2
    assert "fastdiff schedule: error: [Errno 28] No space left on device" in capsys.readouterr().err
