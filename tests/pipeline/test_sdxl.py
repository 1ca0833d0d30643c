"""SDXL-like pipeline (two CLIP text encoders, pooled embeddings and size "time ids" through the
U-Net's text_time embedding) against diffusers' StableDiffusionXLPipeline."""

from __future__ import annotations

import inspect

import pytest
import torch

from fastdiff.pipeline import Pipeline

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pipe(sdxl_folder):
    return Pipeline.from_pretrained(sdxl_folder)


@pytest.fixture(scope="module")
def reference(sdxl_folder):
    reference = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    reference.set_progress_bar_config(disable=True)
    return reference


@pytest.mark.parametrize("negative_prompt", [None, "blue dog"], ids=["zeros", "negative"])
def test_sdxl_prompts_equal_diffusers(pipe, reference, negative_prompt):
    """Without a negative prompt SDXL folders use all-zero unconditional embeddings
    (force_zeros_for_empty_prompt); with one, both encoders encode it."""
    assert pipe.force_zeros_for_empty_prompt and len(pipe.prompt_encoder.encoders) == 2
    latents = torch.randn(1, 4, 8, 12)
    kwargs = dict(
        prompt="a photo of a red cat",
        negative_prompt=negative_prompt,
        latents=latents,
        height=16,
        width=24,
        num_inference_steps=3,
        guidance_scale=6.0,
    )
    ours = pipe(**kwargs, output_type="tensor", progress=False)
    theirs = reference(**kwargs, output_type="pt").images
    assert ours.shape == (1, 3, 16, 24)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_sdxl_default_guidance_scale_is_the_diffusers_default(pipe, reference):
    """Without guidance_scale an SDXL folder samples at StableDiffusionXLPipeline's default, 5.0
    (SD 1.x/2.x pipelines: 7.5)."""
    assert pipe.defaults.guidance_scale == 5.0
    kwargs = dict(prompt="a red cat", latents=torch.randn(1, 4, 8, 8), height=16, width=16)
    ours = pipe(**kwargs, num_inference_steps=3, output_type="tensor", progress=False)
    theirs = reference(**kwargs, num_inference_steps=3, output_type="pt").images
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    at_7_5 = pipe(**kwargs, num_inference_steps=3, guidance_scale=7.5, output_type="tensor")
    assert (at_7_5 - theirs).abs().max() > 1e-3


def test_sdxl_without_force_zeros_key_uses_the_diffusers_default(sdxl_folder, tmp_path):
    """A model_index.json without force_zeros_for_empty_prompt gets the default of diffusers'
    StableDiffusionXLPipeline (true): all-zero unconditional embeddings."""
    import json
    import shutil

    folder = tmp_path / "no_key"
    shutil.copytree(sdxl_folder, folder)
    index = json.loads((folder / "model_index.json").read_text())
    del index["force_zeros_for_empty_prompt"]
    (folder / "model_index.json").write_text(json.dumps(index))
    reference = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    reference.set_progress_bar_config(disable=True)
    pipe = Pipeline.from_pretrained(folder)
    assert pipe.force_zeros_for_empty_prompt
    kwargs = dict(
        prompt="a red cat",
        latents=torch.randn(1, 4, 8, 8),
        num_inference_steps=3,
        guidance_scale=6.0,
        height=16,
        width=16,
    )
    ours = pipe(**kwargs, output_type="tensor", progress=False)
    theirs = reference(**kwargs, output_type="pt").images
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_sdxl_given_embeddings_need_pooled(pipe, reference):
    embeds, pooled = reference.encode_prompt("a cat", do_classifier_free_guidance=False)[::2]
    latents = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="needs pooled_prompt_embeds"):
        pipe(prompt_embeds=embeds, latents=latents, num_inference_steps=1, progress=False)
    # A pooled embedding of the wrong width is named as such (it used to be blamed on
    # refiner-style aesthetic-score conditioning).
    width = pooled.shape[-1]
    with pytest.raises(ValueError, match=f"pooled_prompt_embeds has {width + 4} features but "):
        pipe(
            prompt_embeds=embeds,
            pooled_prompt_embeds=torch.zeros(1, width + 4),
            latents=latents,
            guidance_scale=1.0,
            num_inference_steps=1,
            progress=False,
        )
    ours = pipe(
        prompt_embeds=embeds,
        pooled_prompt_embeds=pooled,
        latents=latents,
        guidance_scale=1.0,
        num_inference_steps=2,
        output_type="tensor",
        progress=False,
    )
    theirs = pipe(
        "a cat",
        latents=latents,
        guidance_scale=1.0,
        num_inference_steps=2,
        output_type="tensor",
        progress=False,
    )
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_sdxl_vae_stays_fp32_when_loaded_in_fp16(sdxl_folder):
    """The SDXL VAE overflows in fp16, and its config says force_upcast: the U-Net and text
    encoders load in fp16, the VAE in fp32."""
    pipe = Pipeline.from_pretrained(sdxl_folder, dtype=torch.float16)
    assert pipe.dtype == torch.float16
    assert next(pipe.vae.parameters()).dtype == torch.float32
    assert pipe.prompt_encoder.dtype == torch.float16


def test_sdxl_optimize_keeps_the_vae_fp32(sdxl_folder, monkeypatch):
    """optimize() casts the models to fp16 on CUDA (fastdiff generate calls it): the SDXL VAE
    must stay fp32 there too, or real SDXL images decode to NaN (black)."""
    import importlib

    runtime_optimize = importlib.import_module("fastdiff.runtime.optimize")  # the module
    casts = []
    monkeypatch.setattr(
        runtime_optimize,
        "prepare_module",
        lambda module, name, report, dtype, *args: casts.append((name, dtype)),
    )
    pipe = Pipeline.from_pretrained(sdxl_folder)
    monkeypatch.setattr(type(pipe), "device", property(lambda self: torch.device("cuda")))
    for options in ({}, {"dtype": torch.bfloat16}, {"vae_dtype": torch.bfloat16}):
        casts.clear()
        runtime_optimize.optimize(pipe, verbose=False, cuda_graphs=False, kernels=False, **options)
        unet_dtype = options.get("dtype", torch.float16)
        vae_dtype = options.get("vae_dtype", torch.float32 if unet_dtype == torch.float16 else None)
        assert casts == [("unet", unet_dtype), ("vae", vae_dtype or unet_dtype)]
    assert pipe.vae_dtype_for(torch.float16) == torch.float32
    assert pipe.vae_dtype_for(torch.bfloat16) == torch.bfloat16


@pytest.mark.parametrize(
    "class_name,scale,strength",
    [
        ("StableDiffusionXLPipeline", 5.0, None),
        ("StableDiffusionXLImg2ImgPipeline", 5.0, 0.3),
        ("StableDiffusionXLInpaintPipeline", 7.5, None),
        ("StableDiffusionPipeline", 7.5, None),
        ("StableDiffusionImg2ImgPipeline", 7.5, 0.8),
        (None, 7.5, None),
    ],
)
def test_call_defaults_per_pipeline_class(class_name, scale, strength):
    """guidance_scale (and img2img strength) as the diffusers class's __call__ defaults."""
    from fastdiff.pipeline.call_arguments import CallDefaults

    index = {"_class_name": class_name} if class_name else {}
    defaults = CallDefaults.for_folder(index, {"_class_name": "DDIMScheduler"})
    assert defaults.guidance_scale == scale and defaults.sampler == "ddim"
    if class_name is not None:
        parameters = inspect.signature(getattr(diffusers, class_name).__call__).parameters
        assert parameters["guidance_scale"].default == scale
        if strength is not None:
            assert parameters["strength"].default == strength == defaults.strength


def test_sdxl_img2img_default_strength_is_the_diffusers_default(sdxl_folder, pipe):
    """StableDiffusionXLImg2ImgPipeline's default strength is 0.3 (StableDiffusion's 0.8)."""
    assert pipe.defaults.strength == 0.3
    reference = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(sdxl_folder)
    reference.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 16, 16)
    kwargs = dict(prompt="a red cat", image=image, num_inference_steps=10, guidance_scale=6.0)
    ours = pipe(**kwargs, seed=4, output_type="tensor", progress=False)
    theirs = reference(**kwargs, generator=torch.Generator().manual_seed(4), output_type="pt")
    torch.testing.assert_close(ours, theirs.images, atol=1e-4, rtol=0)


def test_half_precision_pipelines_on_cpu(sdxl_folder, sd_folder):
    """dtype=float16: SDXL's VAE (force_upcast) stays float32 and SD's takes float16, as the
    diffusers pipelines run them; latents and images cross between the dtypes both ways
    (text-to-image decode, img2img encode) and the result is the U-Net's dtype."""
    common = dict(num_inference_steps=2, seed=0, progress=False)
    for folder, vae_dtype in ((sdxl_folder, torch.float32), (sd_folder, torch.float16)):
        pipe = Pipeline.from_pretrained(folder, dtype=torch.float16)
        assert pipe.dtype == torch.float16 and next(pipe.vae.parameters()).dtype == vae_dtype
        image = pipe("a cat", **common, output_type="tensor")
        assert image.dtype == torch.float32 and bool(torch.isfinite(image).all())
        latents = pipe("a cat", image=image[0], strength=0.5, **common, output_type="latent")
        assert latents.dtype == torch.float16 and bool(torch.isfinite(latents).all())


@pytest.mark.parametrize(
    "sizes",
    [
        dict(crops_coords_top_left=(4, 2)),
        dict(negative_original_size=(8, 8)),  # the negative target size defaults to the target
        dict(negative_target_size=(32, 8), original_size=(24, 24), crops_coords_top_left=(1, 3)),
        dict(negative_original_size=(8, 8), negative_target_size=(8, 16)),
    ],
)
def test_sdxl_img2img_micro_conditioning_equals_diffusers(sdxl_folder, pipe, sizes):
    """With an image, the unconditional batch's ids are made as diffusers' SDXL img2img pipeline
    makes them: each negative size defaults to its positive one, and the crop is the positive
    crop (a negative crop, which it ignores, is refused)."""
    reference = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(sdxl_folder)
    reference.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    kwargs = dict(prompt="a red cat", image=image, num_inference_steps=10, guidance_scale=6.0)
    kwargs |= dict(strength=0.6, **sizes)
    ours = pipe(**kwargs, seed=4, output_type="tensor", progress=False)
    generator = torch.Generator().manual_seed(4)
    theirs = reference(**kwargs, generator=generator, output_type="pt").images
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="negative_crops_coords_top_left: diffusers' SDXL img2img"):
        pipe(**kwargs, negative_crops_coords_top_left=(1, 1), progress=False)
