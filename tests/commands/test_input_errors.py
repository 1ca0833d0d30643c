"""Bad command-line input gets an error that names the problem: ``fastdiff.cli.main`` returns 2
and prints ``fastdiff <command>: error: ...`` (argparse exits with 2), before any model loads
where the check allows it (the model folder given here then does not exist)."""

from __future__ import annotations

import sys

import pytest
from PIL import Image

from fastdiff.cli import main
from tests.pipeline.folders import make_sd_folder

pytest.importorskip("diffusers")


def generate(*args) -> int:
    return main(["generate", "--no-progress", *map(str, args)])


def test_a_subcommand_whose_dependency_is_missing_is_named_not_hidden(monkeypatch):
    """Only a subcommand module that is absent from the build is skipped; one that is present
    but cannot import a dependency raises the import error, which names the missing module."""
    monkeypatch.delitem(sys.modules, "fastdiff.commands.generate", raising=False)
    monkeypatch.setitem(sys.modules, "torch", None)  # as in an install without torch
    with pytest.raises(ModuleNotFoundError, match="torch") as raised:
        main(["demo", "--help"])
    assert raised.value.name == "torch"


def test_bench_outside_a_source_checkout_names_the_missing_folder(tmp_path, monkeypatch, capsys):
    import fastdiff.commands.bench as bench

    installed = tmp_path / "site-packages" / "fastdiff" / "commands" / "bench.py"
    monkeypatch.setattr(bench, "__file__", str(installed))
    assert main(["bench", "--no-csv"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("fastdiff bench: error: ")
    assert f"{tmp_path / 'site-packages' / 'benchmarks'} has none" in error, error
    assert "pip install -e ." in error


@pytest.mark.parametrize("per_class", ["0", "-2"], ids=["zero-per-class", "negative-per-class"])
def test_demo_per_class_must_be_positive(tmp_path, capsys, per_class):
    out = tmp_path / "grid.png"
    assert main(["demo", "--out", str(out), "--per-class", per_class]) == 2
    assert f"--per-class must be >= 1, got {per_class}" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("size", ["0x8", "8x0", "0"], ids=["zero-height", "zero-width", "zero"])
def test_generate_size_must_be_positive(tmp_path, capsys, size):
    with pytest.raises(SystemExit) as exited:
        generate(
            "--model", tmp_path, "--class-label", 0, "--size", size, "--out", tmp_path / "o.png"
        )
    assert exited.value.code == 2
    assert f"size must be positive, got '{size}'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "arguments, message",
    [
        pytest.param(
            ("--class-label", 0, "--out", "o.png", "--out-dir", "images"),
            "--out-dir is only used with --prompts",
            id="out-dir-without-prompts",
        ),
        pytest.param(
            ("--prompts", "labels.txt"),
            "--prompts needs --out-dir DIR",
            id="prompts-without-out-dir",
        ),
        pytest.param(
            ("--prompts", "labels.txt", "--out-dir", "images", "--out", "o.png"),
            "--out is not used with --prompts; images go to --out-dir",
            id="out-with-prompts",
        ),
        pytest.param(
            ("--class-label", 0, "--out", "o.png", "--num-images", 0),
            "--num-images must be at least 1, got 0",
            id="zero-num-images",
        ),
        pytest.param(
            ("--class-label", 0, "--out", "o.png", "--steps", 0),
            "--steps must be at least 1, got 0",
            id="zero-steps",
        ),
        pytest.param(
            ("--class-label", 0, "--out", "o.png", "--steps", -3),
            "--steps must be at least 1, got -3",
            id="negative-steps",
        ),
    ],
)
def test_generate_option_combinations_are_checked_before_loading(
    tmp_path, capsys, monkeypatch, arguments, message
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "labels.txt").write_text("0\n")
    assert generate("--model", tmp_path / "no-model", *arguments) == 2
    error = capsys.readouterr().err
    assert error.startswith("fastdiff generate: error: ") and message in error, error
    assert sorted(path.name for path in tmp_path.iterdir()) == ["labels.txt"]  # nothing written


def test_generate_prompts_file_without_prompts_is_named(tmp_path, capsys):
    prompts = tmp_path / "labels.txt"
    prompts.write_text("# one class label per line\n\n   \n")
    out_dir = tmp_path / "images"
    code = generate("--model", tmp_path / "no-model", "--prompts", prompts, "--out-dir", out_dir)
    assert code == 2
    assert f"fastdiff generate: error: {prompts} has no prompts" in capsys.readouterr().err
    assert not out_dir.exists()


def test_generate_class_label_for_a_text_model(tmp_path, capsys):
    folder = make_sd_folder(tmp_path / "sd")
    out = tmp_path / "o.png"
    assert generate("--model", folder, "--class-label", 1, "--steps", 1, "--out", out) == 2
    error = capsys.readouterr().err
    assert "this model takes text prompts, not --class-label" in error, error
    assert not out.exists()


def test_generate_missing_mask_image_is_named(class_folder, tmp_path, capsys):
    init = tmp_path / "init.png"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(init)
    mask = tmp_path / "no-mask.png"
    out = tmp_path / "o.png"
    arguments = ("--class-label", 0, "--steps", 1, "--init-image", init, "--mask-image", mask)
    assert generate("--model", class_folder, *arguments, "--out", out) == 2
    assert f"mask image not found: {mask}" in capsys.readouterr().err
    assert not out.exists()
