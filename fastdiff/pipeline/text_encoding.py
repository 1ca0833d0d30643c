"""Prompt encoding with the CLIP text encoders of a Stable Diffusion folder.

fastdiff does not reimplement CLIP: text encoders and tokenizers are read with transformers, which
is imported only when a folder actually has a text encoder (``pip install fastdiff[text]``).

Two conventions, chosen by the U-Net:
- SD 1.x / 2.x: the last hidden state of one CLIP text encoder (after its final layer norm).
- SDXL (``addition_embed_type="text_time"``): the penultimate hidden states of both encoders,
  concatenated on the channel axis, plus the pooled, projected embedding of the second encoder,
  which the U-Net receives with the size/crop "time ids" (Podell et al. 2023, SDXL, section 2.2).
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastdiff.models.checkpoint import format_keys
from fastdiff.pipeline.textual_inversion import expand_prompt

SUPPORTED_TEXT_ENCODERS = ("CLIPTextModel", "CLIPTextModelWithProjection")
SUPPORTED_TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast")


def import_transformers() -> Any:
    try:
        return importlib.import_module("transformers")
    except ImportError as error:
        raise RuntimeError(
            "this pipeline folder has a CLIP text encoder, which fastdiff reads with the "
            "'transformers' package; install it with: pip install 'fastdiff[text]'"
        ) from error


def load_text_component(
    folder: Path,
    class_name: str,
    supported: Sequence[str],
    device,
    dtype,
    variant: str | None = None,
) -> Any:
    """Load one transformers text encoder or tokenizer from ``folder`` (a pipeline subfolder);
    ``variant`` ("fp16") selects ``model.<variant>.safetensors`` for encoders."""
    if class_name not in supported:
        raise ValueError(
            f"{folder}: unsupported class {class_name!r} in model_index.json; "
            f"supported: {', '.join(supported)}"
        )
    if not folder.is_dir():
        raise FileNotFoundError(f"model_index.json lists {folder.name!r} but {folder} is missing")
    transformers = import_transformers()
    component_class = getattr(transformers, class_name, None)
    if component_class is None:  # transformers 5 folded the *Fast tokenizers into one class
        component_class = transformers.CLIPTokenizer
    is_tokenizer = "Tokenizer" in class_name
    options: dict[str, Any] = {}
    if not is_tokenizer:
        # transformers 5 loads in the config's dtype by default, and some published configs
        # say float16 beside float32 weights: ask for the dtype wanted (float32 unless
        # told), so the stored values are read, not rounded through float16. (torch_dtype: the
        # name transformers 4 knows; 5 still reads it.) The loading report says which weights
        # the file lacked, which transformers would otherwise fill with random values.
        options = {"torch_dtype": dtype or torch.float32, "output_loading_info": True}
        if variant:
            options["variant"] = variant
    try:
        component = component_class.from_pretrained(str(folder), **options)
        if not is_tokenizer:
            component, loading_info = component
    except OSError as error:
        raise FileNotFoundError(f"cannot load {class_name} from {folder}: {error}") from error
    except Exception as error:  # e.g. a truncated safetensors file: name the folder
        raise ValueError(
            f"cannot load {class_name} from {folder}: {type(error).__name__}: {error}"
        ) from error
    if not is_tokenizer:
        missing = sorted(loading_info.get("missing_keys") or ())
        if missing:
            raise ValueError(
                f"{folder}: the weights do not match {class_name}: {len(missing)} missing "
                f"(transformers would fill them with random values): {format_keys(missing)}"
            )
    # transformers builds a tokenizer even from an empty folder: two special tokens and no
    # maximum length, which fails only at the first prompt (OverflowError in padding).
    if "Tokenizer" in class_name and (
        len(component) <= 2 or not 0 < component.model_max_length <= 1_000_000
    ):
        raise ValueError(
            f"{folder}: the tokenizer has no vocabulary or no model_max_length; are its files "
            "(tokenizer.json, or vocab.json + merges.txt, and tokenizer_config.json) missing?"
        )
    if isinstance(component, torch.nn.Module):
        # (loaded in this dtype already: with none asked for, float32 like the U-Net and VAE,
        # not fp16 because the folder happens to store or name fp16 weights)
        dtype = dtype or torch.float32
        component = component.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return component


@dataclass
class PromptEmbeddings:
    """Per-token embeddings (B, L, D) and, for SDXL, pooled embeddings (B, P)."""

    tokens: torch.Tensor
    pooled: torch.Tensor | None = None


def warn_if_truncated(tokenizer: Any, prompts: Sequence[str], limit: int) -> None:
    """Warn, naming the words dropped, when a prompt has more tokens than the encoder reads (as
    diffusers does: the end of a long prompt has no effect on the image)."""
    for prompt in prompts:
        ids = tokenizer(prompt, truncation=False).input_ids
        if len(ids) > limit:
            # Keep the end-of-text token out of the dropped part: it is re-added at the cut.
            dropped = tokenizer.decode(ids[limit - 1 : -1], skip_special_tokens=True)
            warnings.warn(
                f"prompt truncated to the text encoder's {limit} tokens ({len(ids)} given); "
                f"dropped: {dropped!r}",
                UserWarning,
                stacklevel=2,
            )


def check_clip_skip(clip_skip: int | None, most: int) -> int:
    """``clip_skip`` as an int in [0, most] (None reads as 0, the default layer)."""
    if clip_skip is None:
        return 0
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 0 <= clip_skip <= most:
        raise ValueError(
            f"clip_skip must be an int in [0, {most}] for this text encoder, got {clip_skip!r}"
        )
    return clip_skip


class PromptEncoder:
    """Tokenize and encode prompts with one (SD 1/2) or two (SDXL) CLIP text encoders.

    ``encoders`` is a list of (tokenizer, text_encoder) pairs in pipeline order; ``penultimate``
    selects SDXL's penultimate-hidden-state convention.
    """

    def __init__(
        self,
        encoders: Sequence[tuple[Any, torch.nn.Module]],
        penultimate: bool,
        names: Sequence[str] | None = None,
    ) -> None:
        """``names``: the encoders' folder names (default text_encoder, text_encoder_2), by
        which LoRA files address them (an SDXL refiner has text_encoder_2 only)."""
        if not encoders:
            raise ValueError("PromptEncoder needs at least one (tokenizer, text encoder) pair")
        self.encoders = list(encoders)
        self.penultimate = penultimate
        default = ["text_encoder", "text_encoder_2"][: len(self.encoders)]
        self.names = list(default if names is None else names)
        if len(self.names) != len(self.encoders):
            raise ValueError(f"{len(self.names)} names for {len(self.encoders)} text encoders")

    @property
    def device(self) -> torch.device:
        return next(self.encoders[0][1].parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.encoders[0][1].parameters()).dtype

    @property
    def max_length(self) -> int:
        """The most tokens every text encoder reads (77 for CLIP)."""
        return min(tokenizer.model_max_length for tokenizer, _ in self.encoders)

    @torch.no_grad()
    def encode(
        self,
        prompts: Sequence[str],
        max_length: int | None = None,
        prompts_2: Sequence[str] | None = None,
        clip_skip: int | None = None,
    ) -> PromptEmbeddings:
        """Encode a batch of prompts, padded (or truncated) to ``max_length`` tokens (default:
        the tokenizer's maximum), which must not exceed what the encoders read.

        ``prompts_2``: what the second encoder (SDXL's ``text_encoder_2``) reads instead of
        ``prompts``. ``clip_skip``: take the hidden state that many layers before the one used
        by default, as diffusers does (SD 1/2: the last layer's, through the final LayerNorm;
        SDXL: the penultimate)."""
        prompts = list(prompts)
        texts = [prompts, prompts if prompts_2 is None else list(prompts_2)]
        not_strings = [prompt for batch in texts for prompt in batch if not isinstance(prompt, str)]
        if not_strings:
            raise ValueError(f"prompts must be strings, got {not_strings[0]!r}")
        if len(texts[1]) != len(prompts):
            raise ValueError(f"{len(texts[1])} prompts_2 for {len(prompts)} prompts")
        if max_length is not None and max_length > self.max_length:
            raise ValueError(
                f"cannot encode prompts to {max_length} tokens: the text encoder reads at most "
                f"{self.max_length} (given prompt_embeds that long need negative_prompt_embeds "
                "as well)"
            )
        per_encoder, pooled = [], None
        for index, (tokenizer, encoder) in enumerate(self.encoders):
            limit = max_length or tokenizer.model_max_length
            # Multi-vector textual inversion tokens stand for all their vectors' tokens.
            batch = [expand_prompt(tokenizer, prompt) for prompt in texts[index]]
            tokens = tokenizer(
                batch, padding="max_length", max_length=limit, truncation=True, return_tensors="pt"
            )
            if index == 0 or prompts_2 is not None:
                warn_if_truncated(tokenizer, batch, limit)
            input_ids = tokens.input_ids.to(self.device)
            layers = encoder.config.num_hidden_layers
            if self.penultimate:
                skip = check_clip_skip(clip_skip, layers - 1)
                output = encoder(input_ids, output_hidden_states=True)
                # The projected pooled embedding is the 2-D first output of the encoder
                # *WithProjection; the plain encoder's first output is its 3-D last hidden state.
                if pooled is None and output[0].ndim == 2:
                    pooled = output[0]
                per_encoder.append(output.hidden_states[-(skip + 2)])
                continue
            use_mask = getattr(encoder.config, "use_attention_mask", False)
            mask = tokens.attention_mask.to(self.device) if use_mask else None
            if clip_skip is None:
                per_encoder.append(encoder(input_ids, attention_mask=mask)[0])
            else:
                skip = check_clip_skip(clip_skip, layers)
                output = encoder(input_ids, attention_mask=mask, output_hidden_states=True)
                hidden = output.hidden_states[-(skip + 1)]
                # transformers 5 flattened CLIPTextModel; 4.x keeps the layers under .text_model
                text_model = getattr(encoder, "text_model", encoder)
                per_encoder.append(text_model.final_layer_norm(hidden))
        return PromptEmbeddings(torch.cat(per_encoder, dim=-1), pooled)
