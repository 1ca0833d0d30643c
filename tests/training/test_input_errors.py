"""Bad training input gets an error that names the problem (the key, the value, the stage, the
count), before anything is trained or written where the check allows it."""

from __future__ import annotations

import shutil
import sys

import pytest
import torch

from fastdiff.training.classifier import ShapeClassifier, accuracy, load_classifier
from fastdiff.training.config import OptimConfig, config_from_dict
from fastdiff.training.distributed import DistContext
from fastdiff.training.loop import train_stage
from fastdiff.training.model_io import save_unet, unet_config_dict
from fastdiff.training.run import run_training
from fastdiff.training.shapes import NUM_CLASSES, balanced_labels
from fastdiff.training.unet_stage import train_unet

CPU = DistContext(rank=0, world_size=1, device=torch.device("cpu"))


def tiny_unet(tiny_config_dict, num_classes: int = NUM_CLASSES):
    """The tiny config's class-conditional U-Net for 4-channel 8x8 latents."""
    from fastdiff.models import UNet2DConditionModel

    section = config_from_dict(tiny_config_dict).unet
    values = unet_config_dict(section, latent_channels=4, latent_size=8)
    return UNet2DConditionModel({**values, "num_class_embeds": num_classes + 1})  # + null class


@pytest.mark.parametrize(
    "key, value",
    [("num_images", 0), ("held_out_images", 0), ("held_out_images", -4)],
    ids=["no-training-images", "no-held-out-images", "negative-held-out-images"],
)
def test_data_image_counts_must_be_positive(tiny_config_dict, key, value):
    tiny_config_dict["data"][key] = value
    with pytest.raises(ValueError, match=rf"data\.{key} must be >= 1, got {value}"):
        config_from_dict(tiny_config_dict)


def test_unknown_device_is_named_before_training(tiny_config_dict, tmp_path):
    config = config_from_dict({**tiny_config_dict, "device": "gpu"})
    with pytest.raises(ValueError, match="device: unknown value 'gpu'; allowed values: auto, cpu"):
        run_training(config)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_requested_without_cuda_is_refused(tiny_config_dict, tmp_path):
    config = config_from_dict({**tiny_config_dict, "device": "cuda"})
    with pytest.raises(RuntimeError, match="device 'cuda' requested but no CUDA device"):
        run_training(config)
    assert not (tmp_path / "run").exists()


def test_balanced_labels_needs_a_positive_count():
    with pytest.raises(ValueError, match="per_class must be >= 1, got 0"):
        balanced_labels(0)


def test_accuracy_needs_one_label_per_image():
    model = ShapeClassifier(width=8)
    with pytest.raises(ValueError, match="4 images but 3 labels"):
        accuracy(model, torch.zeros(4, 3, 32, 32), torch.zeros(3, dtype=torch.long))


def test_load_classifier_from_another_models_folder(tiny_config_dict, tmp_path):
    """A U-Net folder (config.json of another architecture) given as the classifier's."""
    folder = tmp_path / "unet"
    save_unet(tiny_unet(tiny_config_dict), folder, "float32")
    with pytest.raises(ValueError, match="architecture must be 'ShapeClassifier', got None"):
        load_classifier(folder)


def test_save_unet_names_the_allowed_dtypes(tiny_config_dict, tmp_path):
    folder = tmp_path / "unet"
    with pytest.raises(ValueError, match=r"unknown value 'bfloat16'; allowed values: \['float16'"):
        save_unet(tiny_unet(tiny_config_dict), folder, "bfloat16")
    assert not folder.exists()


def test_unet_stage_needs_one_label_per_latent(tiny_config_dict, tmp_path):
    config = config_from_dict(tiny_config_dict)
    labels = torch.zeros(6, dtype=torch.long)
    with pytest.raises(ValueError, match="8 latents but 6 labels"):
        train_unet(config, torch.zeros(8, 4, 8, 8), labels, CPU)
    assert not (tmp_path / "run").exists()


def test_non_finite_loss_stops_training_at_its_step(tiny_config_dict, tmp_path):
    """Latents with NaN (a diverged VAE's) give a NaN loss: training stops at step 1, naming it,
    and writes no checkpoint of a broken model."""
    config = config_from_dict(tiny_config_dict)
    latents = torch.full((8, 4, 8, 8), float("nan"))
    with pytest.raises(RuntimeError, match="unet: loss became nan at step 1"):
        train_unet(config, latents, torch.zeros(8, dtype=torch.long), CPU)
    assert not (tmp_path / "run" / "unet_checkpoint.pt").exists()


def test_a_checkpoint_of_another_stage_is_refused(tmp_path):
    """A checkpoint copied under another stage's name is not resumed into that stage."""

    def loss_fn(model, indices, generator):
        return (model(indices.float()[:, None]) - 1.0).square().mean()

    config = OptimConfig(steps=2, batch_size=2, checkpoint_every=1)
    common = dict(num_items=4, config=config, output_dir=tmp_path, context=CPU, progress=False)
    train_stage("vae", torch.nn.Linear(1, 1), loss_fn, **common)
    shutil.copy(tmp_path / "vae_checkpoint.pt", tmp_path / "unet_checkpoint.pt")
    before = (tmp_path / "unet_checkpoint.pt").read_bytes()
    with pytest.raises(RuntimeError, match="unet_checkpoint.pt belongs to stage 'vae', not 'unet'"):
        train_stage("unet", torch.nn.Linear(1, 1), loss_fn, **common)
    assert (tmp_path / "unet_checkpoint.pt").read_bytes() == before


def test_guidance_accuracy_needs_the_shapes_classes(tiny_config_dict):
    """A class-conditional pipeline of 3 classes scored by the 12-class shapes classifier."""
    from fastdiff.pipeline import Pipeline
    from fastdiff.training.evaluate import guidance_accuracy
    from fastdiff.training.model_io import build_vae
    from fastdiff.training.unet_stage import noise_schedule

    config = config_from_dict(tiny_config_dict)
    unet = tiny_unet(tiny_config_dict, num_classes=3)
    pipe = Pipeline(unet, build_vae(config.vae), noise_schedule(config.unet))
    with pytest.raises(ValueError, match="the pipeline has 3 classes, expected 12"):
        guidance_accuracy(pipe, ShapeClassifier(width=8), per_class=1, steps=1)


def test_loss_plot_without_matplotlib_says_how_to_install_it(tmp_path, monkeypatch):
    from fastdiff.training.plot import plot_losses

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as in an install without it
    with pytest.raises(RuntimeError, match=r"plotting needs matplotlib: pip install 'fastdiff\["):
        plot_losses(tmp_path, tmp_path / "loss.png")
    assert not (tmp_path / "loss.png").exists()
