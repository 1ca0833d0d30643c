"""How a pipeline folder is read, against diffusers' DiffusionPipeline.from_pretrained on the same
folder: variants chosen per component, the scheduler class model_index.json names, outdated
sample sizes, pickled and sharded weights, and force_zeros_for_empty_prompt."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastdiff.pipeline import Pipeline
from tests.pipeline.folders import make_sdxl_folder

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

CALL = dict(prompt="a red cat", num_inference_steps=3, output_type="tensor", progress=False)


@pytest.fixture(scope="module")
def reference(sd_folder):
    return load_reference(sd_folder)


def load_reference(folder, **kwargs):
    reference = diffusers.DiffusionPipeline.from_pretrained(folder, safety_checker=None, **kwargs)
    reference.set_progress_bar_config(disable=True)
    return reference


def copy(folder, target):
    shutil.copytree(folder, target)
    return target


def edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def assert_same_images(folder, reference, **kwargs):
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = Pipeline.from_pretrained(folder, **kwargs)(**CALL, latents=latents)
    theirs = reference(**{**CALL, "output_type": "pt"}, latents=latents).images
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("without", ["vae", "text_encoder"])
def test_a_variant_applies_only_where_its_files_are(sd_folder, reference, tmp_path, without):
    """variant="fp16" reads the fp16 files of the components that have them and the default
    weights of the others (diffusers' _identify_model_variants); it used to fail on the first
    component without one. The fp16 copies are perturbed so the file read shows in the image."""
    folder = copy(sd_folder, tmp_path / "pipe")
    for name in ("unet", "vae", "text_encoder"):
        if name == without:
            continue
        component = getattr(reference, name)
        component.save_pretrained(folder / name, variant="fp16")
    weights = folder / "unet" / "diffusion_pytorch_model.fp16.safetensors"
    state = load_file(weights)
    state["conv_in.bias"] = state["conv_in.bias"] + 0.5
    save_file(state, weights)
    assert not any(".fp16." in path.name for path in (folder / without).iterdir())
    assert_same_images(folder, load_reference(folder, variant="fp16"), variant="fp16")
    # The perturbed fp16 U-Net was read: the default weights give another image.
    assert_same_images(folder, reference)
    with pytest.raises(AssertionError):
        assert_same_images(folder, reference, variant="fp16")


def test_a_variant_no_folder_has_is_refused(sd_folder, tmp_path):
    with pytest.raises(ValueError, match="no such modeling files"):
        load_reference(sd_folder, variant="fp8")
    with pytest.raises(FileNotFoundError, match=r"variant='fp8'.*unet, vae, text_encoder"):
        Pipeline.from_pretrained(sd_folder, variant="fp8")


def test_an_fp16_only_text_encoder_loads_without_a_variant(sd_folder, reference, tmp_path):
    """With no variant asked for, fp16-only weights are read for every component alike (the
    U-Net and VAE always did; the text encoder failed inside transformers)."""
    folder = copy(sd_folder, tmp_path / "pipe")
    (folder / "text_encoder" / "model.safetensors").unlink()
    reference.text_encoder.save_pretrained(folder / "text_encoder", variant="fp16")
    pipe = Pipeline.from_pretrained(folder)
    loaded = pipe.prompt_encoder.encoders[0][1].state_dict()
    for name, value in reference.text_encoder.state_dict().items():
        torch.testing.assert_close(loaded[name], value, atol=0, rtol=0)


def test_the_scheduler_class_is_the_one_model_index_names(sd_folder, tmp_path):
    """diffusers builds the scheduler class model_index.json lists, from the config file's values
    whatever its _class_name; fastdiff used to follow the config file's class."""
    folder = copy(sd_folder, tmp_path / "pipe")
    edit_json(folder / "model_index.json", scheduler=["diffusers", "DPMSolverMultistepScheduler"])
    reference = load_reference(folder)
    assert type(reference.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert Pipeline.from_pretrained(folder).defaults.sampler == "dpmpp_2m"
    assert_same_images(folder, reference)
    edit_json(folder / "model_index.json", scheduler=["diffusers", "UniPCMultistepScheduler"])
    reference = load_reference(folder)
    assert Pipeline.from_pretrained(folder).defaults.sampler == "unipc"
    assert_same_images(folder, reference)
    edit_json(folder / "model_index.json", scheduler=["diffusers", "DEISMultistepScheduler"])
    with pytest.raises(ValueError, match=r"model_index.json: scheduler class 'DEIS"):
        Pipeline.from_pretrained(folder)


def test_an_outdated_sample_size_reads_as_64(sd_folder, tmp_path):
    """A U-Net config written before diffusers 0.9 with sample_size < 64 (CompVis v1-x said 32)
    gives 512-pixel images by default in diffusers' SD pipelines; in SDXL-class folders and from
    newer configs the value stands."""
    folder = copy(sd_folder, tmp_path / "pipe")
    edit_json(folder / "unet" / "config.json", _diffusers_version="0.8.0", sample_size=8)
    reference = load_reference(folder)
    assert reference.unet.config.sample_size == 64
    pipe = Pipeline.from_pretrained(folder)
    assert pipe.unet.config.sample_size == 64
    assert pipe.default_size == (128, 128)  # the tiny VAE's scale factor is 2
    edit_json(folder / "unet" / "config.json", _diffusers_version="0.9.0", sample_size=8)
    assert Pipeline.from_pretrained(folder).default_size == (16, 16)
    edit_json(folder / "unet" / "config.json", _diffusers_version="0.9.0.dev0", sample_size=8)
    assert Pipeline.from_pretrained(folder).default_size == (16, 16)
    edit_json(folder / "unet" / "config.json", _diffusers_version="0.8.1", sample_size=[6, 10])
    assert Pipeline.from_pretrained(folder).default_size == (12, 20)


def test_sample_size_as_height_and_width(sd_folder, tmp_path):
    folder = copy(sd_folder, tmp_path / "pipe")
    edit_json(folder / "unet" / "config.json", sample_size=[4, 8])
    reference = load_reference(folder)
    ours = Pipeline.from_pretrained(folder)(**{**CALL, "output_type": "latent"}, seed=0)
    theirs = reference(**{**CALL, "output_type": "latent"}).images
    assert ours.shape == theirs.shape == (1, 4, 4, 8)


def test_pickled_weights_load(sd_folder, reference, tmp_path):
    """save_pretrained(safe_serialization=False) writes diffusion_pytorch_model.bin, as many older
    folders ship; it was refused."""
    folder = copy(sd_folder, tmp_path / "pipe")
    for name in ("unet", "vae"):
        (folder / name / "diffusion_pytorch_model.safetensors").unlink()
        getattr(reference, name).save_pretrained(folder / name, safe_serialization=False)
    assert (folder / "unet" / "diffusion_pytorch_model.bin").is_file()
    assert_same_images(folder, load_reference(folder))
    (folder / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"vae/diffusion_pytorch_model.bin: cannot read"):
        Pipeline.from_pretrained(folder)


def test_a_pickle_that_is_not_weights_only_is_refused(tmp_path):
    from fastdiff.models.checkpoint import CheckpointError, read_weights

    path = tmp_path / "diffusion_pytorch_model.bin"
    torch.save({"conv.weight": torch.zeros(2), "note": object()}, path)
    with pytest.raises(CheckpointError, match="not weights-only"):
        read_weights(path)
    torch.save({"conv.weight": torch.zeros(2), "step": 3}, path)
    with pytest.raises(CheckpointError, match="dict of name -> tensor"):
        read_weights(path)


def test_a_sharded_index_wins_over_a_single_file(sd_folder, reference, tmp_path):
    """With both an index and a single file present (left over from re-saving), diffusers reads
    the shards; so does fastdiff now. The single file is perturbed to show which was read."""
    folder = copy(sd_folder, tmp_path / "pipe")
    reference.unet.save_pretrained(folder / "unet", max_shard_size="60KB")
    single = reference.unet.state_dict()
    save_file(
        {name: value + 1 for name, value in single.items()},
        folder / "unet" / "diffusion_pytorch_model.safetensors",
    )
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert_same_images(folder, reference)


@pytest.mark.parametrize("value", [True, False, None])
def test_force_zeros_for_empty_prompt_is_an_sdxl_option(sd_folder, tmp_path, value):
    """StableDiffusionPipeline has no force_zeros_for_empty_prompt: diffusers ignores the key and
    encodes "" as the negative prompt; it used to be obeyed (and null refused)."""
    folder = copy(sd_folder, tmp_path / "pipe")
    edit_json(folder / "model_index.json", force_zeros_for_empty_prompt=value)
    assert not Pipeline.from_pretrained(folder).force_zeros_for_empty_prompt
    assert_same_images(folder, load_reference(folder))


def test_force_zeros_for_empty_prompt_null_reads_as_false_in_sdxl(tmp_path):
    folder = make_sdxl_folder(tmp_path / "sdxl")
    assert Pipeline.from_pretrained(folder).force_zeros_for_empty_prompt
    edit_json(folder / "model_index.json", force_zeros_for_empty_prompt=None)
    reference = load_reference(folder)
    assert not reference.config.force_zeros_for_empty_prompt
    assert not Pipeline.from_pretrained(folder).force_zeros_for_empty_prompt
    edit_json(folder / "model_index.json", force_zeros_for_empty_prompt="false")
    with pytest.raises(ValueError, match="force_zeros_for_empty_prompt must be true or false"):
        Pipeline.from_pretrained(folder)


def test_unets_that_do_not_fit_the_vae_are_refused_at_load(sd_folder, reference, tmp_path):
    """A U-Net must predict the VAE's latents and take them, or take 2 * 4 + 1 = 9 channels (an
    inpainting U-Net: latents, mask, masked-image latents); anything else used to load and
    fail mid-sampling on a shape mismatch."""
    folder = copy(sd_folder, tmp_path / "pipe")
    config = {**reference.unet.config, "in_channels": 9}
    diffusers.UNet2DConditionModel.from_config(config).save_pretrained(folder / "unet")
    assert Pipeline.from_pretrained(folder).is_inpainting
    config = {**reference.unet.config, "in_channels": 5}
    diffusers.UNet2DConditionModel.from_config(config).save_pretrained(folder / "unet")
    with pytest.raises(ValueError, match=r"takes 5 and predicts 4 channels .* take 4 \(or 9"):
        Pipeline.from_pretrained(folder)
    # A U-Net predicting more channels (learned variance) is refused as well.
    config = {**reference.unet.config, "out_channels": 8}
    diffusers.UNet2DConditionModel.from_config(config).save_pretrained(folder / "unet")
    with pytest.raises(ValueError, match=r"takes 4 and predicts 8 channels"):
        Pipeline.from_pretrained(folder)


def test_null_entries_in_model_index_are_absent_components(sd_folder, tmp_path):
    """diffusers writes [null, null] for a component a pipeline does not have (the safety
    checker, SDXL's second encoder in an SD folder): no folder is read for it."""
    folder = copy(sd_folder, tmp_path / "pipe")
    edit_json(folder / "model_index.json", text_encoder_2=[None, None], tokenizer_2=[None, None])
    pipe = Pipeline.from_pretrained(folder)
    assert len(pipe.prompt_encoder.encoders) == 1
    edit_json(folder / "model_index.json", vae=[None, None])
    with pytest.raises(ValueError, match="does not list a 'vae' component"):
        Pipeline.from_pretrained(folder)


@pytest.mark.parametrize(
    "class_name", ["StableDiffusionImg2ImgPipeline", "StableDiffusionPipeline"]
)
def test_outdated_scheduler_fixes_apply_to_every_sd_pipeline_class(sd_folder, tmp_path, class_name):
    """diffusers' SD 1.x/2.x text-to-image, img2img and inpainting pipelines all sample an
    outdated scheduler config (steps_offset 0) with steps_offset=1; SDXL ones keep it."""
    folder = copy(sd_folder, tmp_path / "pipe")
    edit_json(folder / "scheduler" / "scheduler_config.json", steps_offset=0)
    edit_json(folder / "model_index.json", _class_name=class_name)
    assert Pipeline.from_pretrained(folder).schedule.steps_offset == 1
    edit_json(folder / "model_index.json", _class_name="StableDiffusionXLPipeline")
    assert Pipeline.from_pretrained(folder).schedule.steps_offset == 0


STATS = dict(latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[0.5, 1.5, 2.0, 1.0])


def test_latents_mean_without_std_is_ignored(tmp_path):
    """diffusers' SDXL pipeline normalises per channel only when both latents_mean and
    latents_std are given; one alone changes nothing."""
    folder = make_sdxl_folder(tmp_path / "sdxl")
    latents = torch.randn(1, 4, 8, 8)
    plain = Pipeline.from_pretrained(folder).decode_latents(latents)
    edit_json(folder / "vae" / "config.json", latents_mean=STATS["latents_mean"])
    torch.testing.assert_close(Pipeline.from_pretrained(folder).decode_latents(latents), plain)


@pytest.mark.parametrize(
    "kind, vae_config",
    [
        ("sd", {"shift_factor": 0.3}),
        ("sd", STATS),
        ("sdxl", {"shift_factor": 0.3}),
        ("sdxl", STATS),
    ],
    ids=["sd-shift", "sd-stats", "sdxl-shift", "sdxl-stats"],
)
def test_vae_latent_scaling_keys_are_those_the_pipeline_class_reads(
    sd_folder, tmp_path, kind, vae_config
):
    """diffusers' SD pipelines divide by scaling_factor only; SDXL's also normalise by
    latents_mean/latents_std; neither reads shift_factor. fastdiff applied every key the VAE
    config gave, whatever the folder's class (images differed by up to 0.37)."""
    from PIL import Image

    source = sd_folder if kind == "sd" else make_sdxl_folder(tmp_path / "sdxl")
    folder = copy(source, tmp_path / "pipe")
    edit_json(folder / "vae" / "config.json", **vae_config)
    text = diffusers.AutoPipelineForText2Image.from_pretrained(folder)
    image = diffusers.AutoPipelineForImage2Image.from_pretrained(folder)
    for reference in (text, image):
        reference.set_progress_bar_config(disable=True)
    pipe = Pipeline.from_pretrained(folder)
    common = dict(prompt="a cat", num_inference_steps=3, guidance_scale=4.0)
    init = Image.fromarray((torch.rand(16, 16, 3) * 255).byte().numpy())
    ours = pipe(**common, seed=1, output_type="tensor", progress=False)
    theirs = text(**common, generator=torch.Generator().manual_seed(1), output_type="pt").images
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    img2img = dict(common, image=init, strength=0.6)
    ours = pipe(**img2img, seed=1, output_type="latent", progress=False)
    generator = torch.Generator().manual_seed(1)
    theirs = image(**img2img, generator=generator, output_type="latent").images
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_a_text_and_class_conditioned_unet(sd_folder, reference, tmp_path):
    """A U-Net with cross-attention and class embeddings takes a prompt and class labels, one
    label per prompt: guided, the unconditional half gets the null label with the negative
    prompt (the class changes the image), and a label count that is not the prompt count is
    refused."""
    folder = copy(sd_folder, tmp_path / "pipe")
    config = {**reference.unet.config, "num_class_embeds": 3}
    diffusers.UNet2DConditionModel.from_config(config).save_pretrained(folder / "unet")
    pipe = Pipeline.from_pretrained(folder)
    common = dict(num_inference_steps=2, seed=0, output_type="latent", progress=False)
    one = pipe(["a cat", "a dog"], class_labels=[0, 1], guidance_scale=5.0, **common)
    other = pipe(["a cat", "a dog"], class_labels=[1, 1], guidance_scale=5.0, **common)
    assert one.shape[0] == 2
    assert (one[0] - other[0]).abs().max() > 1e-4 and torch.equal(one[1], other[1])
    with pytest.raises(ValueError, match="3 class labels for 2 prompts"):
        pipe(["a cat", "a dog"], class_labels=[0, 1, 0], **common)
