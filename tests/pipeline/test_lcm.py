"""Latent consistency model folders (LatentConsistencyModelPipeline: a U-Net that takes the
guidance scale in its time embedding, LCMScheduler) against diffusers."""

from __future__ import annotations

import pytest
import torch

from fastdiff.pipeline import Pipeline
from tests.pipeline.folders import UNetCallCounter, make_sd_folder

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def lcm_folder(tmp_path_factory):
    return make_sd_folder(tmp_path_factory.mktemp("lcm") / "pipe", lcm=True)


@pytest.fixture(scope="module")
def pipe(lcm_folder):
    return Pipeline.from_pretrained(lcm_folder)


@pytest.fixture(scope="module")
def reference(lcm_folder):
    reference = diffusers.LatentConsistencyModelPipeline.from_pretrained(
        lcm_folder, safety_checker=None
    )
    reference.set_progress_bar_config(disable=True)
    return reference


def test_the_folder_defaults_are_diffusers(pipe, reference):
    import inspect

    parameters = inspect.signature(type(reference).__call__).parameters
    assert pipe.defaults.sampler == "lcm"
    assert pipe.defaults.guidance_scale == parameters["guidance_scale"].default == 8.5
    assert pipe.defaults.num_inference_steps == parameters["num_inference_steps"].default == 4


CASES = {
    "defaults": {},  # 4 steps, w = 8.5 embedded
    "guidance-steps": dict(guidance_scale=3.0, num_inference_steps=6),
    "num-images": dict(num_images=2, guidance_scale=1.0),
    "one-step": dict(num_inference_steps=1),
}


@pytest.mark.parametrize("extra", CASES.values(), ids=CASES.keys())
def test_lcm_folder_equals_diffusers(pipe, reference, extra):
    kwargs = dict(prompt="a red cat", height=16, width=16) | extra
    theirs_kwargs = dict(kwargs)
    if "num_images" in theirs_kwargs:
        theirs_kwargs["num_images_per_prompt"] = theirs_kwargs.pop("num_images")
    generator = torch.Generator().manual_seed(4)
    theirs = reference(**theirs_kwargs, generator=generator, output_type="pt").images
    ours = pipe(**kwargs, seed=4, output_type="tensor", progress=False)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_the_guidance_scale_is_embedded_one_forward_per_step(pipe):
    counter = UNetCallCounter(pipe)
    kwargs = dict(height=16, width=16, seed=1, output_type="tensor", progress=False)
    strong = pipe("a cat", **kwargs, guidance_scale=8.0)
    assert counter.batches == [1] * 4  # no [uncond; cond] batch: w rides in the embedding
    weak = pipe("a cat", **kwargs, guidance_scale=2.0)
    assert (strong - weak).abs().max() > 1e-3


def test_an_lcm_unet_in_a_plain_sd_pipeline_equals_diffusers(lcm_folder, pipe):
    """diffusers' StableDiffusionPipeline, too, embeds the scale for such a U-Net instead of
    running guidance."""
    reference = diffusers.StableDiffusionPipeline.from_pretrained(lcm_folder, safety_checker=None)
    reference.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a red cat", height=16, width=16, guidance_scale=5.0)
    kwargs |= dict(num_inference_steps=3)
    theirs = reference(**kwargs, generator=torch.Generator().manual_seed(2), output_type="pt")
    ours = pipe(**kwargs, seed=2, output_type="tensor", progress=False)
    torch.testing.assert_close(ours, theirs.images, atol=1e-4, rtol=0)


def test_guidance_rescale_is_refused_for_an_embedded_scale(pipe):
    with pytest.raises(ValueError, match="guidance_rescale rescales classifier-free guidance"):
        pipe("a cat", guidance_rescale=0.5, height=16, width=16, progress=False)


def test_the_lcm_folder_through_the_runtime_equals_eager(lcm_folder):
    """The embedding rides in the condition: one whole-loop graph for 4 steps, replayed for
    another guidance scale."""
    import fastdiff.runtime as runtime
    from tests.runtime.fake_graph import RecordingGraphBackend

    pipe = Pipeline.from_pretrained(lcm_folder)
    pipe.unet.fold_conv_biases(True)  # as optimize() leaves it, so eager does the same sums
    kwargs = dict(prompt="a cat", height=16, width=16, seed=2, progress=False)
    scales = (8.5, 3.0)
    wanted = [pipe(**kwargs, guidance_scale=w, output_type="tensor") for w in scales]
    rt = runtime.optimize(pipe, backend=RecordingGraphBackend(), verbose=False)
    for w, want in zip(scales, wanted, strict=True):
        got = pipe(**kwargs, guidance_scale=w, output_type="tensor")
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    loops = [key for key in rt.cache.entries if key.kind == "loop"]
    assert len(loops) == 1 and loops[0].steps == 4 and not loops[0].guidance


@pytest.mark.parametrize(
    "strength", [None, 0.5, 1.0, 0.2], ids=["default-0.8", "0.5", "1.0", "below-1/steps"]
)
def test_lcm_img2img_equals_diffusers(lcm_folder, pipe, strength):
    """LatentConsistencyModelImg2ImgPipeline runs every step, within the strength's share of the
    distillation schedule (not the last int(steps * strength) steps of the full one)."""
    reference = diffusers.LatentConsistencyModelImg2ImgPipeline.from_pretrained(
        lcm_folder, safety_checker=None
    )
    reference.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    kwargs = dict(prompt="a red cat", image=image, guidance_scale=6.0)
    if strength is not None:
        kwargs["strength"] = strength
    theirs = reference(**kwargs, generator=torch.Generator().manual_seed(5), output_type="pt")
    counter = UNetCallCounter(pipe)
    ours = pipe(**kwargs, seed=5, output_type="tensor", progress=False)
    assert len(counter.batches) == 4
    torch.testing.assert_close(ours, theirs.images, atol=1e-4, rtol=0)


def test_lcm_img2img_through_the_runtime_equals_eager(lcm_folder):
    import fastdiff.runtime as runtime
    from tests.runtime.fake_graph import RecordingGraphBackend

    pipe = Pipeline.from_pretrained(lcm_folder)
    pipe.unet.fold_conv_biases(True)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    kwargs = dict(prompt="a cat", image=image, seed=2, output_type="tensor", progress=False)
    strengths = (0.5, 0.9)
    wanted = [pipe(**kwargs, strength=s) for s in strengths]
    assert (wanted[0] - wanted[1]).abs().max() > 1e-3
    rt = runtime.optimize(pipe, backend=RecordingGraphBackend(), verbose=False)
    for strength, want in zip(strengths, wanted, strict=True):
        torch.testing.assert_close(pipe(**kwargs, strength=strength), want, atol=1e-5, rtol=0)
    assert len([key for key in rt.cache.entries if key.kind == "loop"]) == 1


def test_lcm_img2img_folders_and_cuts(tmp_path):
    """A folder saved from LatentConsistencyModelImg2ImgPipeline takes the same defaults, and
    denoising_end cuts on the timesteps the strength selects (499, 379, 259, 139 at 0.5)."""
    from fastdiff.pipeline.call_arguments import CallDefaults

    defaults = CallDefaults.for_folder(
        {"_class_name": "LatentConsistencyModelImg2ImgPipeline"}, {"_class_name": "LCMScheduler"}
    )
    assert defaults.lcm_img2img and defaults.num_inference_steps == 4
    assert (defaults.sampler, defaults.guidance_scale) == ("lcm", 8.5)
    pipe = Pipeline.from_pretrained(make_sd_folder(tmp_path / "lcm", lcm=True))
    counter = UNetCallCounter(pipe)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    kwargs = dict(image=image, strength=0.5, output_type="latent", progress=False)
    pipe("a cat", **kwargs, denoising_end=0.6)  # the cut-off t = 400: 499 only
    assert len(counter.batches) == 1
    with pytest.raises(ValueError, match="keeps 2 of the lcm sampler's .* fewer than the 4"):
        pipe("a cat", image=image, strength=0.05, progress=False)


def test_tcd_with_gamma_equals_diffusers(sd_folder, tmp_path):
    """A TCDScheduler folder samples with tcd; eta= is its gamma, as diffusers' pipelines pass
    eta to TCDScheduler.step (stochastic for gamma > 0)."""
    import json
    import shutil

    folder = tmp_path / "tcd"
    shutil.copytree(sd_folder, folder)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = {**json.loads(config_path.read_text()), "_class_name": "TCDScheduler"}
    config_path.write_text(json.dumps(config))
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "TCDScheduler"]
    (folder / "model_index.json").write_text(json.dumps(index))
    pipe = Pipeline.from_pretrained(folder)
    assert pipe.defaults.sampler == "tcd"
    reference = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    reference.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a red cat", height=16, width=16, num_inference_steps=4, eta=0.3)
    kwargs |= dict(guidance_scale=2.0, latents=torch.randn(1, 4, 8, 8))
    theirs = reference(**kwargs, generator=torch.Generator().manual_seed(6), output_type="pt")
    ours = pipe(**kwargs, seed=6, output_type="tensor", progress=False)
    torch.testing.assert_close(ours, theirs.images, atol=1e-4, rtol=0)
