"""Diffusers folders and files as users have them, read by fastdiff as diffusers reads them:
text encoders whose config names another dtype than their weights or whose file lacks weights,
unreadable LoRA / textual inversion files, LoRA files in diffusers' older text-encoder layouts,
in a folder as ``.bin`` or with regular-expression alpha patterns, and latent consistency model
folders' latent scaling (each test failed before its fix)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastdiff.pipeline import Pipeline
from tests.pipeline.folders import make_sd_folder, save_peft_lora, single_thread

pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return make_sd_folder(tmp_path_factory.mktemp("folder_variants") / "pipe")


def copy(folder, target):
    shutil.copytree(folder, target)
    return target


def edit_json(path, **changes):
    config = {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps({key: value for key, value in config.items() if value is not None}))


def without_wrapper(key: str) -> str:
    """A CLIP text model key without transformers 4's ``text_model.`` level."""
    return key.removeprefix("text_model.")


@pytest.mark.parametrize("dtype_key", ["torch_dtype", "dtype"])
def test_text_encoder_weights_are_read_as_stored_whatever_dtype_the_config_names(
    sd_folder, tmp_path, dtype_key
):
    """Text encoder configs saved from a float16 pipeline say ``"torch_dtype": "float16"``
    beside float32 weights. transformers 5 loads in the config's dtype unless told otherwise,
    so a float32 pipeline got text encoders whose weights were rounded to float16 (and cast
    back), each off by up to float16's rounding (5e-4 relative here). diffusers with
    torch_dtype=float32, and fastdiff now, read the stored values."""
    folder = copy(sd_folder, tmp_path / "pipe")
    config = folder / "text_encoder" / "config.json"
    edit_json(config, **{"dtype": None, "torch_dtype": None, dtype_key: "float16"})
    stored = load_file(folder / "text_encoder" / "model.safetensors")
    assert all(value.dtype == torch.float32 for value in stored.values())

    encoder = Pipeline.from_pretrained(folder).prompt_encoder.encoders[0][1]
    loaded = {without_wrapper(key): value for key, value in encoder.state_dict().items()}
    for key, value in stored.items():
        assert loaded[without_wrapper(key)].dtype == torch.float32
        torch.testing.assert_close(loaded[without_wrapper(key)], value, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["a layer's weights dropped", "listed with a projection"])
def test_text_encoder_missing_weights_is_refused_naming_them(sd_folder, tmp_path, case):
    """transformers fills the weights a text encoder's file lacks with random values and only
    logs it: a truncated file, or model_index.json listing CLIPTextModelWithProjection for a
    plain CLIPTextModel's weights (its text_projection random), generated from random weights.
    fastdiff refuses such a folder, as it refuses a U-Net or VAE missing weights."""
    folder = copy(sd_folder, tmp_path / "pipe")
    if case == "listed with a projection":
        index = json.loads((folder / "model_index.json").read_text())
        edit_json(
            folder / "model_index.json",
            text_encoder=[index["text_encoder"][0], "CLIPTextModelWithProjection"],
        )
        missing = "text_projection.weight"
    else:
        weights = folder / "text_encoder" / "model.safetensors"
        stored = load_file(weights)
        kept = {key: value for key, value in stored.items() if ".layers.1." not in key}
        assert len(kept) < len(stored)
        save_file(kept, weights, metadata={"format": "pt"})
        missing = r"layers\.1\."
    with pytest.raises(ValueError, match=rf"text_encoder.*missing.*{missing}"):
        Pipeline.from_pretrained(folder)


def truncated_safetensors(path, tensors: dict[str, torch.Tensor]):
    save_file(tensors, str(path))
    path.write_bytes(path.read_bytes()[:-10])
    return path


@pytest.mark.parametrize("kind", ["lora", "textual inversion"])
def test_unreadable_lora_and_textual_inversion_files_are_named(sd_folder, tmp_path, kind):
    """A truncated .safetensors LoRA or embedding raised safetensors' own error, naming no file
    ("incomplete metadata, file not fully covered"); U-Net and VAE weights name theirs."""
    pipe = Pipeline.from_pretrained(sd_folder)
    path = tmp_path / "download.safetensors"
    if kind == "lora":
        name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
        truncated_safetensors(
            path,
            {
                f"{name}.lora_A.weight": torch.zeros(4, 16),
                f"{name}.lora_B.weight": torch.zeros(16, 4),
            },
        )
        load = pipe.load_lora_weights
    else:
        truncated_safetensors(path, {"<toy>": torch.zeros(1, 32)})
        load = pipe.load_textual_inversion
    with pytest.raises(ValueError, match="download.safetensors"):
        load(path)


def diffusers_text_embeddings(folder, lora: dict[str, torch.Tensor], scale: float, prompt: str):
    import diffusers

    reference = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    reference.load_lora_weights(dict(lora))
    reference.fuse_lora(lora_scale=scale)
    with torch.no_grad():
        return reference.encode_prompt(prompt, "cpu", 1, False)[0]


@pytest.mark.parametrize("layout", ["to_q_lora (diffusers 0.15)", "lora_linear_layer (0.17)"])
def test_lora_in_diffusers_older_text_encoder_layouts_equals_diffusers(sd_folder, layout):
    """diffusers' DreamBooth / text-to-image LoRA scripts with --train_text_encoder wrote the
    text encoder's factors as ``text_model.encoder.layers.0.self_attn.to_q_lora.down.weight``
    (the attention-processor names, 0.15-0.16) or ``...q_proj.lora_linear_layer.down.weight``
    (0.17-0.20); diffusers still reads both. fastdiff refused them ("not a LoRA factor")."""
    pytest.importorskip("peft")
    pipe = Pipeline.from_pretrained(sd_folder)
    encoder = pipe.prompt_encoder.encoders[0][1]
    generator = torch.Generator().manual_seed(0)
    lora = {}
    processor_names = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}
    for layer in range(encoder.config.num_hidden_layers):
        attention = f"text_model.encoder.layers.{layer}.self_attn"
        for projection, processor_name in processor_names.items():
            width = encoder.config.hidden_size
            down, up = (
                torch.randn(4, width, generator=generator),
                torch.randn(width, 4, generator=generator),
            )
            key = f"text_encoder.{attention}." + (
                f"{processor_name}_lora"
                if layout.startswith("to_q_lora")
                else f"{projection}.lora_linear_layer"
            )
            lora |= {f"{key}.down.weight": down * 0.2, f"{key}.up.weight": up * 0.2}
    prompt = "a photo of a red cat"
    before = pipe.prompt_encoder.encode([prompt]).tokens
    assert pipe.load_lora_weights(dict(lora), scale=0.7) == len(lora) // 2
    ours = pipe.prompt_encoder.encode([prompt]).tokens
    theirs = diffusers_text_embeddings(sd_folder, lora, 0.7, prompt)
    assert (theirs - before).abs().max() > 1e-2  # the LoRA changes the embeddings
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_a_lora_folder_holding_the_pickled_file_loads(sd_folder, tmp_path):
    """diffusers' LoRA scripts wrote ``pytorch_lora_weights.bin`` before safetensors became
    their default, and diffusers' load_lora_weights(folder) reads it; fastdiff looked for the
    .safetensors file only (FileNotFoundError)."""
    pipe = Pipeline.from_pretrained(sd_folder)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    layer = pipe.unet.get_submodule(name)
    down, up = torch.randn(4, layer.in_features), torch.randn(layer.out_features, 4)
    expected = layer.weight.detach().clone() + 0.5 * (up @ down)
    lora = {f"unet.{name}.lora_A.weight": down, f"unet.{name}.lora_B.weight": up}
    torch.save(lora, tmp_path / "pytorch_lora_weights.bin")
    assert pipe.load_lora_weights(tmp_path, scale=0.5) == 1
    torch.testing.assert_close(layer.weight, expected)


def test_lora_alpha_patterns_are_regular_expressions_as_in_peft(sd_folder, tmp_path):
    """PEFT reads ``alpha_pattern``'s keys as regular expressions matched against the end of a
    module's name (``(.*\\.)?(pattern)$``), and diffusers saves them into the file's metadata as
    given. fastdiff compared them as plain names: ``attn\\d\\.to_v`` matched nothing, so those
    layers took lora_alpha (16) instead of 2, 8 times the update diffusers fuses."""
    pytest.importorskip("peft")
    import diffusers
    from peft import LoraConfig

    config = LoraConfig(
        r=4,
        lora_alpha=16,
        alpha_pattern={r"attn\d\.to_v": 2},
        target_modules=["to_q", "to_v"],
        init_lora_weights="gaussian",
    )
    save_peft_lora(sd_folder, tmp_path, config)
    reference = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None)
    reference.load_lora_weights(tmp_path)
    reference.fuse_lora(lora_scale=0.5)
    expected = {
        key.replace(".base_layer", ""): value
        for key, value in reference.unet.state_dict().items()
        if "lora_" not in key
    }
    pipe = Pipeline.from_pretrained(sd_folder)
    pipe.load_lora_weights(tmp_path, scale=0.5)
    ours = pipe.unet.state_dict()
    assert set(ours) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(
            ours[key], value, atol=1e-6, rtol=0, msg=lambda message, key=key: f"{key}: {message}"
        )


@pytest.mark.parametrize(
    "vae_config",
    [
        {"shift_factor": 0.3},
        {"latents_mean": [0.1, -0.2, 0.3, 0.0], "latents_std": [0.5, 1.5, 2, 1]},
    ],
    ids=["shift", "stats"],
)
def test_a_latent_consistency_folder_scales_latents_as_its_pipeline(tmp_path, vae_config):
    """diffusers' LatentConsistencyModelPipeline (and its img2img) divides by the VAE's
    scaling_factor only, as the SD pipelines do; fastdiff read LCM folders as its own and
    applied shift_factor or latents_mean/std from the VAE config too."""
    import diffusers

    folder = make_sd_folder(tmp_path / "lcm", lcm=True)
    edit_json(folder / "vae" / "config.json", **vae_config)
    reference = diffusers.LatentConsistencyModelPipeline.from_pretrained(folder)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    scale = reference.vae.config.scaling_factor
    with torch.no_grad():
        theirs = reference.vae.decode(latents / scale).sample
    theirs = (theirs / 2 + 0.5).clamp(0, 1)
    ours = Pipeline.from_pretrained(folder).decode_latents(latents)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
