"""Textual inversion (Gal et al. 2022, "An Image is Worth One Word"): new tokens whose input
embeddings were learned, added to a pipeline's tokenizers and text encoders as diffusers'
``load_textual_inversion`` adds them, so the files users have (negative embeddings, styles,
concepts) change fastdiff's images as they change diffusers'.

File layouts read (a .safetensors file, a .bin / .pt file, a folder holding
``learned_embeds.safetensors`` or ``learned_embeds.bin``, or a state dict / tensor):

* diffusers: one key, the token, mapping to its embedding (D,) or (N, D);
* Automatic1111: ``string_to_param: {"*": (N, D)}`` with the token in ``name``; its
  .safetensors form holds one key, ``emb_params``, and names no token: the file's name is the
  token unless ``token=`` says otherwise (diffusers would call it "emb_params");
* SDXL files: ``clip_l`` (D = 768, the first text encoder) and ``clip_g`` (1280, the second),
  each loaded into its encoder under the same token (diffusers needs two calls for them); an
  SDXL refiner, which has the second encoder only, takes ``clip_g``;
* a bare tensor, with ``token=``.

An embedding of N > 1 vectors becomes the tokens ``tok``, ``tok_1`` ... ``tok_{N-1}``, and a
prompt's ``tok`` is expanded to all of them before tokenizing (diffusers' ``maybe_convert_prompt``).
The tokenizer and the embedding table as they were before the first load are kept, so unloading
restores them exactly.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

FILE_NAMES = ("learned_embeds.safetensors", "learned_embeds.bin")
A1111_KEY = "emb_params"  # Automatic1111's .safetensors embeddings: the file names the token
SDXL_KEYS = ("clip_l", "clip_g")


def read_state(source: Any) -> Any:
    """A textual inversion file, folder, state dict or tensor -> its state dict (or tensor)."""
    if isinstance(source, (dict, torch.Tensor)):
        return source
    path = Path(source)
    if path.is_dir():
        found = [path / name for name in FILE_NAMES if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(
                f"{path} holds no textual inversion file (looked for {', '.join(FILE_NAMES)})"
            )
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"textual inversion file not found: {path}")
    if path.suffix == ".safetensors":
        from fastdiff.models.checkpoint import read_safetensors

        return read_safetensors(path)  # a truncated or corrupt file raises naming it
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"cannot read textual inversion file {path}: {error}") from error


def split_state(state: Any, token: str | None, encoders: int) -> tuple[str, list[torch.Tensor]]:
    """(token, one embedding (N, D) per text encoder) from a state read by ``read_state``."""
    if isinstance(state, torch.Tensor):
        if token is None:
            raise ValueError("a textual inversion tensor has no token name: pass token=")
        parts, name = [state], token
    elif isinstance(state, dict) and set(state) == set(SDXL_KEYS):
        if encoders != 2:
            raise ValueError(
                "this textual inversion file holds clip_l and clip_g embeddings (SDXL's two "
                f"text encoders); this pipeline has {encoders} text encoder(s)"
            )
        if token is None:
            raise ValueError(
                "an SDXL textual inversion file (clip_l, clip_g) names no token: pass token="
            )
        parts, name = [state["clip_l"], state["clip_g"]], token
    elif isinstance(state, dict) and "string_to_param" in state:  # Automatic1111
        params = state["string_to_param"]
        if not isinstance(params, dict) or "*" not in params:
            raise ValueError("an Automatic1111 embedding must hold string_to_param['*']")
        parts, name = [params["*"]], state.get("name") if token is None else token
        if not isinstance(name, str) or not name:
            raise ValueError("the Automatic1111 embedding names no token: pass token=")
    elif isinstance(state, dict) and len(state) == 1:  # diffusers: {token: embedding}
        ((key, value),) = state.items()
        if key == A1111_KEY and token is None:
            raise ValueError(
                "this Automatic1111 embedding (emb_params) names no token: pass token="
            )
        parts, name = [value], key if token is None else token
    else:
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            "not a textual inversion embedding: expected one key (the token), "
            f"string_to_param (Automatic1111) or clip_l + clip_g (SDXL), got {keys}"
        )
    if not isinstance(name, str) or not name.strip() or name != name.strip() or " " in name:
        raise ValueError(f"a textual inversion token must be one word, got {name!r}")
    embeddings = []
    for part in parts:
        if not isinstance(part, torch.Tensor) or part.dim() not in (1, 2) or part.numel() == 0:
            shape = tuple(part.shape) if isinstance(part, torch.Tensor) else type(part).__name__
            raise ValueError(f"a textual inversion embedding must be (D,) or (N, D), got {shape}")
        if not bool(torch.isfinite(part).all()):
            raise ValueError(f"the textual inversion embedding of {name!r} has NaN or inf")
        embeddings.append(part.detach().reshape(-1, part.shape[-1]).float())
    if len(embeddings) == 1 and encoders == 2:
        raise ValueError(
            "this pipeline has two text encoders (SDXL): a textual inversion file for it holds "
            "clip_l and clip_g embeddings; this one holds a single embedding"
        )
    return name, embeddings


def vector_tokens(token: str, count: int) -> list[str]:
    """The tokens of an embedding of ``count`` vectors: tok, tok_1, ..., tok_{count-1}."""
    return [token] + [f"{token}_{index}" for index in range(1, count)]


@dataclass
class Original:
    """One encoder's tokenizer and embedding table before the first load."""

    tokenizer: Any
    rows: int


@dataclass
class TextualInversions:
    """What a pipeline loaded: per token, its vector tokens and one embedding per encoder."""

    originals: list[Original]
    loaded: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def of(cls, encoders) -> TextualInversions:
        originals = [
            Original(copy.deepcopy(tokenizer), encoder.get_input_embeddings().weight.shape[0])
            for tokenizer, encoder in encoders
        ]
        return cls(originals)


def check_new(token: str, counts: list[int], encoders, loaded: dict) -> None:
    """Refuse a token that the tokenizers already have, one of whose vector tokens (``counts``:
    the vectors of its embedding for each encoder) they have, or one that reads as a vector
    token of a token they have (``tok_1`` beside ``tok``: a prompt's ``tok`` would be expanded
    to ``tok tok_1`` and take this embedding too)."""
    if token in loaded:
        raise ValueError(f"textual inversion token {token!r} is loaded already: unload it first")
    base, _, index = token.rpartition("_")
    as_vector = bool(base) and index.isascii() and index.isdigit() and index[0] != "0"
    for (tokenizer, _), count in zip(encoders, counts, strict=True):
        vocabulary = tokenizer.get_vocab()
        taken = [name for name in vector_tokens(token, max(count, 2)) if name in vocabulary]
        if taken:
            raise ValueError(
                f"textual inversion token {token!r}: {taken[0]!r} is in the tokenizer's "
                "vocabulary already; choose another token= name"
            )
        if as_vector and base in tokenizer.added_tokens_encoder:
            raise ValueError(
                f"textual inversion token {token!r} reads as vector {index} of the token "
                f"{base!r}, which is loaded: prompts with {base!r} would take it too; choose "
                "another token= name"
            )


def add_tokens(encoders, token: str, embeddings: list[torch.Tensor]) -> None:
    """Append ``token``'s vector tokens to each tokenizer and their rows to each encoder's
    input embeddings, in the encoder's device and dtype."""
    for (_, encoder), embedding in zip(encoders, embeddings, strict=True):
        table = encoder.get_input_embeddings().weight
        if embedding.shape[-1] != table.shape[-1]:
            raise ValueError(
                f"textual inversion {token!r}: embeddings of width {embedding.shape[-1]} for a "
                f"text encoder whose token embeddings are {table.shape[-1]} wide"
            )
    for (tokenizer, encoder), embedding in zip(encoders, embeddings, strict=True):
        names = vector_tokens(token, embedding.shape[0])
        tokenizer.add_tokens(names)
        encoder.resize_token_embeddings(len(tokenizer))
        table = encoder.get_input_embeddings().weight
        ids = tokenizer.convert_tokens_to_ids(names)
        with torch.no_grad():
            table[ids] = embedding.to(table.device, table.dtype)


def expand_prompt(tokenizer, prompt: str) -> str:
    """A prompt with each multi-vector token ``tok`` replaced by ``tok tok_1 ... tok_{N-1}``,
    as diffusers' ``maybe_convert_prompt`` does (the same string replacement)."""
    added = tokenizer.added_tokens_encoder
    if not any(f"{token}_1" in added for token in added):
        return prompt  # no multi-vector token loaded: no need to tokenize the prompt here
    for token in set(tokenizer.tokenize(prompt)):
        if token in added and f"{token}_1" in added:
            replacement, index = token, 1
            while f"{token}_{index}" in added:
                replacement += f" {token}_{index}"
                index += 1
            prompt = prompt.replace(token, replacement)
    return prompt


def load(pipe: Any, source: Any, token: str | None = None) -> str:
    """Add one textual inversion to ``pipe``'s text encoders; returns its token. On an error
    the pipeline is left as it was."""
    encoder = getattr(pipe, "prompt_encoder", None)
    if encoder is None:
        raise ValueError("textual inversion needs a pipeline with a text encoder")
    if token is not None and not isinstance(token, str):
        raise ValueError(f"token must be a string, got {type(token).__name__}")
    state = read_state(source)
    if token is None and isinstance(state, dict) and set(state) == {A1111_KEY}:
        if isinstance(source, (str, Path)):
            token = Path(source).stem  # EasyNegative.safetensors -> "EasyNegative"
    if (
        isinstance(state, dict)
        and set(state) == set(SDXL_KEYS)
        and encoder.names == ["text_encoder_2"]
    ):
        state = state["clip_g"]  # an SDXL refiner: only the second encoder, clip_g's width
        if token is None:
            raise ValueError(
                "an SDXL textual inversion file (clip_l, clip_g) names no token: pass token="
            )
    name, embeddings = split_state(state, token, len(encoder.encoders))
    inversions = getattr(pipe, "textual_inversions", None)
    if inversions is None:
        inversions = TextualInversions.of(encoder.encoders)
    counts = [embedding.shape[0] for embedding in embeddings]
    check_new(name, counts, encoder.encoders, inversions.loaded)
    try:
        add_tokens(encoder.encoders, name, embeddings)
    except Exception:
        rebuild(pipe, inversions, inversions.loaded)  # as before this call
        raise
    inversions.loaded[name] = embeddings
    pipe.textual_inversions = inversions
    return name


def rebuild(pipe: Any, inversions: TextualInversions, kept: dict) -> None:
    """The tokenizers and embedding tables as before the first load, then ``kept`` added."""
    restored = []
    for (_, encoder), original in zip(
        pipe.prompt_encoder.encoders, inversions.originals, strict=True
    ):
        encoder.resize_token_embeddings(original.rows)
        restored.append((copy.deepcopy(original.tokenizer), encoder))
    pipe.prompt_encoder.encoders = restored
    for name, embeddings in kept.items():
        add_tokens(restored, name, embeddings)
    inversions.loaded = dict(kept)
    pipe.textual_inversions = inversions if kept else None


def unload(pipe: Any, tokens: str | list[str] | None = None) -> list[str]:
    """Remove the named textual inversions (None: all) and return their tokens: the tokenizers
    and embedding tables are restored to what they were before the first load, and the ones
    kept are added again."""
    state = getattr(pipe, "textual_inversions", None)
    if tokens is None:
        names = [] if state is None else list(state.loaded)
    else:
        names = [tokens] if isinstance(tokens, str) else list(tokens)
    if not names:
        return []
    if state is None:
        raise ValueError(f"no textual inversion is loaded (asked to unload {names!r})")
    unknown = [name for name in names if name not in state.loaded]
    if unknown:
        raise ValueError(
            f"textual inversion token(s) {unknown} are not loaded; loaded: {sorted(state.loaded)}"
        )
    kept = {name: value for name, value in state.loaded.items() if name not in names}
    rebuild(pipe, state, kept)
    return names
