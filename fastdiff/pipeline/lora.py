"""A pipeline's LoRA files: which model each key addresses, read and fused by
``fastdiff.models.lora`` (``Pipeline.load_lora_weights``)."""

from __future__ import annotations

import json
import math
import numbers
from pathlib import Path
from typing import Any

import torch

from fastdiff.models.lora import LoraFusion, apply_adapter_config, split_components

# The names diffusers saves LoRA weights under, in its order of preference (the pickled one
# is what its scripts wrote before safetensors became their default)
LORA_FILES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
METADATA_KEY = "lora_adapter_metadata"  # where diffusers writes the PEFT adapter configs

# The key prefixes that address each model: diffusers' and PEFT's, then kohya's.
COMPONENT_PREFIXES = {
    "unet": ("unet.", "lora_unet_"),
    "text_encoder": ("text_encoder.", "lora_te_", "lora_te1_"),
    "text_encoder_2": ("text_encoder_2.", "lora_te2_"),
}


def read_lora_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A LoRA state dict from a file, or from a folder's ``pytorch_lora_weights.safetensors``
    (else ``.bin``), and the adapter configs its safetensors metadata holds
    (``lora_adapter_metadata``: keys ``<component>.<option>``, as diffusers'
    ``save_lora_weights`` writes them; {} if none)."""
    from fastdiff.models.checkpoint import read_file

    if path.is_dir():
        path = next(
            (path / name for name in LORA_FILES if (path / name).is_file()), path / LORA_FILES[0]
        )
    if not path.is_file():
        raise FileNotFoundError(f"LoRA weights not found: {path}")
    metadata: dict[str, Any] = {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                raw = (handle.metadata() or {}).get(METADATA_KEY)
        except Exception as error:  # safetensors' own errors name no file
            raise ValueError(
                f"{path}: cannot read safetensors file, truncated or corrupt? ({error})"
            ) from None
        if raw:
            try:
                metadata = json.loads(raw)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: {METADATA_KEY} is not valid JSON ({error})") from None
            if not isinstance(metadata, dict):
                raise ValueError(
                    f"{path}: {METADATA_KEY} must be a JSON object (keys <component>.<option>), "
                    f"got {type(metadata).__name__}"
                )
    return read_file(path), metadata


def fuse_lora(
    pipe: Any, fusion: LoraFusion, source: str | Path | dict[str, torch.Tensor], scale: float
) -> int:
    """Fuse ``source``'s LoRA layers into ``pipe``'s U-Net and text encoders (by the names their
    folders have: an SDXL refiner's one encoder is text_encoder_2); returns how many."""
    if isinstance(scale, torch.Tensor) and scale.dim() == 0 and not scale.is_complex():
        scale = scale.item()  # a 0-d tensor, as diffusers' fuse_lora takes
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"LoRA scale must be a finite number, got {scale!r}")
    scale = float(scale)  # numpy's floats too
    state_dict, metadata = (
        (source, {}) if isinstance(source, dict) else read_lora_file(Path(source))
    )
    models = {"unet": pipe.unet}
    if pipe.prompt_encoder is not None:
        encoder = pipe.prompt_encoder
        pairs = zip(encoder.names, encoder.encoders, strict=True)
        models.update({name: pair[1] for name, pair in pairs})
    targets = []
    for (component, kohya), layers in split_components(state_dict, COMPONENT_PREFIXES).items():
        if component not in models:
            raise ValueError(f"the LoRA weights patch {component}, which this pipeline lacks")
        config = {
            key[len(component) + 1 :]: value
            for key, value in metadata.items()
            if key.startswith(component + ".")
        }
        if config and not kohya:
            apply_adapter_config(layers, config, f"LoRA weights for {component}")
        targets.append((models[component], layers, kohya))
    fusion.fuse(targets, float(scale))
    return sum(len(layers) for _, layers, _ in targets)
