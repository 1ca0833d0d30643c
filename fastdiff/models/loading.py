"""``load_unet`` / ``load_vae`` and ``save_pretrained``: diffusers component folders in and out.

Loading builds the model on the meta device (no memory, no random init), reads and checks every
tensor against the model's expected keys and shapes, and only then assigns them: a checkpoint
either loads completely or raises, never leaving a half-loaded model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from fastdiff.models.attention import LEGACY_ATTENTION_NAMES
from fastdiff.models.checkpoint import (
    CONFIG_NAME,
    CheckpointError,
    find_weights,
    format_keys,
    read_json,
    read_weights,
    write_component,
)
from fastdiff.models.config import UNetConfig, VAEConfig
from fastdiff.models.module import ModelBase
from fastdiff.models.tiny_vae import AutoencoderTiny, TinyVAEConfig
from fastdiff.models.unet import UNet2DConditionModel
from fastdiff.models.vae import AutoencoderKL


def rename_legacy_keys(
    state_dict: dict[str, torch.Tensor], expected: dict[str, torch.Size]
) -> dict[str, torch.Tensor]:
    """Map old VAE attention names (query/key/value/proj_attn) onto the current ones."""
    renamed = {}
    for key, tensor in state_dict.items():
        prefix, _, param = key.rpartition(".")
        module_path, _, name = prefix.rpartition(".")
        if key not in expected and name in LEGACY_ATTENTION_NAMES:
            new_key = f"{module_path}.{LEGACY_ATTENTION_NAMES[name]}.{param}"
            if new_key in expected:
                if tensor.dim() == 4 and tensor.shape[2:] == (1, 1) and len(expected[new_key]) == 2:
                    # 1x1-conv form of a linear weight; any other kernel is left mis-shaped
                    tensor = tensor[:, :, 0, 0]
                key = new_key
        renamed[key] = tensor
    return renamed


def check_state_dict(
    state_dict: dict[str, torch.Tensor], expected: dict[str, torch.Size], source: Path
) -> None:
    """Raise one ``CheckpointError`` listing missing, unexpected and mis-shaped keys."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = sorted(
        f"{key} (checkpoint {tuple(state_dict[key].shape)}, model {tuple(expected[key])})"
        for key in set(expected) & set(state_dict)
        if tuple(state_dict[key].shape) != tuple(expected[key])
    )
    problems = []
    for label, keys in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("mis-shaped keys", misshaped),
    ):
        if keys:
            problems.append(f"{len(keys)} {label}: {format_keys(keys)}")
    if problems:
        raise CheckpointError(f"{source}: weights do not match the config: " + "; ".join(problems))


def build_from_folder(
    model_class: type[ModelBase],
    config_class,
    path: str | os.PathLike,
    dtype: torch.dtype | None,
    device: str | torch.device | None,
    variant: str | None,
) -> ModelBase:
    folder = Path(path)
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
    try:
        device = torch.device(device) if device is not None else torch.device("cpu")
    except RuntimeError as error:
        raise ValueError(f"device {device!r} is not a torch device: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {str(device)!r} was requested but CUDA is not available")
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a directory")
    config_path = folder / CONFIG_NAME
    try:
        config = config_class.from_dict(read_json(config_path))
    except CheckpointError:
        raise
    except ValueError as error:
        raise ValueError(f"{config_path}: {error}") from None
    weights_path = find_weights(folder, variant)
    with torch.device("meta"):
        model = model_class(config)
    model_state = model.state_dict()
    expected = {key: value.shape for key, value in model_state.items()}
    state_dict = rename_legacy_keys(read_weights(weights_path), expected)
    check_state_dict(state_dict, expected, weights_path)
    # Only floating-point tensors are cast below; an integer or bool one would fail inside
    # load_state_dict with a message that does not name the file.
    not_float = sorted(
        f"{key} ({state_dict[key].dtype})"
        for key, value in model_state.items()
        if value.is_floating_point() and not state_dict[key].is_floating_point()
    )
    if not_float:
        raise CheckpointError(
            f"{weights_path}: {len(not_float)} weights are not floating-point tensors: "
            f"{format_keys(not_float)}"
        )
    dtype = dtype or torch.float32
    state_dict = {
        key: value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
        for key, value in state_dict.items()
    }
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


def load_unet(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    variant: str | None = None,
) -> UNet2DConditionModel:
    """Load a diffusers ``UNet2DConditionModel`` folder (float32 on the CPU unless asked)."""
    return build_from_folder(UNet2DConditionModel, UNetConfig, path, dtype, device, variant)


def load_vae(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    variant: str | None = None,
) -> AutoencoderKL:
    """Load a diffusers ``AutoencoderKL`` or ``AutoencoderTiny`` (TAESD) folder (float32 on the
    CPU unless asked), by the ``_class_name`` of its config.json."""
    config_path = Path(path) / CONFIG_NAME
    if config_path.is_file() and read_json(config_path).get("_class_name") == "AutoencoderTiny":
        return build_from_folder(AutoencoderTiny, TinyVAEConfig, path, dtype, device, variant)
    return build_from_folder(AutoencoderKL, VAEConfig, path, dtype, device, variant)


def save_pretrained(
    model: nn.Module,
    folder: str | os.PathLike,
    dtype: torch.dtype | None = None,
    variant: str | None = None,
) -> Path:
    """Write ``model`` as a diffusers component folder that load_unet/load_vae and diffusers read.

    Fused projections are written as diffusers' separate to_q/to_k/to_v keys. ``dtype`` casts the
    floating-point weights (e.g. ``torch.float16`` with ``variant="fp16"``).
    """
    if not isinstance(model, (UNet2DConditionModel, AutoencoderKL, AutoencoderTiny)):
        raise ValueError(
            "save_pretrained expects a fastdiff UNet2DConditionModel, AutoencoderKL or "
            f"AutoencoderTiny, got "
            f"{type(model).__name__}"
        )
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
    state_dict = model.state_dict()
    if dtype is not None:
        state_dict = {
            key: value.to(dtype) if value.is_floating_point() else value
            for key, value in state_dict.items()
        }
    return write_component(folder, model.config.to_dict(), state_dict, variant)
