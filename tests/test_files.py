"""``fastdiff.files``: the one atomic write, and the output-path checks commands run first."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fastdiff import files


def test_check_output_path_names_each_problem(tmp_path, monkeypatch):
    target = tmp_path / "out.png"
    assert files.check_output_path(target, overwrite=False) == target
    with pytest.raises(FileNotFoundError, match="--plot: output directory does not exist"):
        files.check_output_path(tmp_path / "missing" / "x.png", overwrite=True, option="--plot")
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        files.check_output_path(tmp_path / "folder.png", overwrite=True)
    target.write_bytes(b"earlier work")
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
        files.check_output_path(target, overwrite=False)
    assert files.check_output_path(target, overwrite=True) == target
    dangling = tmp_path / "link.png"
    dangling.symlink_to(tmp_path / "nowhere.png")  # exists() is False, yet the name is taken
    with pytest.raises(FileExistsError, match="link.png already exists"):
        files.check_output_path(dangling, overwrite=False)
    # Root may write anywhere, so the check's answer is faked rather than a folder made read-only.
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(PermissionError, match=f"cannot write to directory {tmp_path}"):
        files.check_output_path(tmp_path / "new.png", overwrite=True)


def test_atomic_write_replaces_only_when_asked(tmp_path):
    target = tmp_path / "a.txt"
    files.atomic_write(target, lambda temporary: Path(temporary).write_text("one"))
    files.atomic_write(target, lambda temporary: Path(temporary).write_text("two"))
    assert target.read_text() == "two" and target.stat().st_mode & 0o777 == 0o644
    with pytest.raises(FileExistsError, match="already exists"):
        files.atomic_write(
            target, lambda temporary: Path(temporary).write_text("three"), overwrite=False
        )
    assert target.read_text() == "two"
    files.atomic_write(
        tmp_path / "sub" / "b.txt", lambda t: Path(t).write_text("b"), overwrite=False
    )
    assert (tmp_path / "sub" / "b.txt").read_text() == "b"
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "sub"]  # no temporary file left
    # The temporary file sits beside the target: a rename across file systems is not atomic.
    folders = []
    files.atomic_write(target, lambda t: folders.append(Path(t).parent) or Path(t).write_text("x"))
    assert folders == [tmp_path]


def test_saving_an_image_keeps_a_file_that_appears_meanwhile(tmp_path):
    """save_image_atomic(overwrite=False), as generate calls it without --overwrite: an image file
    that another process writes while ours is encoded stays."""
    from fastdiff.pipeline.images import save_image_atomic

    target = tmp_path / "out.png"

    class SlowImage:
        def save(self, temporary, format):
            target.write_text("theirs")
            Path(temporary).write_text("ours")

    with pytest.raises(FileExistsError, match="already exists"):
        save_image_atomic(SlowImage(), target, overwrite=False)
    assert target.read_text() == "theirs"


@pytest.mark.parametrize("hard_links", [True, False], ids=["link", "no-links"])
def test_a_file_that_appears_while_writing_is_kept(tmp_path, monkeypatch, hard_links):
    """overwrite=False holds at the rename, not only at the check before the work: a file made
    meanwhile (another process) stays, with or without hard links on the file system."""
    if not hard_links:

        def no_link(source, target):
            raise OSError("hard links are not supported here")

        monkeypatch.setattr(os, "link", no_link)
    target = tmp_path / "image.png"

    def slow_write(temporary: str) -> None:
        Path(temporary).write_text("ours")
        target.write_text("theirs")

    with pytest.raises(FileExistsError):
        files.atomic_write(target, slow_write, overwrite=False)
    assert target.read_text() == "theirs" and os.listdir(tmp_path) == ["image.png"]
    target.unlink()
    files.atomic_write(target, lambda t: Path(t).write_text("ours"), overwrite=False)
    assert target.read_text() == "ours" and os.listdir(tmp_path) == ["image.png"]
