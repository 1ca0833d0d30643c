"""TAESD (AutoencoderTiny) in place of a pipeline's VAE against diffusers' pipelines given the
same autoencoder, and through the runtime's graphs."""

from __future__ import annotations

import json

import pytest
import torch

from fastdiff.models import AutoencoderTiny
from fastdiff.pipeline import Pipeline
from tests.models.test_tiny_vae import CONFIG, perturbed

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """A TAESD whose downscale factor fits the tiny SD folder's VAE (2)."""
    config = dict(CONFIG, encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8))
    config |= dict(num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1))
    reference = perturbed(diffusers.AutoencoderTiny(**config))
    folder = tmp_path_factory.mktemp("taesd-sd") / "vae"
    reference.save_pretrained(folder)
    return reference, folder


@pytest.mark.parametrize("img2img", [False, True], ids=["text-to-image", "img2img"])
def test_a_pipeline_with_taesd_equals_diffusers(sd_folder, tiny_sd, img2img):
    """vae= swaps the folder's autoencoder, as diffusers' vae= does: decoding the latents as
    they are (scaling factor 1.0) and, for img2img, encoding without a random draw."""
    reference_vae, folder = tiny_sd
    pipe = Pipeline.from_pretrained(sd_folder, vae=folder)
    assert isinstance(pipe.vae, AutoencoderTiny) and pipe.vae_scale_factor == 2
    cls = diffusers.StableDiffusionImg2ImgPipeline if img2img else diffusers.StableDiffusionPipeline
    reference = cls.from_pretrained(sd_folder, vae=reference_vae, safety_checker=None)
    reference.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a red cat", num_inference_steps=4, guidance_scale=5.0)
    if img2img:
        kwargs |= dict(image=torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
        kwargs |= dict(strength=0.75)
        sampler = {"sampler": "euler_ancestral"}  # step noise: the stream must line up
        reference.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(
            reference.scheduler.config
        )
    else:
        kwargs |= dict(height=16, width=16)
        sampler = {}
    theirs = reference(**kwargs, generator=torch.Generator().manual_seed(3), output_type="pt")
    ours = pipe(**kwargs, **sampler, seed=3, output_type="tensor", progress=False)
    torch.testing.assert_close(ours, theirs.images, atol=1e-4, rtol=0)


def test_a_vae_of_other_latents_is_refused(sd_folder, tmp_path):
    config = dict(CONFIG, latent_channels=3)
    diffusers.AutoencoderTiny(**config).save_pretrained(tmp_path / "vae")
    with pytest.raises(ValueError, match="latent_channels is 3"):
        Pipeline.from_pretrained(sd_folder, vae=tmp_path / "vae")
    with pytest.raises(ValueError, match="vae must be a component folder or a fastdiff"):
        Pipeline.from_pretrained(sd_folder, vae=object())


def test_taesd_decoding_through_the_runtime_equals_eager(sd_folder, tiny_sd):
    import fastdiff.runtime as runtime
    from tests.runtime.fake_graph import RecordingGraphBackend

    pipe = Pipeline.from_pretrained(sd_folder, vae=tiny_sd[1])
    pipe.unet.fold_conv_biases(True)
    kwargs = dict(prompt="a cat", height=16, width=16, num_inference_steps=3, progress=False)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    wanted = [pipe(**kwargs, seed=s, output_type="tensor") for s in (1, 2)]
    wanted_img2img = pipe(**kwargs, image=image, strength=0.7, seed=1, output_type="tensor")
    runtime.optimize(pipe, backend=RecordingGraphBackend(), verbose=False)
    for seed, want in zip((1, 2), wanted, strict=True):
        torch.testing.assert_close(
            pipe(**kwargs, seed=seed, output_type="tensor"), want, atol=1e-5, rtol=0
        )
    got = pipe(**kwargs, image=image, strength=0.7, seed=1, output_type="tensor")
    torch.testing.assert_close(got, wanted_img2img, atol=1e-5, rtol=0)


def test_vae_on_the_command_line(sd_folder, tiny_sd, tmp_path):
    import numpy as np
    from PIL import Image

    from fastdiff.cli import main

    out = tmp_path / "taesd.png"
    arguments = ["generate", "--model", str(sd_folder), "--prompt", "a cat", "--seed", "2"]
    arguments += ["--steps", "2", "--size", "16", "--vae", str(tiny_sd[1]), "--out", str(out)]
    assert main(arguments) == 0
    pipe = Pipeline.from_pretrained(sd_folder, vae=tiny_sd[1])
    api = pipe("a cat", seed=2, num_inference_steps=2, height=16, width=16, progress=False)[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(api))


def test_a_folder_without_its_own_vae_takes_the_one_given(sd_folder, tiny_sd, tmp_path):
    """With vae= the folder's vae/ is neither needed nor read (diffusers skips a component
    passed in); a model passed in moves to the pipeline's device and dtype."""
    import shutil

    folder = tmp_path / "no-vae"
    shutil.copytree(sd_folder, folder)
    shutil.rmtree(folder / "vae")
    pipe = Pipeline.from_pretrained(folder, vae=tiny_sd[1])
    assert isinstance(pipe.vae, AutoencoderTiny)
    model = AutoencoderTiny.from_pretrained(tiny_sd[1])
    pipe = Pipeline.from_pretrained(folder, vae=model, dtype=torch.float64)
    assert pipe.vae is model and next(model.parameters()).dtype == torch.float64


@pytest.mark.parametrize("problem", ["latent-channels", "text-encoder", "aesthetics"])
def test_a_vae_passed_in_is_left_as_it_was_when_loading_fails(sd_folder, tmp_path, problem):
    """The model passed as vae= was cast to the pipeline's dtype first, then the loading failed
    (its latent channels, or a broken text encoder later in the folder): the caller's model
    came back in another dtype with the error. Every check now runs before the cast."""
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(sd_folder, folder)
    config = dict(CONFIG, encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8))
    config |= dict(num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1))
    if problem == "latent-channels":
        config["latent_channels"] = 3
        message = "latent_channels is 3"
    elif problem == "text-encoder":
        (folder / "text_encoder" / "config.json").write_text("{not json")
        message = "cannot load CLIPTextModel"
    else:  # a refiner's flag on an SD folder: Pipeline refused it after the cast
        index = json.loads((folder / "model_index.json").read_text())
        (folder / "model_index.json").write_text(
            json.dumps({**index, "requires_aesthetics_score": True})
        )
        message = "requires_aesthetics_score"
    model = AutoencoderTiny(config)
    before = {name: p.clone() for name, p in model.state_dict().items()}
    with pytest.raises((ValueError, OSError), match=message):
        Pipeline.from_pretrained(folder, vae=model, dtype=torch.float16)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for name, p in model.state_dict().items():
        assert torch.equal(p, before[name]), name
