"""``fastdiff generate --prompts FILE --out-dir DIR`` bugs found in review: each test names what
was wrong."""

from __future__ import annotations

import io
import os
import sys

import pytest
from PIL import Image

from fastdiff.cli import main
from fastdiff.commands.generate import read_prompts

pytest.importorskip("diffusers")


def generate(*args) -> int:
    return main(["generate", "--steps", "1", "--no-progress", *map(str, args)])


@pytest.mark.parametrize(
    "separator",
    ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1e"],
    ids=["line-sep", "paragraph-sep", "next-line", "vertical-tab", "form-feed", "fs", "rs"],
)
def test_a_unicode_line_boundary_inside_a_prompt_does_not_split_it(tmp_path, separator):
    """read_prompts split the file with str.splitlines, which also ends a line at U+2028, U+0085,
    form feed and other characters that text editors show inside a line: one prompt became two,
    and every later prompt got another index, so another seed and another file name (and a
    --skip-existing resume skipped the wrong ones). Lines end at \\n, \\r\\n or \\r only."""
    prompts = tmp_path / "prompts.txt"
    text = f"a red cat{separator}on a mat\r\nsecond\rthird\n\n# a comment\nlast, no newline"
    prompts.write_bytes(text.encode("utf-8"))
    assert read_prompts(prompts) == [
        f"a red cat{separator}on a mat",
        "second",
        "third",
        "last, no newline",
    ]


def test_files_joined_with_their_byte_order_marks_keep_comments_out(class_folder, tmp_path, capsys):
    """Only the byte-order mark that starts the file was dropped: in files joined together
    (`cat a.txt b.txt`, each saved by a Windows editor) the second file's first line kept its
    mark, so its '# comment' line was taken for a prompt (which failed, exit 1) and every later
    prompt moved up one index (label 1 was written as prompt-00002.png with another seed)."""
    prompts = tmp_path / "labels.txt"
    prompts.write_bytes(("# first\n0\n".encode("utf-8-sig")) + "# second\n1\n".encode("utf-8-sig"))
    out_dir = tmp_path / "images"
    assert generate("--model", class_folder, "--prompts", prompts, "--out-dir", out_dir) == 0
    assert "generated 2/2 prompts" in capsys.readouterr().out
    assert sorted(os.listdir(out_dir)) == ["prompt-00000.png", "prompt-00001.png"]


def test_a_dangling_link_in_out_dir_counts_as_an_existing_image(class_folder, tmp_path, capsys):
    """pending_prompts looked with Path.exists(), which is false for a dangling symlink, while
    the write (check_output_path) refuses one as an existing file. So a run without
    --overwrite/--skip-existing was not refused before the model loaded (the model path here does
    not exist: the run went on to fail loading it, exit 1), and a --skip-existing resume made
    the image and then failed to write it, exit 1 on every resume. The link now counts as an
    image there already, as it does for --out; only --overwrite replaces it."""
    prompts = tmp_path / "labels.txt"
    prompts.write_text("0\n1\n")
    out_dir = tmp_path / "images"
    out_dir.mkdir()
    link = out_dir / "prompt-00001.png"
    link.symlink_to(tmp_path / "unmounted" / "prompt-00001.png")

    nowhere = tmp_path / "no-model"
    assert generate("--model", nowhere, "--prompts", prompts, "--out-dir", out_dir) == 2
    error = capsys.readouterr().err
    assert "already holds 1 of the 2 images (prompt-00001.png ...)" in error, error

    skip = ("--prompts", prompts, "--out-dir", out_dir, "--skip-existing")
    assert generate("--model", class_folder, *skip) == 0, capsys.readouterr()
    printed = capsys.readouterr().out
    assert "generated 1/1 prompts" in printed and "(1 of 2 were there already" in printed, printed
    assert link.is_symlink() and Image.open(out_dir / "prompt-00000.png").size == (16, 16)


def test_a_prompts_file_that_is_not_utf8_names_the_line(tmp_path, capsys):
    """The error named a byte position ('position 9'), not the line to mend; the position is
    counted without the byte-order mark that the decoder drops, so the line is too."""
    prompts = tmp_path / "labels.txt"
    prompts.write_bytes("\ufeff0\n1\n".encode() + "\xe9t\xe9\n2\n".encode("latin-1"))
    nowhere = tmp_path / "no-model"
    assert generate("--model", nowhere, "--prompts", prompts, "--out-dir", tmp_path / "o") == 2
    error = capsys.readouterr().err
    assert "is not UTF-8 text (line 3)" in error, error


def test_the_summary_survives_a_stdout_that_cannot_encode_a_prompt(
    class_folder, tmp_path, monkeypatch
):
    """The summary printed each failed prompt's text as it is: on a stdout whose encoding lacks
    its characters (ASCII, Latin-1 or cp1252 for a Chinese prompt, as when the output is
    redirected under such a locale), print raised UnicodeEncodeError, the failure reports of
    this and every later prompt were lost, and the command exited 2 with the codec's error in
    place of 1 with the report. Such characters are now written as backslash escapes."""
    prompts = tmp_path / "labels.txt"
    prompts.write_text("\u732b\n1\nz\u00e9bre\n", encoding="utf-8")  # two are not class labels
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="ascii", errors="strict")
    monkeypatch.setattr(sys, "stdout", stdout)
    code = generate("--model", class_folder, "--prompts", prompts, "--out-dir", tmp_path / "o")
    stdout.flush()
    printed = stdout.buffer.getvalue().decode("ascii")
    monkeypatch.undo()
    assert code == 1, printed
    assert "generated 1/3 prompts" in printed, printed
    assert "FAILED prompt 0 ('\\u732b') on rank 0: ValueError:" in printed, printed
    assert "FAILED prompt 2 ('z\\xe9bre') on rank 0: ValueError:" in printed, printed
    assert os.listdir(tmp_path / "o") == ["prompt-00001.png"]
