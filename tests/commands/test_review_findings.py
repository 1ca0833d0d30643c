"""Command-line and image I/O bugs found in review: each test names what was wrong."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fastdiff.cli import main

pytest.importorskip("diffusers")


def generate(*args) -> int:
    return main(["generate", "--steps", "2", "--no-progress", *map(str, args)])


@pytest.mark.parametrize("suffix", [".psd", ".xpm", ".xbm"], ids=["psd", "xpm", "xbm"])
def test_out_in_a_format_pillow_cannot_write_is_refused_before_loading(tmp_path, capsys, suffix):
    """--out o.psd (or .xpm: formats Pillow only reads) passed the check, the images were made,
    and the save raised KeyError('PSD'): a traceback, and the work lost. .xbm (1-bit only) failed
    the same way, after the work. The model path here does not exist, so a refusal made after
    loading would name the missing model instead."""
    out = tmp_path / f"o{suffix}"
    assert generate("--model", tmp_path / "no-model", "--class-label", 0, "--out", out) == 2
    error = capsys.readouterr().err
    assert error.startswith("fastdiff generate: error: --out: ") and "cannot write" in error, error
    assert ".png" in error and not out.exists()


def test_saving_to_a_read_only_format_is_a_clean_error(tmp_path):
    """save_image_atomic let Pillow's KeyError escape, which the command line does not catch."""
    from fastdiff.pipeline.images import save_image_atomic

    with pytest.raises(ValueError, match="cannot write PSD images"):
        save_image_atomic(Image.new("RGB", (4, 4)), tmp_path / "o.psd")
    assert list(tmp_path.iterdir()) == []


def test_init_image_is_read_upright_as_its_exif_orientation_says(class_folder, tmp_path):
    """A photo stored sideways with an EXIF orientation (as phones save them) was used as
    stored: the output came out rotated and with width and height swapped. It must equal the
    output for the same picture stored upright (as viewers and diffusers' load_image show it)."""
    pixels = (np.random.RandomState(0).rand(16, 24, 3) * 255).astype(np.uint8)
    sideways = Image.fromarray(pixels)  # 24 wide, 16 tall as stored
    exif = sideways.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    sideways.save(tmp_path / "sideways.png", exif=exif)
    Image.fromarray(pixels).transpose(Image.Transpose.ROTATE_270).save(tmp_path / "upright.png")
    outputs = []
    for name in ("sideways", "upright"):
        out = tmp_path / f"{name}-out.png"
        args = ("--model", class_folder, "--class-label", 1, "--seed", 2, "--strength", 0.5)
        assert generate(*args, "--init-image", tmp_path / f"{name}.png", "--out", out) == 0
        outputs.append(np.asarray(Image.open(out)))
    assert outputs[1].shape == (24, 16, 3)
    assert outputs[0].shape == outputs[1].shape and np.array_equal(outputs[0], outputs[1])


def test_an_unreadable_mask_image_is_called_a_mask(class_folder, tmp_path, capsys):
    """A mask file PIL cannot read was reported as "cannot read init image <mask path>"."""
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(init)
    mask.write_text("not an image")
    arguments = ("--class-label", 0, "--init-image", init, "--mask-image", mask)
    assert generate("--model", class_folder, *arguments, "--out", tmp_path / "o.png") == 2
    error = capsys.readouterr().err
    assert f"cannot read mask image {mask}" in error, error


def test_sixteen_bit_mask_is_scaled_not_clipped(class_folder, tmp_path):
    """A 16-bit grayscale mask went to the pipeline as read, whose convert("L") clips every
    value above 255 to white: a dark gray (keep) region became repaint. The same mask in 8 and
    16 bits must inpaint the same."""
    Image.fromarray((np.random.RandomState(1).rand(16, 16, 3) * 255).astype(np.uint8)).save(
        tmp_path / "init.png"
    )
    mask8 = np.zeros((16, 16), dtype=np.uint8)
    mask8[:, 8:] = 100  # 0.39: kept
    mask8[4:12, 10:14] = 230  # 0.9: repainted
    Image.fromarray(mask8).save(tmp_path / "mask8.png")
    Image.fromarray(mask8.astype(np.uint16) * 257).save(tmp_path / "mask16.png")
    assert Image.open(tmp_path / "mask16.png").mode.startswith("I")
    outputs = []
    for name in ("mask8", "mask16"):
        out = tmp_path / f"{name}-out.png"
        args = ("--model", class_folder, "--class-label", 1, "--seed", 3)
        args += ("--init-image", tmp_path / "init.png", "--mask-image", tmp_path / f"{name}.png")
        assert generate(*args, "--out", out) == 0
        outputs.append(np.asarray(Image.open(out), dtype=np.int16))
    assert np.abs(outputs[0] - outputs[1]).max() <= 1


def test_lora_scale_without_lora_is_refused(tmp_path, capsys):
    """--lora-scale without --lora was accepted and silently ignored (no weights to scale).
    Refused before the model loads (the model path here does not exist)."""
    out = tmp_path / "o.png"
    args = ("--model", tmp_path / "no-model", "--class-label", 0, "--lora-scale", 0.5)
    assert generate(*args, "--out", out) == 2
    error = capsys.readouterr().err
    assert "--lora-scale is only used with --lora" in error, error
    assert not out.exists()


def test_bench_csv_with_no_csv_is_refused(tmp_path, monkeypatch, capsys):
    """fastdiff bench --csv FILE --no-csv ran every benchmark and silently wrote no CSV."""
    import fastdiff.commands.bench as bench

    def must_not_run():
        raise AssertionError("the benchmarks ran")

    monkeypatch.setattr(bench, "load_benchmarks", must_not_run)
    with pytest.raises(SystemExit) as exited:
        main(["bench", "--csv", str(tmp_path / "rows.csv"), "--no-csv"])
    assert exited.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("factors", ["0.9,0.2,nan,1.4", "inf,0.2,1.2,1.4"], ids=["nan", "inf"])
def test_freeu_factors_must_be_finite(tmp_path, capsys, factors):
    """--freeu read its factors with float(), which takes "nan" and "inf": the model loaded and
    sampled, then failed with NaN latents that did not name the option. Refused before the
    model loads (the model path here does not exist)."""
    out = tmp_path / "o.png"
    args = ("--model", tmp_path / "no-model", "--prompt", "a cat", "--freeu", factors)
    assert generate(*args, "--out", out) == 2
    error = capsys.readouterr().err
    assert "--freeu takes four numbers" in error and "finite" in error, error
    assert not out.exists()


def test_profile_on_cpu_does_not_claim_channels_last(capsys, monkeypatch):
    """Without CUDA the optimized path is prepared without channels-last (prepare_module's
    channels_last is on_cuda, and the input stays NCHW), yet its table was titled
    "kernels, channels-last, fused QKV"."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["profile", "--model", "tiny_vae", "--calls", "1", "--top", "1"]) == 0
    printed = capsys.readouterr().out
    (title,) = [line for line in printed.splitlines() if "fastdiff optimized" in line]
    assert "channels-last" not in title and "fused QKV" in title, title
