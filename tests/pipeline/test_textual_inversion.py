"""Textual inversion embeddings against diffusers' ``load_textual_inversion`` (same files, same
prompts, same images), the layouts read, unloading, and what is refused."""

from __future__ import annotations

import pytest
import torch

from fastdiff.pipeline import Pipeline

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

WIDTH = 32  # the tiny SD text encoder's token embeddings


def embedding(rows: int, width: int = WIDTH, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, width, generator=torch.Generator().manual_seed(seed)) * 0.5


@pytest.fixture
def pipe(sd_folder):
    return Pipeline.from_pretrained(sd_folder)


def reference_for(folder, cls=None):
    cls = cls or diffusers.StableDiffusionPipeline
    reference = cls.from_pretrained(
        folder,
        **({"safety_checker": None} if cls is not diffusers.StableDiffusionXLPipeline else {}),
    )
    reference.set_progress_bar_config(disable=True)
    return reference


def images(pipeline, prompt: str, negative: str = "blue dog", seed: int = 3) -> torch.Tensor:
    kwargs = dict(prompt=prompt, negative_prompt=negative, num_inference_steps=3, height=16)
    kwargs |= dict(
        width=16,
        guidance_scale=5.0,
        latents=torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed)),
    )
    if isinstance(pipeline, Pipeline):
        return pipeline(**kwargs, output_type="tensor", progress=False)
    return pipeline(**kwargs, output_type="pt").images


FORMATS = {
    "diffusers-one-vector": lambda: ({"<toy>": embedding(1)[0]}, None, "<toy>"),
    "diffusers-three-vectors": lambda: ({"<toy>": embedding(3)}, None, "<toy>"),
    "a1111": lambda: ({"string_to_param": {"*": embedding(2)}, "name": "toy-a"}, None, "toy-a"),
    "tensor-with-token": lambda: (embedding(2), "<style>", "<style>"),
    "renamed": lambda: ({"<toy>": embedding(2)}, "<other>", "<other>"),
}


@pytest.mark.parametrize("make", FORMATS.values(), ids=FORMATS.keys())
def test_textual_inversion_equals_diffusers(sd_folder, pipe, make):
    state, token, word = make()
    reference = reference_for(sd_folder)
    reference.load_textual_inversion(state, token=token)
    assert pipe.load_textual_inversion(state, token=token) == word
    prompt = f"a {word} cat"
    expected = images(reference, prompt, negative=f"{word} dog")
    torch.testing.assert_close(
        images(pipe, prompt, negative=f"{word} dog"), expected, atol=1e-4, rtol=0
    )
    # The token matters: without it in the prompt the image is another.
    assert (images(pipe, "a cat", negative="dog") - expected).abs().max() > 1e-3


@pytest.mark.parametrize("suffix", [".safetensors", ".bin", "folder"])
def test_files_and_folders(sd_folder, pipe, tmp_path, suffix):
    from safetensors.torch import save_file

    state = {"<toy>": embedding(2)}
    if suffix == "folder":
        source = tmp_path / "concept"
        source.mkdir()
        save_file(state, str(source / "learned_embeds.safetensors"))
    else:
        source = tmp_path / f"toy{suffix}"
        save_file(state, str(source)) if suffix == ".safetensors" else torch.save(state, source)
    assert pipe.load_textual_inversion(source) == "<toy>"
    reference = reference_for(sd_folder)
    reference.load_textual_inversion(state)
    torch.testing.assert_close(
        images(pipe, "a <toy>"), images(reference, "a <toy>"), atol=1e-4, rtol=0
    )


def test_unloading_restores_the_pipeline(sd_folder, pipe):
    before = images(pipe, "a <toy> <hat> cat")
    tokenizer, encoder = pipe.prompt_encoder.encoders[0]
    rows, vocabulary = encoder.get_input_embeddings().weight.shape[0], len(tokenizer)
    pipe.load_textual_inversion({"<toy>": embedding(3)})
    pipe.load_textual_inversion({"<hat>": embedding(2, seed=1)})
    both = images(pipe, "a <toy> <hat> cat")
    assert (both - before).abs().max() > 1e-3
    # Unloading one keeps the other: as a pipeline that loaded only that one.
    assert pipe.unload_textual_inversion("<toy>") == ["<toy>"]
    only_hat = Pipeline.from_pretrained(sd_folder)
    only_hat.load_textual_inversion({"<hat>": embedding(2, seed=1)})
    torch.testing.assert_close(
        images(pipe, "a <toy> <hat> cat"), images(only_hat, "a <toy> <hat> cat"), atol=1e-5, rtol=0
    )
    assert pipe.unload_textual_inversion() == ["<hat>"]
    torch.testing.assert_close(images(pipe, "a <toy> <hat> cat"), before, atol=0, rtol=0)
    tokenizer, encoder = pipe.prompt_encoder.encoders[0]
    assert encoder.get_input_embeddings().weight.shape[0] == rows and len(tokenizer) == vocabulary
    # Loaded again after the unload: the same as the first time.
    pipe.load_textual_inversion({"<toy>": embedding(3)})
    pipe.load_textual_inversion({"<hat>": embedding(2, seed=1)})
    torch.testing.assert_close(images(pipe, "a <toy> <hat> cat"), both, atol=1e-5, rtol=0)


def test_sdxl_files_load_into_both_encoders(sdxl_folder):
    """clip_l and clip_g: each encoder gets its own embedding under the same token; diffusers
    needs one call per encoder for such a file."""
    pipe = Pipeline.from_pretrained(sdxl_folder)
    widths = [
        encoder.get_input_embeddings().weight.shape[1]
        for _, encoder in pipe.prompt_encoder.encoders
    ]
    state = {"clip_l": embedding(2, widths[0]), "clip_g": embedding(2, widths[1], seed=1)}
    assert pipe.load_textual_inversion(state, token="<toy>") == "<toy>"
    reference = reference_for(sdxl_folder, diffusers.StableDiffusionXLPipeline)
    reference.load_textual_inversion(
        state["clip_l"],
        token="<toy>",
        text_encoder=reference.text_encoder,
        tokenizer=reference.tokenizer,
    )
    reference.load_textual_inversion(
        state["clip_g"],
        token="<toy>",
        text_encoder=reference.text_encoder_2,
        tokenizer=reference.tokenizer_2,
    )
    torch.testing.assert_close(
        images(pipe, "a <toy> cat"), images(reference, "a <toy> cat"), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize(
    "state, token, message",
    [
        (
            {"<toy>": embedding(2, 16)},
            None,
            "embeddings of width 16 for a text encoder whose token embeddings are 32",
        ),
        (embedding(2), None, "tensor has no token name: pass token="),
        ({"cat</w>": embedding(1)}, None, "in the tokenizer's vocabulary already"),
        ({"a": embedding(1), "b": embedding(1)}, None, "not a textual inversion embedding"),
        (
            {"clip_l": embedding(1), "clip_g": embedding(1)},
            "<x>",
            "this pipeline has 1 text encoder",
        ),
        ({"<toy>": embedding(1)}, "two words", "must be one word"),
        ({"<toy>": torch.full((1, WIDTH), float("nan"))}, None, "has NaN or inf"),
        ({"emb_params": embedding(1)}, None, r"\(emb_params\) names no token: pass token="),
    ],
)
def test_bad_embeddings_are_refused_and_nothing_changes(pipe, state, token, message):
    tokenizer, encoder = pipe.prompt_encoder.encoders[0]
    rows, vocabulary = encoder.get_input_embeddings().weight.shape[0], len(tokenizer)
    with pytest.raises(ValueError, match=message):
        pipe.load_textual_inversion(state, token=token)
    assert encoder.get_input_embeddings().weight.shape[0] == rows and len(tokenizer) == vocabulary


def test_a_token_loads_once_and_unknown_tokens_are_named(pipe, tmp_path):
    pipe.load_textual_inversion({"<toy>": embedding(2)})
    with pytest.raises(ValueError, match="'<toy>' is loaded already"):
        pipe.load_textual_inversion({"<toy>": embedding(1)})
    with pytest.raises(ValueError, match=r"\['<hat>'\] are not loaded; loaded: \['<toy>'\]"):
        pipe.unload_textual_inversion("<hat>")
    with pytest.raises(FileNotFoundError, match="textual inversion file not found"):
        pipe.load_textual_inversion(tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="holds no textual inversion file"):
        pipe.load_textual_inversion(tmp_path)


def test_an_sdxl_refiner_takes_clip_g(sdxl_refiner_folder):
    """A refiner has the second text encoder only: an SDXL file loads its clip_g part there,
    as diffusers loads it into text_encoder_2 by hand."""
    pipe = Pipeline.from_pretrained(sdxl_refiner_folder)
    ((_, encoder),) = pipe.prompt_encoder.encoders
    width = encoder.get_input_embeddings().weight.shape[1]
    state = {"clip_l": embedding(2, 7), "clip_g": embedding(2, width, seed=1)}
    assert pipe.load_textual_inversion(state, token="<toy>") == "<toy>"
    reference = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(sdxl_refiner_folder)
    reference.set_progress_bar_config(disable=True)
    reference.load_textual_inversion(
        state["clip_g"],
        token="<toy>",
        text_encoder=reference.text_encoder_2,
        tokenizer=reference.tokenizer_2,
    )
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    kwargs = dict(prompt="a <toy> cat", image=image, num_inference_steps=4, strength=0.6)
    theirs = reference(**kwargs, generator=torch.Generator().manual_seed(1), output_type="pt")
    ours = pipe(**kwargs, seed=1, output_type="tensor", progress=False)
    torch.testing.assert_close(ours, theirs.images, atol=1e-4, rtol=0)
    assert pipe.unload_textual_inversion([]) == []
    assert pipe.textual_inversions is not None
