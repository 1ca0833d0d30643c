"""``fastdiff demo`` and ``fastdiff train`` from the command line."""

import json

import pytest
import torch
from PIL import Image

from fastdiff.cli import main
from fastdiff.training.grid import grid_image


def test_demo_writes_a_labelled_png(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["demo", "--out", str(out), "--per-class", "2", "--steps", "5"]) == 0
    printed = capsys.readouterr().out
    assert "backend: eager" in printed and "time:" in printed and "classifier accuracy" in printed
    image = Image.open(out)
    assert image.format == "PNG"
    # 12 rows of 2x-scaled 32-pixel samples under a header; 2 samples on each side.
    assert image.size == (104 + 2 * 2 * 66 + 12, 22 + 12 * 66)
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]  # no temporary file left
    args = ["demo", "--out", str(out), "--per-class", "1", "--steps", "1", "--overwrite"]
    assert main(args) == 0
    assert Image.open(out).size == (104 + 2 * 66 + 12, 22 + 12 * 66)  # replaced, as asked


def test_demo_rejects_bad_arguments(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "grid.jpg")]) == 2
    assert "--out must name a .png file" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "g.png"), "--steps", "0"]) == 2
    assert (
        main(["demo", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "g.png")]) == 2
    )
    assert "not found" in capsys.readouterr().err
    # These used to end in a traceback (a directory as --out: after sampling the whole grid).
    if not torch.cuda.is_available():
        assert main(["demo", "--out", str(tmp_path / "g.png"), "--device", "cuda:0"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    (tmp_path / "folder.png").mkdir()
    assert main(["demo", "--out", str(tmp_path / "folder.png"), "--steps", "1"]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "g.png"), "--device", "gpu"]) == 2
    assert "--device 'gpu' is not a torch device" in capsys.readouterr().err
    # w <= 1 samples unguided: the right half would repeat the left under a "guidance" title.
    for weight in ("1", "0.5", "-5"):
        assert main(["demo", "--out", str(tmp_path / "g.png"), "--guidance", weight]) == 2
        assert "--guidance must be greater than 1" in capsys.readouterr().err
    # An existing file is refused before any sampling (the model folder here does not exist).
    kept = tmp_path / "kept.png"
    kept.write_bytes(b"earlier work")
    assert main(["demo", "--out", str(kept), "--model", str(tmp_path / "nowhere")]) == 2
    assert "kept.png already exists; pass --overwrite" in capsys.readouterr().err
    assert kept.read_bytes() == b"earlier work"


def test_grid_checks_its_inputs():
    with pytest.raises(ValueError, match="left has 3 images, expected 2 rows x 2"):
        grid_image(torch.zeros(3, 3, 32, 32), torch.zeros(4, 3, 32, 32), ["a", "b"], 2, "l", "r")


def test_train_help_and_config_errors(tmp_path, capsys, tiny_config_dict):
    with pytest.raises(SystemExit) as exited:
        main(["train", "--help"])
    assert exited.value.code == 0
    assert "--config" in capsys.readouterr().out

    assert main(["train", "--print-config", "--stages", "vae", "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["stages"] == ["vae"] and printed["device"] == "cpu"

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"vae": {"stepz": 3}}))
    assert main(["train", "--config", str(bad)]) == 2
    assert "unknown key(s) ['stepz']" in capsys.readouterr().err

    # The U-Net stage alone needs a VAE trained first: a clear error, not a traceback.
    alone = tmp_path / "alone.json"
    alone.write_text(json.dumps({**tiny_config_dict, "stages": ["unet"]}))
    assert main(["train", "--config", str(alone)]) == 2
    assert "run the vae stage first" in capsys.readouterr().err

    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("keep me")
    assert main(["train", "--config", str(alone), "--output-dir", str(not_a_folder)]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    assert not_a_folder.read_text() == "keep me"


def test_train_cli_builds_a_loadable_pipeline(tmp_path, tiny_config_dict):
    from fastdiff.pipeline import Pipeline
    from fastdiff.training.evaluate import load_pipeline_classifier

    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(tiny_config_dict))
    assert main(["train", "--config", str(path)]) == 0
    folder = tmp_path / "run" / "pipeline"
    pipe = Pipeline.from_pretrained(folder)
    assert pipe.num_classes == 12 and pipe.null_class_label == 12
    assert pipe.class_names[0] == "red circle"
    images = pipe(
        class_labels=[0, 5],
        guidance_scale=3.0,
        num_inference_steps=2,
        seed=0,
        output_type="tensor",
        progress=False,
    )
    assert images.shape == (2, 3, 32, 32)
    assert load_pipeline_classifier(folder).num_classes == 12
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics) >= {"classifier", "vae", "unet", "config"}
    assert metrics["vae"]["scaling_factor"] == pytest.approx(pipe.vae.config["scaling_factor"])


def test_demo_samples_both_halves_from_the_same_noise(tmp_path, monkeypatch):
    """The left half is sampled at w = 1 and the right at --guidance, with the same seed and the
    --sampler given, and they are drawn in that order (left plain, right guided)."""
    import fastdiff.training.evaluate as evaluate
    import fastdiff.training.grid as grid

    calls, grids = [], []
    real_generate = evaluate.generate

    def spy_generate(pipe, labels, guidance, steps, seed, sampler):
        calls.append((guidance, steps, seed, sampler))
        return real_generate(pipe, labels, guidance, steps, seed, sampler)

    def spy_grid(path, left, right, names, per_class, **kwargs):
        grids.append((left, right, kwargs["overwrite"]))

    monkeypatch.setattr(evaluate, "generate", spy_generate)
    monkeypatch.setattr(grid, "save_grid", spy_grid)
    out = tmp_path / "grid.png"
    args = ["--out", str(out), "--per-class", "1", "--steps", "2", "--guidance", "4"]
    assert main(["demo", *args, "--seed", "7", "--sampler", "euler"]) == 0
    assert calls == [(1.0, 2, 7, "euler"), (4.0, 2, 7, "euler")]
    ((left, right, overwrite),) = grids
    assert not overwrite and (left - right).abs().max() > 0
    from fastdiff.pipeline import Pipeline
    from fastdiff.training.evaluate import default_model_path
    from fastdiff.training.shapes import balanced_labels

    pipe = Pipeline.from_pretrained(default_model_path(), dtype=torch.float32)
    torch.testing.assert_close(left, real_generate(pipe, balanced_labels(1), 1.0, 2, 7, "euler"))
