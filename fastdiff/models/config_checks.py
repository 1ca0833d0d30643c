"""The checks a diffusers ``config.json`` value goes through: each raises ``ValueError`` naming
the key, the value and what is supported, so a hand-edited file fails here rather than as a
TypeError or a shape error inside torch (see ``fastdiff.models.config``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def require_choice(key: str, value: Any, supported: Sequence[Any]) -> None:
    """Raise ``ValueError`` naming ``key`` and the supported values when ``value`` is not one."""
    if value not in supported:
        allowed = ", ".join(repr(option) for option in supported)
        raise ValueError(f"unsupported config value {key}={value!r}; supported values: {allowed}")


def require_positive_int(key: str, value: Any, allow_none: bool = False) -> None:
    """Raise ``ValueError`` naming ``key`` unless ``value`` is an int >= 1 (or None if allowed):
    a string "4", a float or a bool from a hand-edited config.json fails here, not in torch."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        wanted = "a positive int" + (" or null" if allow_none else "")
        raise ValueError(f"unsupported config value {key}={value!r}; supported values: {wanted}")


def require_bool(key: str, value: Any) -> None:
    """A flag must be true, false or null (read as false, as diffusers reads it: SDXL's published
    U-Net config has ``"upcast_attention": null``); a string "false" would be true."""
    if value is not None and not isinstance(value, bool):
        raise ValueError(
            f"unsupported config value {key}={value!r}; supported values: true, false, null"
        )


def require_group_channels(block_out_channels: Sequence[Any], groups: int) -> None:
    """Every block's channel count: a positive int that the GroupNorms' ``groups`` divides."""
    for channels in block_out_channels:
        positive = isinstance(channels, int) and not isinstance(channels, bool) and channels >= 1
        if not positive or channels % groups:
            raise ValueError(
                f"config block_out_channels {list(block_out_channels)}: every entry must be a "
                f"positive int that norm_num_groups={groups} divides"
            )


def require_list(key: str, value: Any) -> None:
    """A per-block key must be a non-empty JSON list (a string would be read one character per
    block; an empty list has no blocks to build)."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"config {key} must be a non-empty list, got {value!r}")


def require_positive_number(key: str, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(
            f"unsupported config value {key}={value!r}; supported values: a positive number"
        )


def require_finite_number(key: str, value: Any) -> None:
    """Any real number but NaN and the infinities (a bool or a string is no number here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(
            f"unsupported config value {key}={value!r}; supported values: a number, finite"
        )


def require_fraction(key: str, value: Any) -> None:
    """A probability: a number from 0 to 1 (a dropout rate)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(
            f"unsupported config value {key}={value!r}; supported values: a number from 0 to 1"
        )


def per_block(key: str, value: Any, count: int) -> list:
    """Broadcast an int/None config value to one entry per block, or check a list's length."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(
                f"config {key} has {len(value)} entries but there are {count} blocks: {list(value)}"
            )
        return list(value)
    return [value] * count
