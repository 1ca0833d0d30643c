"""Text-to-image Pipeline against diffusers' StableDiffusionPipeline on a tiny random-weight
SD1-like folder (written by diffusers' save_pretrained), plus the pipeline's input checks."""

from __future__ import annotations

import json
import shutil
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff.pipeline import Pipeline
from fastdiff.pipeline.call_arguments import CallDefaults
from tests.pipeline.folders import UNetCallCounter, make_sd_folder

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

STEPS = 4


@pytest.fixture(scope="module")
def pipe(sd_folder):
    return Pipeline.from_pretrained(sd_folder)


@pytest.fixture(scope="module")
def reference(sd_folder):
    reference = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None)
    reference.set_progress_bar_config(disable=True)
    return reference


def test_loads_components(pipe):
    assert pipe.prompt_encoder is not None and not pipe.is_class_conditional
    assert pipe.vae_scale_factor == 2 and pipe.default_size == (16, 16)
    assert pipe.defaults == CallDefaults(guidance_scale=7.5, sampler="ddim", strength=0.8)
    assert pipe.schedule.beta_schedule == "scaled_linear" and pipe.schedule.steps_offset == 1


def test_prompt_embeddings_call_equals_diffusers(pipe, reference):
    latents = torch.randn(2, 4, 8, 8)
    embeds, negative = torch.randn(2, 16, 32), torch.randn(2, 16, 32)
    ours = pipe(
        prompt_embeds=embeds,
        negative_prompt_embeds=negative,
        latents=latents,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        output_type="tensor",
        progress=False,
    )
    theirs = reference(
        prompt_embeds=embeds,
        negative_prompt_embeds=negative,
        latents=latents,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        output_type="pt",
    ).images
    assert ours.shape == (2, 3, 16, 16) and ours.dtype == torch.float32
    assert 0 <= ours.min() and ours.max() <= 1 and ours.std() > 0.05
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    # Without negative embeddings the unconditional input is the encoded empty prompt.
    common = dict(prompt_embeds=embeds, latents=latents, num_inference_steps=STEPS)
    ours = pipe(**common, output_type="tensor", progress=False)
    theirs = reference(**common, output_type="pt").images
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_prompts_through_text_encoder_equal_diffusers(pipe, reference):
    """Tokenizer + CLIP text encoder, negative prompts, two images per prompt, guidance rescale."""
    latents = torch.randn(4, 4, 8, 8)
    kwargs = dict(
        prompt=["a photo of a cat", "red dog"],
        negative_prompt=["blue", "cat"],
        latents=latents,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        guidance_rescale=0.7,
    )
    ours = pipe(**kwargs, num_images=2, output_type="tensor", progress=False)
    theirs = reference(**kwargs, num_images_per_prompt=2, output_type="pt").images
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    # The prompt matters: the same noise under another prompt gives another image.
    other = pipe(
        **{**kwargs, "prompt": ["blue cat", "a dog"]},
        num_images=2,
        output_type="tensor",
        progress=False,
    )
    assert (other - ours).abs().max() > 1e-3


def test_guidance_scale_one_runs_single_forward_and_equals_diffusers(pipe, reference):
    counter = UNetCallCounter(pipe)
    latents = torch.randn(1, 4, 8, 8)
    try:
        ours = pipe(
            "a cat",
            latents=latents,
            num_inference_steps=STEPS,
            guidance_scale=1.0,
            output_type="tensor",
            progress=False,
        )
    finally:
        pipe.unet.forward = counter.original
    assert counter.batches == [1] * STEPS
    theirs = reference(
        "a cat", latents=latents, num_inference_steps=STEPS, guidance_scale=1.0, output_type="pt"
    ).images
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_output_types_seed_and_size(pipe):
    common = dict(prompt="a cat", num_inference_steps=2, progress=False)
    images = pipe(**common, seed=3, num_images=2, height=24, width=16)
    assert len(images) == 2 and all(isinstance(image, Image.Image) for image in images)
    assert images[0].size == (16, 24)
    latents = pipe(**common, seed=3, output_type="latent")
    assert latents.shape == (1, 4, 8, 8)
    torch.testing.assert_close(pipe(**common, seed=3, output_type="latent"), latents)
    assert (pipe(**common, seed=4, output_type="latent") - latents).abs().max() > 1e-3
    # PIL output is the tensor output rounded to 8 bits.
    tensor = pipe(**common, seed=3, output_type="tensor")
    (pil,) = pipe(**common, seed=3)
    pixels = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 255
    assert (pixels - tensor[0]).abs().max() <= 0.5 / 255 + 1e-6
    # "np" is diffusers' layout: float32 (B, H, W, 3).
    array = pipe(**common, seed=3, output_type="np")
    assert isinstance(array, np.ndarray) and array.dtype == np.float32
    np.testing.assert_array_equal(array, tensor.permute(0, 2, 3, 1).numpy())


def test_np_output_equals_diffusers(pipe, reference):
    common = dict(prompt="a cat", num_inference_steps=3, latents=torch.randn(1, 4, 8, 8))
    ours = pipe(**common, output_type="np", progress=False)
    theirs = reference(**common, output_type="np").images
    assert ours.shape == theirs.shape == (1, 16, 16, 3)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(prompt="a cat", height=15), "height=15 is not a multiple of the VAE"),
        (dict(prompt="a cat", width=0), "width must be a positive int"),
        (dict(prompt="a cat", sampler="dpm2"), "unknown sampler 'dpm2'; allowed values: ddpm"),
        (dict(prompt="a cat", output_type="numpy"), "unknown output_type 'numpy'"),
        (dict(), "pass prompt or prompt_embeds"),
        (dict(prompt="a", prompt_embeds=torch.zeros(1, 16, 32)), "exactly one of prompt"),
        (dict(prompt="a cat", class_labels=1), "not class-conditional"),
        (dict(prompt="a cat", latents=torch.zeros(1, 4, 4, 4)), r"latents must have shape \(1,"),
        (dict(prompt="a cat", num_images=0), "num_images must be a positive int"),
        (dict(prompt="a cat", seed=1, generator=torch.Generator()), "seed or generator"),
        (
            dict(prompt="a cat", generator=[torch.Generator()]),
            "generator must be one torch.Generator",
        ),
        (dict(prompt_embeds=torch.zeros(1, 16)), "prompt_embeds must be a 3-D tensor"),
        (
            dict(
                prompt_embeds=torch.zeros(1, 16, 32), negative_prompt_embeds=torch.zeros(2, 16, 32)
            ),
            r"negative_prompt_embeds has shape \(2, 16, 32\)",
        ),
        (dict(prompt=["a", "b"], negative_prompt=["a", "b", "c"]), "3 entries but there are 2"),
        (dict(prompt="a cat", eta=0.5, sampler="euler"), "eta applies to the 'ddim' and 'tcd'"),
        # NaN compares false with 1: it used to switch guidance off and return an image.
        (dict(prompt="a cat", guidance_scale=float("nan")), "guidance_scale must be a finite"),
        (dict(prompt="a cat", guidance_scale="7.5"), "guidance_scale must be a finite"),
        (dict(prompt="a cat", seed="0"), "seed must be an int, got '0'"),
        (dict(prompt="a cat", seed=2**70), r"seed must lie in \[-2\*\*63, 2\*\*64\)"),
        (dict(prompt="a cat", latents=[[0.0]]), "latents must be a floating-point tensor"),
        (dict(prompt="a cat", latents=torch.full((1, 4, 8, 8), float("nan"))), "NaN or inf"),
        (
            dict(prompt_embeds=torch.zeros(1, 16, 48), guidance_scale=1.0),
            r"prompt_embeds has 48 features but this U-Net takes 32 \(cross_attention_dim\)",
        ),
        # Guided, the negative made from "" used to be blamed (negative_prompt_embeds has shape).
        (
            dict(prompt_embeds=torch.zeros(1, 16, 48)),
            r"^prompt_embeds has 48 features but this U-Net takes 32 \(cross_attention_dim\)",
        ),
        # Checked with guidance off too (the optimized runtime refused it, the eager loop not).
        (dict(prompt="a cat", guidance_scale=1.0, guidance_rescale=1.5), r"must lie in \[0, 1\]"),
        (dict(prompt="a cat", guidance_rescale="0.5"), "guidance_rescale must be a number"),
        (dict(prompt="a cat", guidance_rescale=float("nan")), r"must lie in \[0, 1\]"),
        # Text-to-image has no strength: strength=7 used to be ignored without a word.
        (dict(prompt="a cat", strength=7), "strength=7 is only used with image="),
        # The empty negative prompt cannot be encoded to more tokens than the text encoder reads
        # (16 here, 77 for CLIP): it failed inside transformers, with no hint of the fix.
        (
            dict(prompt_embeds=torch.zeros(1, 200, 32)),
            r"reads at most 16 .*need negative_prompt_embeds as well",
        ),
        # Only SDXL's U-Net reads a pooled embedding: here it used to be dropped silently.
        (
            dict(prompt="a cat", pooled_prompt_embeds=torch.zeros(1, 32)),
            "pooled_prompt_embeds given, but this U-Net takes no pooled text embedding",
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe(**kwargs, num_inference_steps=2, progress=False)


def test_a_prompt_longer_than_the_encoder_reads_warns_with_the_dropped_words(pipe):
    limit = pipe.prompt_encoder.encoders[0][0].model_max_length
    prompt = " ".join(["cat"] * limit + ["zebra"])
    with pytest.warns(UserWarning, match=r"prompt truncated to .* dropped: '.*zebra'"):
        pipe(prompt, num_inference_steps=1, guidance_scale=1.0, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe("a cat", num_inference_steps=1, guidance_scale=1.0, progress=False)
        # Exactly as many tokens as the encoder reads (with the start and end tokens): nothing
        # is dropped, so no warning.
        pipe(" ".join(["cat"] * (limit - 2)), num_inference_steps=1, progress=False)
    # The first dropped token is named: the one right after the limit, with nothing before it.
    with pytest.warns(UserWarning, match=r"dropped: 'zebra'"):
        pipe(" ".join(["cat"] * (limit - 2) + ["zebra"]), num_inference_steps=1, progress=False)


def test_prompt_embeds_of_another_dtype_are_converted(pipe):
    """Embeddings given in float64 run as the U-Net's float32, the same image as float32 ones."""
    embeds, negative = torch.randn(1, 16, 32), torch.randn(1, 16, 32)
    common = dict(num_inference_steps=2, seed=0, output_type="latent", progress=False)
    want = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, **common)
    got = pipe(prompt_embeds=embeds.double(), negative_prompt_embeds=negative.double(), **common)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_folder_errors_name_the_path(sd_folder, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="pipeline folder not found"):
        Pipeline.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        Pipeline.from_pretrained(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text((sd_folder / "model_index.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"lists 'unet' but the folder .*broken/unet"):
        Pipeline.from_pretrained(broken)
    for name in ("unet", "vae", "scheduler"):
        (broken / name).symlink_to(sd_folder / name)
    (broken / "model_index.json").write_text("{not json")
    with pytest.raises(ValueError, match="model_index.json is not valid JSON"):
        Pipeline.from_pretrained(broken)
    index = json.loads((sd_folder / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps({**index, "requires_aesthetics_score": 1}))
    with pytest.raises(ValueError, match="requires_aesthetics_score must be true or false"):
        Pipeline.from_pretrained(broken)
    (broken / "model_index.json").write_text(
        json.dumps({**index, "force_zeros_for_empty_prompt": "false"})  # would read as true
    )
    with pytest.raises(ValueError, match="force_zeros_for_empty_prompt must be true or false"):
        Pipeline.from_pretrained(broken)
    (broken / "model_index.json").write_text((sd_folder / "model_index.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"lists 'tokenizer' but .*broken/tokenizer"):
        Pipeline.from_pretrained(broken)

    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    with pytest.raises(RuntimeError, match=r"pip install 'fastdiff\[text\]'"):
        Pipeline.from_pretrained(sd_folder)


def test_broken_text_components_name_their_folder(sd_folder, tmp_path):
    folder = tmp_path / "broken-text"
    folder.mkdir()
    for item in sd_folder.iterdir():
        if item.name not in ("tokenizer", "text_encoder"):
            (folder / item.name).symlink_to(item)
    (folder / "tokenizer").mkdir()  # empty: transformers still builds a 2-token tokenizer
    shutil.copytree(sd_folder / "text_encoder", folder / "text_encoder")
    with pytest.raises(ValueError, match=r"broken-text/tokenizer: the tokenizer has no vocab"):
        Pipeline.from_pretrained(folder)
    shutil.rmtree(folder / "tokenizer")
    (folder / "tokenizer").symlink_to(sd_folder / "tokenizer")
    weights = folder / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    with pytest.raises(ValueError, match=r"cannot load CLIPTextModel from .*broken-text/text_enc"):
        Pipeline.from_pretrained(folder)


def test_fp16_variant_folder_loads_every_component(pipe, reference, tmp_path):
    """A folder holding only ``*.fp16.safetensors`` files (diffusers' variant naming) loads with
    variant="fp16" for the U-Net, VAE and text encoder alike, and gives the same images."""
    folder = tmp_path / "variant"
    reference.save_pretrained(folder, variant="fp16")
    assert (folder / "text_encoder" / "model.fp16.safetensors").is_file()
    assert not (folder / "unet" / "diffusion_pytorch_model.safetensors").exists()
    loaded = Pipeline.from_pretrained(folder, variant="fp16")
    common = dict(
        prompt="a cat", num_inference_steps=2, seed=0, output_type="tensor", progress=False
    )
    torch.testing.assert_close(loaded(**common), pipe(**common), atol=1e-6, rtol=0)


def test_progress_bar_can_be_turned_off(pipe, capsys):
    pipe("a cat", num_inference_steps=3, seed=0, output_type="latent", progress=True)
    assert "sampling" in capsys.readouterr().err
    pipe("a cat", num_inference_steps=3, seed=0, output_type="latent", progress=False)
    assert "sampling" not in capsys.readouterr().err


def test_sd2_like_v_prediction_equals_diffusers(tmp_path):
    folder = make_sd_folder(tmp_path / "sd2", sd2=True)
    reference = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    reference.set_progress_bar_config(disable=True)
    pipe = Pipeline.from_pretrained(folder)
    assert pipe.schedule.prediction_type == "v_prediction"
    kwargs = dict(prompt="a red cat", latents=torch.randn(1, 4, 8, 8), num_inference_steps=STEPS)
    ours = pipe(**kwargs, output_type="tensor", progress=False)
    theirs = reference(**kwargs, output_type="pt").images
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "outdated", [{"steps_offset": 0}, {"clip_sample": True}], ids=["steps_offset", "clip_sample"]
)
def test_outdated_scheduler_config_is_sampled_as_diffusers_does(sd_folder, tmp_path, outdated):
    """diffusers' StableDiffusionPipeline samples an SD folder whose scheduler config has
    steps_offset != 1 or clip_sample = true with steps_offset=1 and clip_sample=False."""
    import json
    import shutil

    folder = tmp_path / "outdated"
    shutil.copytree(sd_folder, folder)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **outdated}))
    reference = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    reference.set_progress_bar_config(disable=True)
    pipe = Pipeline.from_pretrained(folder)
    assert pipe.schedule.steps_offset == 1
    kwargs = dict(prompt="a red cat", latents=torch.randn(1, 4, 8, 8), num_inference_steps=STEPS)
    ours = pipe(**kwargs, output_type="tensor", progress=False)
    theirs = reference(**kwargs, output_type="pt").images
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "class_name,overrides,sampler",
    [
        ("EulerDiscreteScheduler", {}, "euler"),
        ("EulerAncestralDiscreteScheduler", {}, "euler_ancestral"),
        ("DPMSolverMultistepScheduler", {}, "dpmpp_2m"),
        ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "dpmpp_2m_karras"),
        ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, "dpmpp_2m_sde"),
        ("LCMScheduler", {}, "lcm"),
        ("TCDScheduler", {}, "tcd"),
        ("DPMSolverMultistepScheduler", {"solver_order": 3}, "dpmpp_3m"),
        ("HeunDiscreteScheduler", {}, "heun"),
        ("KDPM2DiscreteScheduler", {}, "kdpm2"),
        ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}, "kdpm2_karras"),
        ("KDPM2AncestralDiscreteScheduler", {}, "kdpm2_ancestral"),
        ("PNDMScheduler", {"skip_prk_steps": True}, "pndm"),  # SD 1.x folders' own
        ("LMSDiscreteScheduler", {}, "lms"),
        ("UniPCMultistepScheduler", {}, "unipc"),
        ("UniPCMultistepScheduler", {"use_karras_sigmas": True}, "unipc_karras"),
    ],
)
def test_a_call_without_sampler_runs_the_folders_scheduler(
    sd_folder, tmp_path, class_name, overrides, sampler
):
    """The default sampler is the one equal to the folder's scheduler (as the diffusers pipeline
    loaded from it samples); e.g. community checkpoints ship DPM-Solver++ with Karras sigmas."""
    import json
    import shutil

    folder = tmp_path / "folder"
    shutil.copytree(sd_folder, folder)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = {**json.loads(config_path.read_text()), "_class_name": class_name, **overrides}
    del config["clip_sample"], config["set_alpha_to_one"]  # DDIM's keys
    config_path.write_text(json.dumps(config))
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", class_name]
    (folder / "model_index.json").write_text(json.dumps(index))
    reference = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    assert type(reference.scheduler).__name__ == class_name
    reference.set_progress_bar_config(disable=True)
    pipe = Pipeline.from_pretrained(folder)
    assert pipe.defaults.sampler == sampler
    # (3M runs its third order only from the third step to the last but two: 6 steps)
    steps = 6 if sampler == "dpmpp_3m" else STEPS
    kwargs = dict(prompt="a red cat", latents=torch.randn(1, 4, 8, 8), num_inference_steps=steps)
    theirs = reference(**kwargs, output_type="pt", generator=torch.Generator().manual_seed(3))
    ours = pipe(**kwargs, seed=3, output_type="tensor", progress=False)
    torch.testing.assert_close(ours, theirs.images, atol=1e-4, rtol=0)
    # (DDIM at eta 0 is Euler's method in other coordinates: compare with a sampler that differs.)
    contrast = {
        "dpmpp_2m": "euler",
        "euler": "dpmpp_2m",
        "lcm": "ddpm",
        "tcd": "lcm",
        "unipc": "dpmpp_2m",
        "dpmpp_3m": "dpmpp_2m",
        "heun": "euler",
        "kdpm2": "heun",
        "kdpm2_karras": "heun_karras",
        "kdpm2_ancestral": "kdpm2",
        "pndm": "ddim",
        "lms": "euler",
    }.get(sampler, sampler.rsplit("_", 1)[0])
    # (dpmpp_2m_sde's contrast, dpmpp_2m, differs by the SDE's noise and decay.)
    other = pipe(**kwargs, seed=3, sampler=contrast, output_type="tensor", progress=False)
    assert (other - theirs.images).abs().max() > 1e-3


def test_euler_karras_folder_equals_diffusers(sd_folder, tmp_path):
    """An EulerDiscreteScheduler folder with Karras sigmas defaults to euler_karras: diffusers'
    noise levels, the U-Net at the same fractional timesteps; the images agree, text-to-image
    and img2img."""
    import json
    import shutil

    folder = tmp_path / "euler_karras"
    shutil.copytree(sd_folder, folder)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = {**json.loads(config_path.read_text()), "_class_name": "EulerDiscreteScheduler"}
    del config["clip_sample"], config["set_alpha_to_one"]
    config_path.write_text(json.dumps({**config, "use_karras_sigmas": True}))
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "EulerDiscreteScheduler"]
    (folder / "model_index.json").write_text(json.dumps(index))
    pipe = Pipeline.from_pretrained(folder)
    assert pipe.defaults.sampler == "euler_karras"
    for cls, extra in (
        (diffusers.StableDiffusionPipeline, dict(latents=torch.randn(1, 4, 8, 8))),
        (diffusers.StableDiffusionImg2ImgPipeline, dict(image=torch.rand(1, 3, 16, 16))),
    ):
        reference = cls.from_pretrained(folder, safety_checker=None)
        assert reference.scheduler.config.use_karras_sigmas
        reference.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(5)
        kwargs = dict(prompt="a red cat", num_inference_steps=7)
        theirs = reference(**kwargs, **extra, generator=generator, output_type="pt").images
        if "latents" in extra:  # the same start state (README: Euler's start scale)
            sigma_max = float(reference.scheduler.sigmas.max())
            start = float(reference.scheduler.init_noise_sigma) / (sigma_max**2 + 1) ** 0.5
            extra["latents"] = extra["latents"] * start
        ours = pipe(**kwargs, **extra, seed=5, output_type="tensor", progress=False)
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.gpu
def test_cuda_fp16_pipeline_matches_cpu_fp32(sd_folder, pipe):
    """On a GPU: weights in fp16, a CUDA generator for a stochastic sampler, the same images as
    the fp32 CPU pipeline up to fp16 rounding when given the same latents."""
    gpu = Pipeline.from_pretrained(sd_folder, device="cuda", dtype=torch.float16)
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float16
    latents = torch.randn(2, 4, 8, 8)
    common = dict(
        prompt="a cat",
        num_images=2,
        latents=latents,
        num_inference_steps=STEPS,
        output_type="tensor",
        progress=False,
    )
    torch.testing.assert_close(gpu(**common).cpu(), pipe(**common), atol=2e-2, rtol=0)
    first = gpu(
        "a cat", sampler="ddpm", seed=1, num_inference_steps=2, output_type="latent", progress=False
    )
    again = gpu(
        "a cat", sampler="ddpm", seed=1, num_inference_steps=2, output_type="latent", progress=False
    )
    assert first.device.type == "cuda" and torch.equal(first, again)


def test_fp16_text_encoder_file_loads_float32_without_a_dtype(sd_folder, tmp_path):
    """Many SD folders store fp16 weights under the default file names, and transformers 5 loads
    a model in its file's dtype: with no dtype asked for, the text encoder must still be float32
    like the U-Net and VAE (fp16 CLIP on the CPU is slow and its embeddings differ)."""
    import shutil

    import transformers

    folder = tmp_path / "fp16-files"
    shutil.copytree(sd_folder, folder)
    encoder = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder")
    encoder.half().save_pretrained(folder / "text_encoder")
    loaded = Pipeline.from_pretrained(folder)
    assert loaded.dtype == torch.float32 and loaded.prompt_encoder.dtype == torch.float32
    half = Pipeline.from_pretrained(folder, dtype=torch.float16)
    assert half.prompt_encoder.dtype == torch.float16
