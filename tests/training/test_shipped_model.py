"""The shipped model folder: complete, small, and readable by diffusers (the format reference)."""

import json

import pytest
import torch

from fastdiff.models import load_unet, load_vae
from fastdiff.training.evaluate import default_model_path

FOLDER = default_model_path()


def test_folder_is_complete_and_small():
    files = sorted(str(p.relative_to(FOLDER)) for p in FOLDER.rglob("*") if p.is_file())
    assert files == [
        "classifier/config.json",
        "classifier/model.safetensors",
        "model_index.json",
        "scheduler/scheduler_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    assert sum(p.stat().st_size for p in FOLDER.rglob("*") if p.is_file()) < 10 * 2**20
    index = json.loads((FOLDER / "model_index.json").read_text())
    assert index["null_class_label"] == 12 and len(index["class_names"]) == 12


def test_diffusers_reads_the_same_weights():
    diffusers = pytest.importorskip("diffusers")
    unet = load_unet(FOLDER / "unet")
    vae = load_vae(FOLDER / "vae")
    reference_unet = diffusers.UNet2DConditionModel.from_pretrained(
        FOLDER / "unet", torch_dtype=torch.float32
    ).eval()
    reference_vae = diffusers.AutoencoderKL.from_pretrained(
        FOLDER / "vae", torch_dtype=torch.float32
    ).eval()
    x = torch.randn(3, 4, 8, 8)
    t = torch.tensor([10, 500, 990])
    labels = torch.tensor([0, 7, 12])
    with torch.no_grad():
        ours = unet(x, t, None, class_labels=labels)
        theirs = reference_unet(x, t, None, class_labels=labels).sample
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(
            vae.decode(x), reference_vae.decode(x).sample, rtol=1e-4, atol=1e-4
        )
    assert reference_vae.config.scaling_factor == pytest.approx(vae.config["scaling_factor"])
