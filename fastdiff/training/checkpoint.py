"""Atomic, resumable checkpoints.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then moved over
the old one with ``os.replace`` (atomic on POSIX and Windows), so an interruption at any moment
leaves either the previous checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from fastdiff.files import atomic_write


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any] | None:
    """The checkpoint at ``path``, or None when there is none yet."""
    if not os.path.exists(path):
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a damaged file
        raise RuntimeError(
            f"checkpoint {path} cannot be read ({error}); delete it to restart"
        ) from error


def capture_rng_state() -> dict[str, Any]:
    """Global RNG states (the loop itself draws from per-step generators, see loop.py)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
