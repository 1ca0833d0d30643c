"""Bad input to the pipeline layer is refused with an error that names the problem (the key, the
value, the shape, the allowed values): one case per check of ``fastdiff/pipeline/``, given through
``Pipeline`` (its folder loading, its call, its LoRA and textual inversion methods) or, where the
call cannot reach a check, through the narrowest public function that holds it."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff.pipeline import Pipeline
from fastdiff.pipeline.call_arguments import CallDefaults
from fastdiff.pipeline.conditioning import Conditioning
from fastdiff.pipeline.denoising import plan_until, run_sampler
from fastdiff.pipeline.images import make_grid, tensor_to_pil
from fastdiff.pipeline.micro_conditioning import add_time_ids
from fastdiff.pipeline.text_encoding import PromptEncoder
from fastdiff.sampling import NoiseSchedule, make_plan
from tests.pipeline.folders import SCHEDULER, TOKENIZER_LENGTH

pytest.importorskip("transformers")

# Every call below fails before the first U-Net step; these keep it cheap if one did not.
CALL = dict(num_inference_steps=2, output_type="latent", progress=False)
WIDTH = 32  # the tiny text encoders' token embedding width (tests/pipeline/folders.py)


@pytest.fixture(scope="module")
def no_text_encoder(sd):
    """The SD pipeline's U-Net and VAE without a text encoder: it takes prompt embeddings."""
    return Pipeline(sd.unet, sd.vae, sd.schedule)


def red_image(size: int = 16) -> Image.Image:
    return Image.new("RGB", (size, size), (200, 30, 30))


def with_index(folder, target, **changes):
    """``folder``'s components linked into ``target`` under an edited model_index.json (a value
    of None removes its key)."""
    target.mkdir()
    for child in folder.iterdir():
        if child.name != "model_index.json":
            (target / child.name).symlink_to(child)
    index = json.loads((folder / "model_index.json").read_text())
    index.update(changes)
    index = {key: value for key, value in index.items() if value is not None}
    (target / "model_index.json").write_text(json.dumps(index))
    return target


# -- defaults and folders ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(strength=0.0), r"default strength must lie in \(0, 1\], got 0\.0"),
        (dict(inpaint_strength=1.5), r"default inpaint_strength must lie in \(0, 1\], got 1\.5"),
        # None and strings used to fail in the range comparison with a bare TypeError.
        (dict(strength=None), r"default strength must lie in \(0, 1\], got None"),
        (dict(strength="0.5"), r"default strength must lie in \(0, 1\], got '0\.5'"),
        (dict(num_inference_steps=0), "default num_inference_steps must be a positive int, got 0"),
        (
            dict(num_inference_steps=2.5),
            r"default num_inference_steps must be a positive int, got 2\.5",
        ),
    ],
    ids=[
        "strength-zero",
        "inpaint-strength-above-one",
        "strength-none",
        "strength-a-string",
        "steps-zero",
        "steps-not-an-int",
    ],
)
def test_bad_call_defaults_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CallDefaults(**kwargs)


@pytest.mark.parametrize("strength", [0.5, np.float32(0.5), torch.tensor(0.5)])
def test_numeric_default_strengths_stay_accepted(strength):
    assert CallDefaults(strength=strength).strength is strength


def test_a_model_index_that_is_not_an_object_is_named(tmp_path):
    (tmp_path / "model_index.json").write_text("[]")
    with pytest.raises(ValueError, match=r"model_index\.json must hold a JSON object, found list"):
        Pipeline.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(tokenizer=None), "'text_encoder' and 'tokenizer' must be listed together"),
        (dict(text_encoder=[None, None]), "'text_encoder' and 'tokenizer' must be listed together"),
        (dict(class_names=["cat", 2]), r"class_names must be a list of strings, got \['cat', 2\]"),
        (dict(class_names="cat"), "class_names must be a list of strings, got 'cat'"),
        (
            dict(text_encoder=["transformers", "T5EncoderModel"]),
            "unsupported class 'T5EncoderModel' in model_index.json; supported: CLIPTextModel, "
            "CLIPTextModelWithProjection",
        ),
    ],
    ids=[
        "text-encoder-without-tokenizer",
        "tokenizer-without-text-encoder",
        "class-names-not-all-strings",
        "class-names-a-string",
        "text-encoder-not-clip",
    ],
)
def test_bad_model_index_entries_are_named(sd_folder, tmp_path, changes, match):
    folder = with_index(sd_folder, tmp_path / "pipe", **changes)
    with pytest.raises(ValueError, match=match):
        Pipeline.from_pretrained(folder)


def test_a_text_encoder_folder_without_weights_is_named(sd_folder, tmp_path):
    folder = with_index(sd_folder, tmp_path / "pipe")
    (folder / "text_encoder").unlink()
    (folder / "text_encoder").mkdir()
    with pytest.raises(FileNotFoundError, match=r"cannot load CLIPTextModel from .*text_encoder"):
        Pipeline.from_pretrained(folder)


# -- the call ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "which, kwargs, match",
    [
        (
            "no_text_encoder",
            dict(prompt="a cat"),
            "this pipeline has no text encoder: pass prompt_embeds instead",
        ),
        (
            "no_text_encoder",
            dict(prompt_embeds=torch.zeros(1, TOKENIZER_LENGTH, WIDTH), guidance_scale=7.5),
            "guidance needs negative_prompt_embeds when the pipeline has no text encoder",
        ),
        (
            "sdxl",
            dict(prompt_embeds=torch.zeros(2, 16, 64), pooled_prompt_embeds=torch.zeros(1, 32)),
            "pooled_prompt_embeds has batch 1, prompt_embeds 2",
        ),
        (
            "sdxl",
            dict(
                prompt_embeds=torch.zeros(1, 16, 64),
                pooled_prompt_embeds=torch.zeros(1, 32),
                negative_prompt_embeds=torch.zeros(1, 16, 64),
                guidance_scale=5.0,
            ),
            "guidance on this U-Net needs negative_pooled_prompt_embeds",
        ),
        ("sd", dict(prompt=["a cat", 3]), "prompts must be strings, got 3"),
        ("sd", dict(prompt="a cat", negative_prompt=7), "prompts must be strings, got 7"),
        (
            "sd",
            dict(prompt="a cat", image=red_image(), num_inference_steps=0),
            "num_inference_steps must be a positive int, got 0",
        ),
        (
            "sd",
            dict(prompt="a cat", image=[np.zeros((16, 16, 3), np.float32), red_image()]),
            "a list of init images must hold numpy arrays only, or PIL images only",
        ),
        (
            "sd",
            dict(prompt="a cat", image=torch.zeros(1, 4, 8, 8, dtype=torch.int64)),
            "image latents must be a float tensor, got torch.int64",
        ),
        (
            "sd",
            dict(
                prompt="a cat",
                image=red_image(),
                mask_image=[Image.new("L", (16, 16)), np.zeros((16, 16))],
            ),
            "a list of masks must hold PIL images only",
        ),
        (
            "sd",
            dict(prompt="a cat", image=red_image(), mask_image=np.full((16, 16), "x")),
            "a numpy mask must be a number or bool array, got <U1",
        ),
        (
            "sd",
            dict(prompt="a cat", image=red_image(), mask_image=torch.full((16, 16), np.nan)),
            "mask contains NaN or inf",
        ),
    ],
    ids=[
        "prompt-without-text-encoder",
        "guided-embeddings-without-negative-or-text-encoder",
        "pooled-batch-differs-from-prompt-batch",
        "guided-without-negative-pooled",
        "prompt-list-holds-a-number",
        "negative-prompt-a-number",
        "img2img-with-zero-steps",
        "init-images-mix-arrays-and-pil",
        "image-latents-of-integers",
        "masks-mix-pil-and-arrays",
        "mask-array-of-strings",
        "mask-with-nan",
    ],
)
def test_bad_call_inputs_are_named(request, which, kwargs, match):
    pipe = request.getfixturevalue(which)
    with pytest.raises(ValueError, match=match):
        pipe(**{**CALL, **kwargs})


# -- the denoising loop ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.from_config(SCHEDULER)


NOISE = torch.zeros(1, 4, 2, 2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(init_latents=NOISE, start_step=3), "start_step 3 out of range for a 3-step plan"),
        (dict(init_latents=NOISE, start_step=-1), "start_step -1 out of range for a 3-step plan"),
        (
            dict(init_latents=NOISE, start_step=2, end_step=1),
            "start_step 2 must be below end_step 1",
        ),
        (dict(end_step=4), "end_step 4 out of range for a 3-step plan"),
        (dict(start_step=1), r"start_step needs init_latents \(img2img\)"),
        (
            dict(init_latents=torch.zeros(1, 4, 3, 3), start_step=1),
            re.escape("init latents shape (1, 4, 3, 3) != noise shape (1, 4, 2, 2)"),
        ),
    ],
    ids=[
        "start-step-past-the-plan",
        "start-step-negative",
        "start-step-not-below-end-step",
        "end-step-past-the-plan",
        "start-step-without-init-latents",
        "init-latents-of-another-shape",
    ],
)
def test_bad_sampler_ranges_are_named(schedule, kwargs, match):
    def model_fn(x, t):
        raise AssertionError("the model must not be called")

    with pytest.raises(ValueError, match=match):
        run_sampler(model_fn, NOISE, schedule, steps=3, progress=False, **kwargs)


@pytest.mark.parametrize("end_step", [0, 4], ids=["end-step-zero", "end-step-past-the-plan"])
def test_plan_until_names_an_end_step_out_of_range(schedule, end_step):
    # run_sampler checks end_step before cutting the plan; plan_until checks it on its own too.
    plan = make_plan(schedule, sampler="ddim", steps=3)
    with pytest.raises(ValueError, match=f"end_step {end_step} out of range for a 3-step plan"):
        plan_until(plan, end_step)


# -- images and micro-conditioning -------------------------------------------------------------


@pytest.mark.parametrize(
    "shape",
    [(1, 4, 8, 8), (3, 8, 8)],
    ids=["four-channels", "no-batch-axis"],
)
def test_tensor_to_pil_names_the_shapes_it_takes(shape):
    expected = f"(B, 3, H, W) or (B, 1, H, W), got {shape}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        tensor_to_pil(torch.zeros(shape))


def test_an_empty_grid_is_refused():
    with pytest.raises(ValueError, match="make_grid needs at least one image"):
        make_grid([])


def test_add_time_ids_names_a_pooled_width_that_does_not_add_up(sdxl):
    # The call checks the pooled width first (text_widths); add_time_ids checks it on its own.
    conditioning = Conditioning(
        {"encoder_hidden_states": torch.zeros(1, 16, 64), "text_embeds": torch.zeros(1, 16)}, None
    )
    expected = (
        "this U-Net expects 80 added-condition features, but the pooled text embeddings (16) "
        "and 6 ids of 8 give 64"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        add_time_ids(conditioning, 16, 16, sdxl.unet.config)


# -- text encoders, LoRA, textual inversion ----------------------------------------------------


def test_a_prompt_encoder_needs_an_encoder():
    with pytest.raises(ValueError, match=r"needs at least one \(tokenizer, text encoder\) pair"):
        PromptEncoder([], penultimate=False)


def test_a_prompt_encoder_needs_one_name_per_encoder(sd):
    names = ["text_encoder", "text_encoder_2"]
    with pytest.raises(ValueError, match="2 names for 1 text encoders"):
        PromptEncoder(sd.prompt_encoder.encoders, penultimate=False, names=names)


def test_prompts_2_of_another_count_are_named(sdxl):
    # The call broadcasts prompt_2 to the prompts first; encode checks the counts on its own.
    with pytest.raises(ValueError, match="1 prompts_2 for 2 prompts"):
        sdxl.prompt_encoder.encode(["a cat", "a dog"], prompts_2=["red"])


def test_lora_metadata_that_is_not_json_is_named(sd, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "lora.safetensors"
    state = {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 16)}
    save_file(state, str(path), metadata={"lora_adapter_metadata": "{unet.r: 2"})
    with pytest.raises(ValueError, match=r"lora\.safetensors: lora_adapter_metadata is not valid"):
        sd.load_lora_weights(path)


@pytest.mark.parametrize(
    "which, component",
    [("sd", "text_encoder_2"), ("no_text_encoder", "text_encoder")],
    ids=["second-encoder-on-sd", "text-encoder-on-embeddings-only-pipeline"],
)
def test_lora_for_a_missing_text_encoder_is_named(request, which, component):
    pipe = request.getfixturevalue(which)
    prefix = f"{component}.text_model.encoder.layers.0.self_attn.q_proj"
    state = {
        f"{prefix}.lora_A.weight": torch.zeros(2, WIDTH),
        f"{prefix}.lora_B.weight": torch.zeros(WIDTH, 2),
    }
    with pytest.raises(ValueError, match=f"the LoRA weights patch {component}, which this"):
        pipe.load_lora_weights(state)


def test_an_unreadable_textual_inversion_file_is_named(sd, tmp_path):
    path = tmp_path / "concept.bin"
    path.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"cannot read textual inversion file .*concept\.bin"):
        sd.load_textual_inversion(path)


SDXL_FILE = {"clip_l": torch.zeros(WIDTH), "clip_g": torch.zeros(WIDTH)}


@pytest.mark.parametrize(
    "which, source, token, match",
    [
        ("sdxl", SDXL_FILE, None, r"\(clip_l, clip_g\) names no token: pass token="),
        ("refiner", SDXL_FILE, None, r"\(clip_l, clip_g\) names no token: pass token="),
        (
            "sd",
            {"string_to_param": {"tok": torch.zeros(WIDTH)}, "name": "tok"},
            None,
            re.escape("an Automatic1111 embedding must hold string_to_param['*']"),
        ),
        (
            "sd",
            {"string_to_param": {"*": torch.zeros(WIDTH)}},
            None,
            "the Automatic1111 embedding names no token: pass token=",
        ),
        (
            "sd",
            {"<toy>": torch.zeros(2, 3, WIDTH)},
            None,
            re.escape("must be (D,) or (N, D), got (2, 3, 32)"),
        ),
        (
            "sd",
            {"<toy>": torch.zeros(0, WIDTH)},
            None,
            re.escape("must be (D,) or (N, D), got (0, 32)"),
        ),
        (
            "sdxl",
            {"<toy>": torch.zeros(WIDTH)},
            None,
            "this pipeline has two text encoders .*this one holds a single embedding",
        ),
        (
            "no_text_encoder",
            {"<toy>": torch.zeros(WIDTH)},
            None,
            "textual inversion needs a pipeline with a text encoder",
        ),
        ("sd", {"<toy>": torch.zeros(WIDTH)}, 5, "token must be a string, got int"),
    ],
    ids=[
        "sdxl-file-without-token",
        "sdxl-file-without-token-on-refiner",
        "a1111-without-star-key",
        "a1111-without-name",
        "embedding-three-dimensional",
        "embedding-empty",
        "one-embedding-for-two-encoders",
        "pipeline-without-text-encoder",
        "token-not-a-string",
    ],
)
def test_bad_textual_inversions_are_named(request, which, source, token, match):
    pipe = request.getfixturevalue(which)
    with pytest.raises(ValueError, match=match):
        pipe.load_textual_inversion(source, token=token)
    assert getattr(pipe, "textual_inversions", None) is None  # nothing was loaded


def test_unloading_a_textual_inversion_never_loaded_is_named(sd):
    with pytest.raises(ValueError, match=re.escape("no textual inversion is loaded (asked to")):
        sd.unload_textual_inversion("<toy>")
