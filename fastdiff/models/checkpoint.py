"""Reading and writing diffusers component folders: config.json + safetensors weights.

Layouts read, in diffusers' order of preference: the sharded form
(``diffusion_pytorch_model.safetensors.index[.fp16].json``, or diffusers' older
``diffusion_pytorch_model.safetensors.fp16.index.json``, naming the shard files; an index
present means the folder is sharded, as in diffusers), ``diffusion_pytorch_model.safetensors``,
then the pickled ``.bin`` forms older folders ship (read with ``torch.load(weights_only=True)``,
which refuses anything but tensors and containers). A variant such as ``fp16`` tags each name
(``diffusion_pytorch_model.fp16.safetensors``). Every failure names the file it concerns.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from fastdiff.files import atomic_write

WEIGHTS_NAME = "diffusion_pytorch_model"
CONFIG_NAME = "config.json"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded: bad file, bad config or mismatched weights."""


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def index_names(extension: str, variant: str | None) -> list[str]:
    """The names a sharded checkpoint's index can have, preferred first: diffusers' current
    ``diffusion_pytorch_model.safetensors.index.fp16.json`` and, for a variant, the older
    ``diffusion_pytorch_model.safetensors.fp16.index.json`` it still reads."""
    if not variant:
        return [f"{WEIGHTS_NAME}.{extension}.index.json"]
    return [
        f"{WEIGHTS_NAME}.{extension}.index.{variant}.json",
        f"{WEIGHTS_NAME}.{extension}.{variant}.index.json",
    ]


def weight_candidates(folder: Path, variant: str | None) -> list[Path]:
    """Files that can hold the weights, in order of preference."""

    def names(tag: str | None) -> list[str]:
        suffix = f".{tag}" if tag else ""
        found = []
        for extension in ("safetensors", "bin"):
            found += [*index_names(extension, tag), f"{WEIGHTS_NAME}{suffix}.{extension}"]
        return found

    if variant is not None:
        return [folder / name for name in names(variant)]
    # No variant asked for: the default weights, else an fp16 variant when it is all there is.
    return [folder / name for name in names(None) + names("fp16")]


def find_weights(folder: Path, variant: str | None = None) -> Path:
    for candidate in weight_candidates(folder, variant):
        if candidate.is_file():
            return candidate
    looked = ", ".join(path.name for path in weight_candidates(folder, variant))
    raise FileNotFoundError(f"{folder}: no weights file found (looked for {looked})")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file on the CPU; a bad file raises naming it."""
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(
            f"{path}: cannot read safetensors file, truncated or corrupt? ({error})"
        ) from None


def read_pickled(path: Path) -> dict[str, torch.Tensor]:
    """A ``.bin`` state dict, loaded with ``weights_only=True``: tensors and plain containers
    only, never arbitrary pickled objects."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling raises many types; name the file
        raise CheckpointError(
            f"{path}: cannot read a PyTorch state dict from this file, truncated, corrupt or "
            f"not weights-only? ({type(error).__name__}: {error})"
        ) from None
    if not isinstance(state_dict, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor)
        for key, value in state_dict.items()
    ):
        raise CheckpointError(f"{path}: expected a dict of name -> tensor (a state dict)")
    return state_dict


def read_file(path: Path) -> dict[str, torch.Tensor]:
    return read_pickled(path) if path.suffix == ".bin" else read_safetensors(path)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The full state dict from one weights file or a sharded index. As in diffusers, every
    tensor of each shard the index names is read, and each key the index lists must be there."""
    if not path.name.endswith(".json"):
        return read_file(path)
    index = read_json(path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{path}: index has no 'weight_map' object")
    by_shard: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CheckpointError(f"{path}: weight_map[{key!r}] is {shard!r}, not a file name")
        by_shard.setdefault(shard, []).append(key)
    tensors: dict[str, torch.Tensor] = {}
    for shard, keys in sorted(by_shard.items()):
        shard_path = path.parent / shard
        shard_tensors = read_file(shard_path)
        absent = [key for key in keys if key not in shard_tensors]
        if absent:
            raise CheckpointError(
                f"{shard_path}: the index lists {len(absent)} tensors this file lacks: "
                f"{format_keys(absent)}"
            )
        tensors.update(shard_tensors)
    return tensors


def format_keys(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def write_component(
    folder: str | os.PathLike,
    config: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    variant: str | None = None,
) -> Path:
    """Write ``config.json`` and ``diffusion_pytorch_model[.variant].safetensors`` atomically.

    The weights are written first and the config last, each through a temp file and a rename, so
    a reader never sees a partially written file. A sharded checkpoint of the same variant left
    by an earlier save is removed once the new weights are in place: its index would otherwise
    be read before them (by fastdiff and diffusers alike).
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    # Serialised before anything is written: a value JSON cannot hold (a tensor, a set) must not
    # fail after the new weights have replaced the old ones beside the old config.
    try:
        config_text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"{folder / CONFIG_NAME}: the config cannot be written as JSON ({error})"
        ) from None
    folder.mkdir(parents=True, exist_ok=True)
    # Own, contiguous CPU copies: safetensors refuses tensors that share storage (fused splits).
    tensors = {
        key: value.detach().to("cpu").contiguous().clone() for key, value in state_dict.items()
    }
    suffix = f".{variant}" if variant else ""
    weights = folder / f"{WEIGHTS_NAME}{suffix}.safetensors"
    atomic_write(weights, lambda temp: save_file(tensors, temp, metadata={"format": "pt"}))
    remove_stale_index(folder, variant, keep=weights.name)

    def write_config(temp: str) -> None:
        with open(temp, "w", encoding="utf-8") as out:
            out.write(config_text)

    atomic_write(folder / CONFIG_NAME, write_config)
    return folder


def remove_stale_index(folder: Path, variant: str | None, keep: str) -> None:
    """Delete the safetensors index (and the shard files it names) of ``variant`` in ``folder``,
    left by an earlier sharded save that the single file ``keep``, just written, replaces."""
    for name in index_names("safetensors", variant):
        index_path = folder / name
        if not index_path.is_file():
            continue
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8")).get("weight_map")
        except (OSError, ValueError, AttributeError):
            weight_map = None  # unreadable: the index goes, its shards cannot be named
        shards = set()
        if isinstance(weight_map, dict):
            shards = {shard for shard in weight_map.values() if isinstance(shard, str)}
        index_path.unlink()
        for shard in shards:
            if Path(shard).name != shard:  # only shards in this folder, never a path elsewhere
                continue
            if shard.startswith(WEIGHTS_NAME) and shard != keep:
                shard_path = folder / shard
                if shard_path.is_file() and shard_path.suffix == ".safetensors":
                    shard_path.unlink()
