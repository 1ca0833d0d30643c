"""Turning user inputs (prompts, prompt embeddings, class labels) into U-Net keyword inputs.

A condition is a dict of batched tensors whose keys are U-Net inputs: ``encoder_hidden_states``
(text), ``text_embeds`` and ``time_ids`` (SDXL's added conditions), ``class_labels``. Keeping it a
flat dict lets classifier-free guidance concatenate [uncond; cond] key by key in one forward.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fastdiff.pipeline.micro_conditioning import time_id_count
from fastdiff.pipeline.text_encoding import PromptEncoder

Condition = dict[str, torch.Tensor]


@dataclass
class Conditioning:
    """The conditional inputs and, when classifier-free guidance is on, the unconditional ones
    (same keys and shapes)."""

    cond: Condition
    uncond: Condition | None

    @property
    def batch_size(self) -> int:
        return next(iter(self.cond.values())).shape[0]


def as_list(value, name: str) -> list:
    """A single value or a sequence/1-D tensor of values -> a non-empty list."""
    if isinstance(value, torch.Tensor):
        if value.ndim > 1:
            raise ValueError(
                f"{name} must be a scalar or 1-D tensor, got shape {tuple(value.shape)}"
            )
        value = value.reshape(-1).tolist()
    elif isinstance(value, str) or not isinstance(value, Sequence):
        return [value]
    if len(value) == 0:
        raise ValueError(f"{name} must not be empty")
    return list(value)


def class_conditioning(
    class_labels, num_class_embeds: int, null_label: int, num_images: int, guided: bool, device
) -> Conditioning:
    """Class labels, each repeated ``num_images`` times; unconditional input: the null label."""
    labels = as_list(class_labels, "class_labels")
    valid = [label for label in range(num_class_embeds) if label != null_label]
    for label in labels:
        if isinstance(label, bool) or not isinstance(label, numbers.Integral):
            raise ValueError(f"class labels must be ints, got {label!r}")
        if label not in valid:
            raise ValueError(
                f"class label {label!r} out of range: this model has {len(valid)} classes "
                f"({valid[0]}..{valid[-1]}); label {null_label} is the null class used for guidance"
                if valid
                else f"class label {label!r}: this model has no classes besides the null class"
            )
    labels = [int(label) for label in labels]
    tensor = torch.tensor(labels, dtype=torch.long, device=device).repeat_interleave(num_images)
    cond = {"class_labels": tensor}
    uncond = {"class_labels": torch.full_like(tensor, null_label)} if guided else None
    return Conditioning(cond, uncond)


def check_embeddings(name: str, tensor: torch.Tensor, ndim: int, like: torch.Tensor | None) -> None:
    if not isinstance(tensor, torch.Tensor) or tensor.ndim != ndim:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{name} must be a {ndim}-D tensor, got {shape}")
    if tensor.numel() == 0:  # no prompt or no token: it failed later, naming something else
        raise ValueError(f"{name} is empty: shape {tuple(tensor.shape)}")
    if like is not None and tensor.shape != like.shape:
        raise ValueError(
            f"{name} has shape {tuple(tensor.shape)} but the prompt embeddings have "
            f"{tuple(like.shape)}"
        )


def check_width(name: str, tensor: torch.Tensor, expected: int | None, source: str) -> None:
    """A text embedding's feature size against the U-Net's (else the first matmul fails)."""
    if expected is not None and tensor.shape[-1] != expected:
        raise ValueError(
            f"{name} has {tensor.shape[-1]} features but this U-Net takes {expected} ({source}): "
            "the embeddings or the text encoder(s) do not belong to this U-Net"
        )


def broadcast(value, name: str, batch: int) -> list:
    """One entry, or one per prompt, as a list of ``batch`` entries."""
    values = as_list(value, name)
    if len(values) == 1 and batch > 1:
        values = values * batch
    if len(values) != batch:
        raise ValueError(f"{name} has {len(values)} entries but there are {batch} prompts")
    return values


def check_text_only_options(encoder, prompt, prompt_2, negative_prompt_2, clip_skip) -> None:
    """Options that act on the text encoders: refused where they would be ignored."""
    if clip_skip is not None and prompt is None:
        raise ValueError("clip_skip acts on the text encoder: pass prompt, not prompt_embeds")
    for name, value in (("prompt_2", prompt_2), ("negative_prompt_2", negative_prompt_2)):
        if value is None:
            continue
        if encoder is None or len(encoder.encoders) < 2:
            raise ValueError(
                f"{name} is what a second text encoder (SDXL's text_encoder_2) reads; this "
                "pipeline has none"
            )
        if name == "prompt_2" and prompt is None:
            raise ValueError("pass prompt_2 with prompt, not with prompt_embeds")


def text_widths(config, aesthetic: bool = False) -> tuple[int | None, int | None]:
    """The feature sizes a U-Net takes: the text tokens' (``cross_attention_dim``) and, for
    SDXL's ``text_time``, the pooled embedding's (the added-condition features less the
    micro-conditioning ids', ``time_id_count``); None where the config does not fix one."""
    tokens = config.get("cross_attention_dim")
    if isinstance(tokens, (list, tuple)):
        tokens = tokens[0] if len(set(tokens)) == 1 else None
    pooled = None
    if config.get("addition_embed_type") == "text_time":
        added = config.get("projection_class_embeddings_input_dim")
        time_ids = config.get("addition_time_embed_dim")
        if isinstance(added, int) and isinstance(time_ids, int):
            pooled = added - time_id_count(aesthetic) * time_ids
    return (tokens if isinstance(tokens, int) else None), pooled


def text_conditioning(
    encoder: PromptEncoder | None,
    prompt,
    negative_prompt,
    prompt_embeds: torch.Tensor | None,
    negative_prompt_embeds: torch.Tensor | None,
    pooled_prompt_embeds: torch.Tensor | None,
    negative_pooled_prompt_embeds: torch.Tensor | None,
    needs_pooled: bool,
    zeros_for_empty_negative: bool,
    num_images: int,
    guided: bool,
    device,
    dtype,
    widths: tuple[int | None, int | None] = (None, None),
    prompt_2=None,
    negative_prompt_2=None,
    clip_skip: int | None = None,
) -> Conditioning:
    """Prompt (or given embeddings) -> encoder_hidden_states (and SDXL's text_embeds).
    ``widths``: the token and pooled feature sizes the U-Net takes (None: unchecked), checked on
    the prompt's embeddings before any negative is made or compared with them.
    ``prompt_2`` / ``negative_prompt_2``: what SDXL's second text encoder reads (default, and
    for an empty string: the prompt / negative prompt). Pooled embeddings given with a prompt
    are kept, the prompt's tokens encoded. ``clip_skip`` applies to the prompt only, as in
    diffusers."""
    if (prompt is None) == (prompt_embeds is None):
        raise ValueError("pass exactly one of prompt and prompt_embeds")
    check_text_only_options(encoder, prompt, prompt_2, negative_prompt_2, clip_skip)
    if negative_prompt_2 is not None and negative_prompt_embeds is not None:
        raise ValueError("pass negative_prompt_2 or negative_prompt_embeds, not both")
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise ValueError("pass negative_prompt or negative_prompt_embeds, not both")
    # diffusers reads an empty second prompt as none given (prompt_2 or prompt), once
    # the checks above (which diffusers also makes with `is not None`) have passed
    prompt_2 = None if isinstance(prompt_2, str) and not prompt_2 else prompt_2
    if isinstance(negative_prompt_2, str) and not negative_prompt_2:
        negative_prompt_2 = None
    pooled = pooled_prompt_embeds
    if prompt is not None:
        if encoder is None:
            raise ValueError("this pipeline has no text encoder: pass prompt_embeds instead")
        prompts = as_list(prompt, "prompt")
        seconds = None if prompt_2 is None else broadcast(prompt_2, "prompt_2", len(prompts))
        encoded = encoder.encode(prompts, prompts_2=seconds, clip_skip=clip_skip)
        prompt_embeds = encoded.tokens
        # a pooled embedding given with the prompt is kept, as diffusers keeps it
        pooled = encoded.pooled if pooled is None else pooled
    check_embeddings("prompt_embeds", prompt_embeds, 3, None)
    check_width("prompt_embeds", prompt_embeds, widths[0], "cross_attention_dim")
    batch, length = prompt_embeds.shape[:2]
    if not needs_pooled:
        given = [
            name
            for name, value in (
                ("pooled_prompt_embeds", pooled_prompt_embeds),
                ("negative_pooled_prompt_embeds", negative_pooled_prompt_embeds),
            )
            if value is not None
        ]
        if given:
            raise ValueError(
                f"{' and '.join(given)} given, but this U-Net takes no pooled text embedding "
                "(only SDXL's addition_embed_type 'text_time' does)"
            )
    if needs_pooled:
        if pooled is None:
            raise ValueError("this U-Net (SDXL text_time) needs pooled_prompt_embeds")
        check_embeddings("pooled_prompt_embeds", pooled, 2, None)
        check_width(
            "pooled_prompt_embeds",
            pooled,
            widths[1],
            "projection_class_embeddings_input_dim less addition_time_embed_dim per "
            "micro-conditioning id: 6, or 5 with requires_aesthetics_score, an SDXL refiner's",
        )
        if pooled.shape[0] != batch:
            raise ValueError(
                f"pooled_prompt_embeds has batch {pooled.shape[0]}, prompt_embeds {batch}"
            )

    negative_pooled = negative_pooled_prompt_embeds
    if guided and negative_prompt_embeds is None:
        if negative_prompt is None and zeros_for_empty_negative:
            # all zeros, as diffusers makes them: a negative input given would be ignored
            ignored = [
                name
                for name, value in (
                    ("negative_prompt_2", negative_prompt_2),
                    ("negative_pooled_prompt_embeds", negative_pooled_prompt_embeds),
                )
                if value is not None
            ]
            if ignored:
                raise ValueError(
                    f"{' and '.join(ignored)} given without negative_prompt: this folder's "
                    "force_zeros_for_empty_prompt makes the unconditional input all zeros, "
                    'which ignores it; pass negative_prompt ("" for an empty one) to have the '
                    "negative encoded, or negative_prompt_embeds"
                )
            negative_prompt_embeds = torch.zeros_like(prompt_embeds)
            negative_pooled = torch.zeros_like(pooled) if needs_pooled else None
        else:
            if encoder is None:
                raise ValueError(
                    "guidance needs negative_prompt_embeds when the pipeline has no text encoder"
                )
            negatives = broadcast(
                "" if negative_prompt is None else negative_prompt, "negative_prompt", batch
            )
            seconds = None
            if negative_prompt_2 is not None:
                seconds = broadcast(negative_prompt_2, "negative_prompt_2", batch)
            encoded = encoder.encode(negatives, max_length=length, prompts_2=seconds)
            negative_prompt_embeds = encoded.tokens
            if negative_pooled is None:  # (a given one is kept, as for the prompt)
                negative_pooled = encoded.pooled
    if guided:
        check_embeddings("negative_prompt_embeds", negative_prompt_embeds, 3, prompt_embeds)
        if needs_pooled:
            if negative_pooled is None:
                raise ValueError("guidance on this U-Net needs negative_pooled_prompt_embeds")
            check_embeddings("negative_pooled_prompt_embeds", negative_pooled, 2, pooled)

    def expand(tensor: torch.Tensor) -> torch.Tensor:
        # Each prompt's copies stay adjacent, as diffusers' num_images_per_prompt orders them.
        return tensor.to(device=device, dtype=dtype).repeat_interleave(num_images, dim=0)

    cond = {"encoder_hidden_states": expand(prompt_embeds)}
    uncond = {"encoder_hidden_states": expand(negative_prompt_embeds)} if guided else None
    if needs_pooled:
        cond["text_embeds"] = expand(pooled)
        if guided:
            uncond["text_embeds"] = expand(negative_pooled)
    return Conditioning(cond, uncond)


# Inputs that act on text; a class-conditional model without a text encoder refuses them.
TEXT_OPTIONS = (
    "negative_prompt",
    "prompt_2",
    "negative_prompt_2",
    "clip_skip",
    "negative_prompt_embeds",
    "pooled_prompt_embeds",
    "negative_pooled_prompt_embeds",
)
# The unconditional (negative) text inputs of classifier-free guidance.
NEGATIVE_INPUTS = (
    "negative_prompt",
    "negative_prompt_2",
    "negative_prompt_embeds",
    "negative_pooled_prompt_embeds",
)


def encode_inputs(pipe, guided: bool, num_images: int, **inputs) -> Conditioning:
    """Text and/or class inputs -> U-Net keyword inputs for the conditional (and, when guided,
    the unconditional) batch, each input repeated ``num_images`` times."""
    text_inputs = ("prompt", "prompt_embeds")
    if pipe.unet.config.get("time_cond_proj_dim") is not None:
        negatives = [name for name in NEGATIVE_INPUTS if inputs.get(name) is not None]
        if negatives:
            raise ValueError(
                f"{', '.join(negatives)} given, but this U-Net takes the guidance scale in its "
                "time embedding (time_cond_proj_dim) and runs no classifier-free guidance: it "
                "has no unconditional input"
            )
    if pipe.is_text_conditional:
        if all(inputs.get(name) is None for name in text_inputs):
            raise ValueError("this is a text-to-image model: pass prompt or prompt_embeds")
        conditioning = text_conditioning(
            pipe.prompt_encoder,
            inputs.get("prompt"),
            inputs.get("negative_prompt"),
            inputs.get("prompt_embeds"),
            inputs.get("negative_prompt_embeds"),
            inputs.get("pooled_prompt_embeds"),
            inputs.get("negative_pooled_prompt_embeds"),
            needs_pooled=pipe.unet.config.get("addition_embed_type") == "text_time",
            widths=text_widths(pipe.unet.config, pipe.requires_aesthetics_score),
            prompt_2=inputs.get("prompt_2"),
            negative_prompt_2=inputs.get("negative_prompt_2"),
            clip_skip=inputs.get("clip_skip"),
            zeros_for_empty_negative=pipe.force_zeros_for_empty_prompt,
            num_images=num_images,
            guided=guided,
            device=pipe.device,
            dtype=pipe.dtype,
        )
    else:
        given = [name for name in text_inputs + TEXT_OPTIONS if inputs.get(name) is not None]
        if given:
            raise ValueError(
                "this model is class-conditional and has no text encoder: pass class_labels "
                f"instead of a prompt (given: {', '.join(given)})"
            )
    if not pipe.is_class_conditional:
        if inputs.get("class_labels") is not None:
            raise ValueError("this model is not class-conditional: class_labels is not used")
        return conditioning
    if inputs.get("class_labels") is None:
        raise ValueError(
            f"this model is class-conditional: pass class_labels (0..{pipe.num_classes - 1})"
        )
    classes = class_conditioning(
        inputs["class_labels"],
        pipe.unet.config["num_class_embeds"],
        pipe.null_class_label,
        num_images,
        guided,
        pipe.device,
    )
    if not pipe.is_text_conditional:
        return classes
    if classes.batch_size != conditioning.batch_size:
        raise ValueError(
            f"{classes.batch_size // num_images} class labels for "
            f"{conditioning.batch_size // num_images} prompts"
        )
    conditioning.cond.update(classes.cond)
    if guided:
        conditioning.uncond.update(classes.uncond)
    return conditioning
