"""Class-conditional pipeline (no text encoder; the last class label is the null class used for
guidance) against a DDIM loop written with diffusers' U-Net, VAE and DDIMScheduler."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fastdiff.pipeline import Pipeline
from tests.pipeline.folders import UNetCallCounter, make_class_folder

diffusers = pytest.importorskip("diffusers")

NUM_CLASSES = 3


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory):
    return make_class_folder(tmp_path_factory.mktemp("cls") / "pipe", NUM_CLASSES)


@pytest.fixture(scope="module")
def pipe(class_folder):
    return Pipeline.from_pretrained(class_folder)


def diffusers_reference(folder, labels, latents, steps, guidance_scale):
    """Guided DDIM with the null label as the unconditional input, in diffusers' modules."""
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae").eval()
    scheduler = diffusers.DDIMScheduler.from_pretrained(folder / "scheduler")
    scheduler.set_timesteps(steps)
    null = torch.full_like(labels, NUM_CLASSES)
    x = latents
    with torch.no_grad():
        for t in scheduler.timesteps:
            output = unet(torch.cat([x, x]), t, None, class_labels=torch.cat([null, labels])).sample
            uncond, cond = output.chunk(2)
            x = scheduler.step(uncond + guidance_scale * (cond - uncond), t, x).prev_sample
        decoded = vae.decode(x / vae.config.scaling_factor).sample
    return (decoded / 2 + 0.5).clamp(0, 1)


def test_reads_null_class_and_names(pipe):
    assert pipe.is_class_conditional and not pipe.is_text_conditional
    assert pipe.num_classes == NUM_CLASSES and pipe.null_class_label == NUM_CLASSES
    assert pipe.class_names == ["class-0", "class-1", "class-2"]


def test_class_conditional_call_equals_diffusers_loop(class_folder, pipe):
    latents = torch.randn(4, 4, 8, 8)
    counter = UNetCallCounter(pipe)
    try:
        ours = pipe(
            class_labels=[2, 0],
            num_images=2,
            latents=latents,
            num_inference_steps=4,
            guidance_scale=3.0,
            output_type="tensor",
            progress=False,
        )
    finally:
        pipe.unet.forward = counter.original
    assert counter.batches == [8] * 4  # one batched [uncond; cond] forward per step
    labels = torch.tensor([2, 2, 0, 0])
    theirs = diffusers_reference(class_folder, labels, latents, 4, 3.0)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    # The class matters.
    other = pipe(
        class_labels=[1, 1],
        num_images=2,
        latents=latents,
        num_inference_steps=4,
        guidance_scale=3.0,
        output_type="tensor",
        progress=False,
    )
    assert (other - ours).abs().max() > 1e-3


def test_null_class_label_comes_from_model_index(class_folder, tmp_path):
    folder = tmp_path / "first-null"
    folder.mkdir()
    for name in ("unet", "vae", "scheduler"):
        (folder / name).symlink_to(class_folder / name)
    index = json.loads((class_folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "null_class_label": 0}))
    pipe = Pipeline.from_pretrained(folder)
    assert pipe.null_class_label == 0
    assert pipe(class_labels=3, num_inference_steps=1, output_type="latent", progress=False).shape
    with pytest.raises(ValueError, match="label 0 is the null class"):
        pipe(class_labels=0, num_inference_steps=1, progress=False)
    (folder / "model_index.json").write_text(json.dumps({**index, "null_class_label": 4}))
    with pytest.raises(ValueError, match=r"null_class_label must be an int in \[0, 4\)"):
        Pipeline.from_pretrained(folder)
    # JSON true is a Python bool, an int subclass: it used to make class 1 the null class.
    (folder / "model_index.json").write_text(json.dumps({**index, "null_class_label": True}))
    with pytest.raises(ValueError, match=r"null_class_label must be an int .*got True"):
        Pipeline.from_pretrained(folder)
    (folder / "model_index.json").write_text(json.dumps({**index, "class_names": ["a", "b"]}))
    with pytest.raises(ValueError, match="class_names has 2 names but the U-Net has 3 classes"):
        Pipeline.from_pretrained(folder)
    # Left out: the last label (num_class_embeds - 1), from the folder and in a Pipeline built
    # from its parts.
    without = {key: value for key, value in index.items() if key != "null_class_label"}
    (folder / "model_index.json").write_text(json.dumps(without))
    loaded = Pipeline.from_pretrained(folder)
    assert loaded.null_class_label == NUM_CLASSES
    built = Pipeline(loaded.unet, loaded.vae, loaded.schedule)
    assert built.null_class_label == NUM_CLASSES


def test_missing_sample_size_asks_for_height_and_width(class_folder, tmp_path):
    folder = tmp_path / "no-sample-size"
    folder.mkdir()
    for name in ("vae", "scheduler", "model_index.json"):
        (folder / name).symlink_to(class_folder / name)
    shutil.copytree(class_folder / "unet", folder / "unet")
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "sample_size": None}))
    pipe = Pipeline.from_pretrained(folder)
    with pytest.raises(ValueError, match="sample_size is None.*pass height and width"):
        pipe(class_labels=0, num_inference_steps=1, progress=False)
    latents = pipe(
        class_labels=0,
        height=8,
        width=8,
        num_inference_steps=1,
        output_type="latent",
        progress=False,
    )
    assert latents.shape == (1, 4, 4, 4)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(), r"pass class_labels \(0..2\)"),
        (dict(class_labels=3), r"class label 3 out of range: this model has 3 classes \(0..2\)"),
        (dict(class_labels=[0, -1]), "class label -1 out of range"),
        (dict(class_labels=1.5), "class labels must be ints, got 1.5"),
        (dict(class_labels=[]), "class_labels must not be empty"),
        (dict(class_labels=torch.zeros(2, 2)), r"scalar or 1-D tensor, got shape \(2, 2\)"),
        (dict(class_labels=1, prompt="a cat"), "class-conditional and has no text encoder"),
    ],
)
def test_class_input_errors(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe(**kwargs, num_inference_steps=1, progress=False)
