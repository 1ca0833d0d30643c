"""``fastdiff generate``: single images and grids written atomically, clean errors, and the
``--prompts`` mode sharded over two gloo ranks by torchrun."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff.cli import main
from fastdiff.pipeline import Pipeline
from tests.pipeline.folders import make_sd_folder

pytest.importorskip("diffusers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def generate(*args) -> int:
    return main(["generate", "--steps", "2", "--no-progress", *map(str, args)])


def test_writes_one_image_and_a_grid(class_folder, tmp_path, capsys):
    out = tmp_path / "one.png"
    assert generate("--model", class_folder, "--class-label", 1, "--out", out) == 0
    assert Image.open(out).size == (16, 16)
    assert f"wrote {out} (ddim, 2 steps, guidance 7.5, " in capsys.readouterr().out
    args = ("--model", class_folder, "--class-label", 1, "--guidance", -2, "--overwrite")
    assert generate(*args, "--out", out) == 0
    assert f"wrote {out} (ddim, 2 steps, no guidance (w=-2 <= 1), " in capsys.readouterr().out
    grid = tmp_path / "grid.png"
    code = generate(
        "--model",
        class_folder,
        "--class-label",
        2,
        "--num-images",
        3,
        "--size",
        "24x16",
        "--sampler",
        "dpmpp_2m",
        "--out",
        grid,
    )
    assert code == 0
    assert Image.open(grid).size == (2 * 16, 2 * 24)  # 3 images: 2 columns x 2 rows of 16x24
    edited = tmp_path / "edited.png"
    code = generate(
        "--model",
        class_folder,
        "--class-label",
        0,
        "--init-image",
        out,
        "--strength",
        "0.5",
        "--out",
        edited,
    )
    assert code == 0 and Image.open(edited).size == (16, 16)
    assert "img2img strength 0.5: 1 steps run" in capsys.readouterr().out  # int(2 * 0.5)
    # no temporary files left behind
    assert sorted(os.listdir(tmp_path)) == ["edited.png", "grid.png", "one.png"]


def test_text_model_prompt(tmp_path):
    folder = make_sd_folder(tmp_path / "sd")
    out = tmp_path / "cat.png"
    code = generate(
        "--model",
        folder,
        "--prompt",
        "a cat",
        "--negative-prompt",
        "dog",
        "--guidance",
        3,
        "--sampler",
        "euler",
        "--seed",
        5,
        "--size",
        8,
        "--out",
        out,
    )
    assert code == 0 and Image.open(out).size == (8, 8)
    # --clip-skip reaches the pipeline: another image, and an out-of-range value is named.
    skipped = tmp_path / "skipped.png"
    common = ("--model", folder, "--prompt", "a cat", "--seed", 5, "--size", 8, "--steps", 2)
    plain = tmp_path / "plain.png"
    assert generate(*common, "--out", plain) == 0
    assert generate(*common, "--clip-skip", 1, "--out", skipped) == 0
    assert not np.array_equal(np.asarray(Image.open(plain)), np.asarray(Image.open(skipped)))
    assert generate(*common, "--clip-skip", 9, "--out", tmp_path / "bad.png") == 2
    # --negative-prompt reaches the pipeline too.
    negative = tmp_path / "negative.png"
    assert generate(*common, "--negative-prompt", "a zebra", "--out", negative) == 0
    assert not np.array_equal(np.asarray(Image.open(plain)), np.asarray(Image.open(negative)))


def test_errors_are_clean_and_never_clobber(class_folder, tmp_path, capsys, monkeypatch):
    out = tmp_path / "keep.png"
    Image.new("RGB", (4, 4), (9, 9, 9)).save(out)
    before = out.read_bytes()
    cases = [
        (
            ("--model", tmp_path / "nowhere", "--class-label", 0, "--out", out),
            "pipeline folder not found",
        ),
        (("--model", class_folder, "--class-label", 3, "--out", out), "class label 3 out of range"),
        (
            ("--model", class_folder, "--prompt", "a cat", "--out", out),
            "expected a class label, got 'a cat'",
        ),
        (
            ("--model", class_folder, "--class-label", 0, "--size", 15, "--out", out),
            "height=15 is not a multiple",
        ),
        (
            ("--model", class_folder, "--class-label", 0, "--sampler", "dpm2", "--out", out),
            "unknown sampler 'dpm2'",
        ),
        (("--model", class_folder, "--class-label", 0), "--out FILE.png is required"),
        (
            (
                "--model",
                class_folder,
                "--class-label",
                0,
                "--init-image",
                tmp_path / "no.png",
                "--out",
                out,
            ),
            "init image not found",
        ),
        (
            ("--model", class_folder, "--prompts", tmp_path / "none.txt", "--out-dir", tmp_path),
            "prompts file not found",
        ),
    ]
    for args, message in cases:
        # --overwrite: past the check that refuses an existing --out, a failure still keeps it.
        assert generate(*args, "--overwrite") == 2, message
        error = capsys.readouterr().err
        assert error.startswith("fastdiff generate: error:") and message in error
        assert "Traceback" not in error
    assert out.read_bytes() == before
    monkeypatch.setenv("WORLD_SIZE", "2")  # one image per rank would race for one file
    assert generate("--model", class_folder, "--class-label", 0, "--out", out, "--overwrite") == 2
    assert "under torchrun use --prompts FILE" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(SystemExit):
        generate("--model", class_folder, "--class-label", 0, "--size", "big", "--out", out)
    assert "size must be HxW or N" in capsys.readouterr().err


def test_variant_selects_the_variant_weights(class_folder, tmp_path, capsys):
    """--variant ema reads diffusion_pytorch_model.ema.safetensors, as diffusers' variant= does;
    a variant the folder lacks is an error naming the file looked for."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "pipe"
    shutil.copytree(class_folder, folder)
    for component, scale in (("unet", 0.5), ("vae", 1.0)):
        weights = load_file(folder / component / "diffusion_pytorch_model.safetensors")
        scaled = {name: tensor * scale for name, tensor in weights.items()}
        save_file(scaled, folder / component / "diffusion_pytorch_model.ema.safetensors")
    plain, ema = tmp_path / "plain.png", tmp_path / "ema.png"
    assert generate("--model", folder, "--class-label", 1, "--out", plain) == 0
    assert generate("--model", folder, "--class-label", 1, "--variant", "ema", "--out", ema) == 0
    assert not np.array_equal(np.asarray(Image.open(plain)), np.asarray(Image.open(ema)))
    capsys.readouterr()
    missing = tmp_path / "missing.png"
    code = generate("--model", folder, "--class-label", 1, "--variant", "fp8", "--out", missing)
    assert code == 2 and not missing.exists()
    assert "diffusion_pytorch_model.fp8.safetensors" in capsys.readouterr().err


def test_bad_arguments_fail_cleanly_and_before_loading(class_folder, tmp_path, capsys):
    """Output paths are checked before the model loads (the model path here does not exist, so
    a check made after loading would report that instead); nothing is silently ignored."""
    nowhere = tmp_path / "no-model"
    (tmp_path / "folder.png").mkdir()
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("hello")
    truncated = tmp_path / "truncated.png"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9\n".encode("latin-1"))
    out = tmp_path / "out.png"
    cases = [
        (("--model", nowhere, "--class-label", 0, "--out", tmp_path / "folder.png"), "is a dir"),
        (("--model", nowhere, "--class-label", 0, "--out", tmp_path / "x" / "o.png"), "not exist"),
        (("--model", nowhere, "--class-label", 0, "--out", tmp_path / "o.tiffx"), "image format"),
        (("--model", class_folder, "--class-label", 0, "--strength", 0.5, "--out", out), "--str"),
        (("--model", class_folder, "--class-label", 0, "--guidance", "nan", "--out", out), "fini"),
        (
            ("--model", class_folder, "--class-label", 0, "--negative-prompt", "x", "--out", out),
            "--negative-prompt is not used",
        ),
        (
            ("--model", class_folder, "--class-label", 0, "--clip-skip", 1, "--out", out),
            "--clip-skip is not used",
        ),
        (
            (
                "--model",
                class_folder,
                "--class-label",
                0,
                "--init-image",
                not_an_image,
                "--out",
                out,
            ),
            "cannot read init image",
        ),
        (
            ("--model", class_folder, "--class-label", 0, "--init-image", truncated, "--out", out),
            "cannot read init image",
        ),
        (("--model", class_folder, "--prompts", latin1, "--out-dir", a_file), "not a directory"),
        (("--model", class_folder, "--prompts", latin1, "--out-dir", tmp_path), "not UTF-8 text"),
    ]
    for args, message in cases:
        assert generate(*args) == 2, message
        error = capsys.readouterr().err
        assert error.startswith("fastdiff generate: error:") and message in error, error
        assert "Traceback" not in error
    assert not out.exists() and a_file.read_text() == "keep me"


def test_existing_images_are_never_replaced_unasked(class_folder, tmp_path, capsys):
    """A second run refuses, before the model loads (the model path here does not exist), to
    replace an image; --overwrite replaces it, --skip-existing keeps it and makes the rest."""
    nowhere = tmp_path / "no-model"
    out = tmp_path / "one.png"
    out.write_bytes(b"earlier work")
    assert generate("--model", nowhere, "--class-label", 0, "--out", out) == 2
    assert "one.png already exists; pass --overwrite" in capsys.readouterr().err
    assert (
        generate("--model", class_folder, "--class-label", 0, "--out", out, "--skip-existing") == 2
    )
    assert "--skip-existing is only used with --prompts" in capsys.readouterr().err
    assert out.read_bytes() == b"earlier work"
    assert generate("--model", class_folder, "--class-label", 0, "--out", out, "--overwrite") == 0
    assert Image.open(out).size == (16, 16)

    prompts = tmp_path / "labels.txt"
    prompts.write_text("0\n1\n2\n")
    out_dir = tmp_path / "images"
    out_dir.mkdir()
    (out_dir / "prompt-00001.png").write_bytes(b"earlier work")
    assert generate("--model", nowhere, "--prompts", prompts, "--out-dir", out_dir) == 2
    error = capsys.readouterr().err
    assert "already holds 1 of the 3 images (prompt-00001.png ...)" in error, error
    assert "--skip-existing" in error and "--overwrite" in error
    code = generate(
        "--model", class_folder, "--prompts", prompts, "--out-dir", out_dir, "--skip-existing"
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "generated 2/2 prompts on 1 rank(s)" in printed, printed
    assert "(1 of 3 were there already: skipped)" in printed, printed
    assert (out_dir / "prompt-00001.png").read_bytes() == b"earlier work"
    assert len(os.listdir(out_dir)) == 3
    code = generate(
        "--model", class_folder, "--prompts", prompts, "--out-dir", out_dir, "--overwrite"
    )
    assert code == 0
    assert "generated 3/3 prompts" in capsys.readouterr().out
    assert Image.open(out_dir / "prompt-00001.png").size == (16, 16)
    with pytest.raises(SystemExit):  # argparse: not allowed with each other
        generate(
            "--model",
            class_folder,
            "--prompts",
            prompts,
            "--out-dir",
            out_dir,
            "--overwrite",
            "--skip-existing",
        )


def test_unwritable_outputs_fail_before_loading(class_folder, tmp_path, capsys, monkeypatch):
    """A folder we may not write to is named before any work (as root, whom permissions do not
    stop, the check's answer is faked); an OSError at write time is a clean error too."""
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    nowhere = tmp_path / "no-model"
    assert generate("--model", nowhere, "--class-label", 0, "--out", tmp_path / "o.png") == 2
    assert f"cannot write to directory {tmp_path}" in capsys.readouterr().err
    prompts = tmp_path / "labels.txt"
    prompts.write_text("0\n")
    assert generate("--model", nowhere, "--prompts", prompts, "--out-dir", tmp_path) == 2
    assert f"--out-dir: cannot write to directory {tmp_path}" in capsys.readouterr().err
    monkeypatch.undo()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("fastdiff.pipeline.images.save_image_atomic", disk_full)
    assert generate("--model", class_folder, "--class-label", 0, "--out", tmp_path / "o.png") == 2
    error = capsys.readouterr().err
    assert "fastdiff generate: error: [Errno 28] No space left on device" in error, error
    assert "Traceback" not in error and not (tmp_path / "o.png").exists()


def test_prompts_file_with_byte_order_mark(class_folder, tmp_path):
    prompts = tmp_path / "labels.txt"
    prompts.write_bytes("1\n2\n".encode("utf-8-sig"))  # as Windows editors save UTF-8
    assert generate("--model", class_folder, "--prompts", prompts, "--out-dir", tmp_path / "o") == 0
    assert sorted(os.listdir(tmp_path / "o")) == ["prompt-00000.png", "prompt-00001.png"]


def test_sixteen_bit_init_image_is_scaled_not_clipped(class_folder, tmp_path):
    """The same picture as 8-bit and 16-bit grayscale gives the same image: the CLI used to
    convert("RGB") first, which clips 16-bit values to 255 (a white init image)."""
    values = np.linspace(0, 255, 16 * 16).round().astype(np.uint8).reshape(16, 16)
    Image.fromarray(values).save(tmp_path / "gray8.png")
    Image.fromarray(values.astype(np.uint16) * 257).save(tmp_path / "gray16.png")
    assert Image.open(tmp_path / "gray16.png").mode.startswith("I")
    outputs = []
    for name in ("gray8", "gray16"):
        out = tmp_path / f"{name}-out.png"
        args = (
            "--model",
            class_folder,
            "--class-label",
            1,
            "--init-image",
            tmp_path / f"{name}.png",
        )
        assert generate(*args, "--strength", 0.5, "--out", out) == 0
        outputs.append(np.asarray(Image.open(out), dtype=np.int16))
    assert np.abs(outputs[0] - outputs[1]).max() <= 1


def test_prompts_file_sharded_over_two_gloo_ranks(class_folder, tmp_path):
    """Two CPU processes under torchrun: each writes its prompts' images; the bad line (class 7)
    fails on rank 1 only, is reported by rank 0 with its index and rank, and loses nothing else."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# one class label per line\n0\n7\n\n1\n2\n")
    out_dir = tmp_path / "images"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "fastdiff",
        "generate",
        "--model",
        str(class_folder),
        "--prompts",
        str(prompts),
        "--out-dir",
        str(out_dir),
        "--steps",
        "2",
        "--guidance",
        "2",
        "--seed",
        "10",
        "--device",
        "cpu",
        "--no-progress",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output  # a prompt failed
    assert "generated 3/4 prompts on 2 rank(s)" in result.stdout, output
    assert "FAILED prompt 1 ('7') on rank 1: ValueError: class label 7 out of range" in (
        result.stdout
    ), output
    assert sorted(os.listdir(out_dir)) == [
        "prompt-00000.png",
        "prompt-00002.png",
        "prompt-00003.png",
    ]
    # Prompt i uses seed + i whichever rank runs it: rank 1's image equals a local run.
    pipe = Pipeline.from_pretrained(class_folder)
    (expected,) = pipe(
        class_labels=2, num_inference_steps=2, guidance_scale=2.0, seed=13, progress=False
    )
    written = np.asarray(Image.open(out_dir / "prompt-00003.png"), dtype=np.int16)
    assert np.abs(written - np.asarray(expected, dtype=np.int16)).max() <= 1

    # The bad line mended, --skip-existing makes only the missing image, whichever rank gets it.
    kept = {name: (out_dir / name).read_bytes() for name in os.listdir(out_dir)}
    prompts.write_text("# one class label per line\n0\n1\n\n1\n2\n")
    rerun = subprocess.run(
        [*command, "--skip-existing"], env=env, capture_output=True, text=True, timeout=240
    )
    output = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, output
    assert "generated 1/1 prompts on 2 rank(s)" in rerun.stdout, output
    assert "(3 of 4 were there already: skipped)" in rerun.stdout, output
    assert all((out_dir / name).read_bytes() == data for name, data in kept.items())
    assert len(os.listdir(out_dir)) == 4


class _FakeCudaPipeline:
    device = "cuda"

    def __init__(self):
        self.optimized = []

    def optimize(self, **options):
        self.optimized.append(options)


@pytest.mark.parametrize("flag, wanted", [((), True), (("--no-optimize",), False)])
def test_cuda_pipelines_are_optimized_unless_asked_not_to(monkeypatch, flag, wanted):
    """Without CUDA graphs each Triton launch costs more host time than the eager op it replaces:
    on CUDA the CLI optimizes the pipeline (in the dtype asked for) unless --no-optimize."""
    import torch

    from fastdiff.commands import generate as generate_command

    fake = _FakeCudaPipeline()
    monkeypatch.setattr(Pipeline, "from_pretrained", staticmethod(lambda *a, **k: fake))
    parser = argparse.ArgumentParser()
    generate_command.add_parser(parser.add_subparsers())
    argv = ["generate", "--model", "m", "--prompt", "p", "--dtype", "bf16", *flag]
    args = parser.parse_args(argv)
    assert generate_command.load_pipeline(args, torch.device("cuda")) is fake
    assert fake.optimized == ([{"dtype": torch.bfloat16, "verbose": True}] if wanted else [])
    fake.optimized.clear()
    generate_command.load_pipeline(args, torch.device("cpu"))  # no CUDA: nothing to optimize
    assert fake.optimized == []


def test_every_sampling_option_reaches_the_pipeline(class_folder, tmp_path, monkeypatch):
    """What the command passes to the pipeline call: each option as given (an option dropped on
    the way would silently sample with the pipeline's default), and a float32 pipeline on CPU."""
    from PIL import Image as PILImage

    from fastdiff.pipeline import Pipeline

    seen = []
    real_call = Pipeline.__call__

    def spy(pipe, *args, **kwargs):
        seen.append((pipe.dtype, kwargs))
        return real_call(pipe, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "__call__", spy)
    init = tmp_path / "init.png"
    PILImage.new("RGB", (32, 32), (200, 30, 30)).save(init)
    options = ("--guidance", 2.5, "--guidance-rescale", 0.3, "--sampler", "ddim", "--eta", 0.5)
    image = ("--init-image", init, "--strength", 0.75)
    code = generate("--model", class_folder, "--class-label", 2, *options, "--seed", 4, *image,
                    "--out", tmp_path / "o.png")  # fmt: skip
    assert code == 0
    ((dtype, kwargs),) = seen
    assert str(dtype) == "torch.float32"
    wanted = dict(guidance_scale=2.5, guidance_rescale=0.3, sampler="ddim", eta=0.5, seed=4)
    assert {key: kwargs[key] for key in wanted} == wanted
    assert kwargs["strength"] == 0.75 and kwargs["class_labels"] == 2
    assert kwargs["num_inference_steps"] == 2 and kwargs["progress"] is False


def test_a_file_written_while_sampling_is_kept(class_folder, tmp_path, monkeypatch, capsys):
    """Without --overwrite the output is checked before the model loads and again at the final
    rename: an image another process writes meanwhile stays (--out and --prompts alike)."""
    from fastdiff.pipeline import Pipeline

    out_dir = tmp_path / "many"
    out_dir.mkdir()
    targets = [tmp_path / "one.png", out_dir / "prompt-00000.png"]
    real_call = Pipeline.__call__

    def racing(pipe, *args, **kwargs):
        for target in targets:
            if not target.exists():
                target.write_text("theirs")
                break
        return real_call(pipe, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "__call__", racing)
    assert generate("--model", class_folder, "--class-label", 1, "--out", targets[0]) != 0
    labels = tmp_path / "labels.txt"
    labels.write_text("1\n")
    assert generate("--model", class_folder, "--prompts", labels, "--out-dir", out_dir) != 0
    assert [target.read_text() for target in targets] == ["theirs", "theirs"]
    assert "already exists" in capsys.readouterr().err


def test_inpainting_with_a_mask_image(tmp_path, capsys):
    """--mask-image reaches an inpainting checkpoint (with --init-image) and a plain one (the
    kept region blended back), and is refused without --init-image."""
    folder = make_sd_folder(tmp_path / "inpaint", inpainting=True)
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    Image.fromarray((np.random.RandomState(0).rand(16, 16, 3) * 255).astype(np.uint8)).save(init)
    Image.fromarray((np.eye(16) * 255).astype(np.uint8)).save(mask)
    common = ("--model", folder, "--prompt", "a cat", "--seed", 1, "--steps", 2)
    out = tmp_path / "out.png"
    assert generate(*common, "--init-image", init, "--mask-image", mask, "--out", out) == 0
    assert Image.open(out).size == (16, 16)
    assert "inpainting strength 1: 2 steps run" in capsys.readouterr().out
    assert generate(*common, "--mask-image", mask, "--out", tmp_path / "no.png") == 2
    assert "--mask-image needs --init-image" in capsys.readouterr().err
    plain = make_sd_folder(tmp_path / "sd")
    arguments = ("--model", plain, "--prompt", "a cat", "--steps", 2, "--init-image", init)
    arguments += ("--seed", 1)
    blended, img2img = tmp_path / "blended.png", tmp_path / "img2img.png"
    assert generate(*arguments, "--mask-image", mask, "--out", blended) == 0
    assert "inpainting strength 1: 2 steps run" in capsys.readouterr().out
    assert generate(*arguments, "--strength", 1.0, "--out", img2img) == 0
    assert np.asarray(Image.open(blended)).tolist() != np.asarray(Image.open(img2img)).tolist()


def test_lora_weights_from_the_command_line(tmp_path):
    """--lora fuses a file's LoRA weights (another image; the same as the API's), --lora-scale
    scales them, and a missing file is named."""
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    folder = make_sd_folder(tmp_path / "sd")
    pipe = Pipeline.from_pretrained(folder)
    layer = pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v")
    generator = torch.Generator().manual_seed(0)
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"
    state = {
        f"{name}.lora_A.weight": torch.randn(2, layer.in_features, generator=generator),
        f"{name}.lora_B.weight": torch.randn(layer.out_features, 2, generator=generator),
    }
    lora = tmp_path / "style.safetensors"
    save_file(state, str(lora))
    common = ("--model", folder, "--prompt", "a cat", "--seed", 3, "--steps", 2, "--size", 16)
    plain, patched = tmp_path / "plain.png", tmp_path / "patched.png"
    assert generate(*common, "--out", plain) == 0
    assert generate(*common, "--lora", lora, "--lora-scale", 0.5, "--out", patched) == 0
    pipe.load_lora_weights(lora, scale=0.5)
    api = pipe("a cat", seed=3, num_inference_steps=2, height=16, width=16, progress=False)[0]
    assert np.array_equal(np.asarray(Image.open(patched)), np.asarray(api))
    assert not np.array_equal(np.asarray(Image.open(plain)), np.asarray(Image.open(patched)))
    assert generate(*common, "--lora", tmp_path / "none.safetensors", "--out", plain) == 2


def test_textual_inversion_from_the_command_line(tmp_path, capsys):
    """--textual-inversion loads an embedding whose token the prompt uses (an Automatic1111
    .safetensors file: the token is the file's name), the same as the API's."""
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    folder = make_sd_folder(tmp_path / "sd")
    embedding = tmp_path / "EasyToy.safetensors"
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    save_file({"emb_params": vectors}, str(embedding))
    common = ("--model", folder, "--prompt", "a EasyToy cat", "--seed", 3, "--steps", 2)
    common += ("--size", 16)
    plain, loaded = tmp_path / "plain.png", tmp_path / "loaded.png"
    assert generate(*common, "--out", plain) == 0
    assert generate(*common, "--textual-inversion", embedding, "--out", loaded) == 0
    assert "prompts may use 'EasyToy'" in capsys.readouterr().out
    pipe = Pipeline.from_pretrained(folder)
    assert pipe.load_textual_inversion(embedding) == "EasyToy"
    api = pipe("a EasyToy cat", seed=3, num_inference_steps=2, height=16, width=16, progress=False)
    assert np.array_equal(np.asarray(Image.open(loaded)), np.asarray(api[0]))
    assert not np.array_equal(np.asarray(Image.open(plain)), np.asarray(Image.open(loaded)))


def test_freeu_and_padding_mask_crop_from_the_command_line(tmp_path, capsys):
    """--freeu and --padding-mask-crop give the API's images; bad values are refused before
    the model loads."""
    folder = make_sd_folder(tmp_path / "sd")
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    Image.fromarray((np.random.RandomState(0).rand(24, 40, 3) * 255).astype(np.uint8)).save(init)
    drawn = np.zeros((24, 40), dtype=np.uint8)
    drawn[5:10, 28:34] = 255
    Image.fromarray(drawn).save(mask)
    common = ("--model", folder, "--prompt", "a cat", "--seed", 3, "--steps", 2, "--size", 16)
    out = tmp_path / "out.png"
    arguments = ("--init-image", init, "--mask-image", mask, "--padding-mask-crop", 2)
    assert generate(*common, *arguments, "--freeu", "0.9,0.2,1.2,1.4", "--out", out) == 0
    pipe = Pipeline.from_pretrained(folder)
    pipe.enable_freeu(0.9, 0.2, 1.2, 1.4)
    api = pipe(
        "a cat",
        image=Image.open(init),
        mask_image=Image.open(mask),
        padding_mask_crop=2,
        seed=3,
        num_inference_steps=2,
        height=16,
        width=16,
        progress=False,
    )[0]
    assert Image.open(out).size == (40, 24)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(api))
    assert generate(*common, "--freeu", "0.9,0.2", "--out", tmp_path / "no.png") == 2
    assert "--freeu takes four numbers" in capsys.readouterr().err
    assert generate(*common, "--padding-mask-crop", 2, "--out", tmp_path / "no.png") == 2
    assert "--padding-mask-crop needs --mask-image" in capsys.readouterr().err
