"""SDXL's micro-conditioning: the ``time_ids`` its ``text_time`` U-Nets take beside the pooled
text embedding. A base U-Net takes (original size, crop top-left, target size), a refiner's
(original size, crop top-left, aesthetic score), as diffusers' SDXL pipelines make them."""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from fastdiff.pipeline.conditioning import Conditioning


def time_id_count(aesthetic: bool) -> int:
    """SDXL's micro-conditioning ids per sample: 6 size ids, or 5 with an aesthetic score (a
    refiner: original size, crop, score)."""
    return 5 if aesthetic else 6


SIZE_KEYS = (
    "original_size",
    "crops_coords_top_left",
    "target_size",
    "negative_original_size",
    "negative_crops_coords_top_left",
    "negative_target_size",
)


def check_size_options(sizes: dict, text_time: bool) -> None:
    """The size keyword arguments of a pipeline call: known names, and only for SDXL U-Nets."""
    unknown = sorted(set(sizes) - set(SIZE_KEYS))
    if unknown:
        raise TypeError(f"unexpected keyword arguments {unknown}")
    given = sorted(key for key, value in sizes.items() if value is not None)
    if given and not text_time:
        raise ValueError(
            f"{', '.join(given)}: size micro-conditioning is for SDXL U-Nets "
            "(addition_embed_type 'text_time'); this U-Net has none"
        )


def size_pair(value, name: str, least: int) -> tuple[int, int] | None:
    if value is None:
        return None
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in value)
        or any(v < least for v in value)
    ):
        raise ValueError(f"{name} must be a (height, width) pair of ints >= {least}, got {value!r}")
    return int(value[0]), int(value[1])


# diffusers' StableDiffusionXLImg2ImgPipeline defaults: aesthetic_score, negative_aesthetic_score.
AESTHETIC_SCORES = (6.0, 2.5)


def aesthetic_scores(
    required: bool, score: float | None, negative_score: float | None
) -> tuple[float, float] | None:
    """(score, negative score) for an SDXL refiner's U-Net (``required``: its folder's
    requires_aesthetics_score), defaults filled in; None for other U-Nets, which refuse them."""
    given = {"aesthetic_score": score, "negative_aesthetic_score": negative_score}
    if not required:
        named = [name for name, value in given.items() if value is not None]
        if named:
            raise ValueError(
                f"{' and '.join(named)}: aesthetic-score conditioning is for SDXL refiner U-Nets "
                "(requires_aesthetics_score in model_index.json); this pipeline has none"
            )
        return None
    for name, value in given.items():
        if value is not None and (
            isinstance(value, bool)
            or not isinstance(value, numbers.Real)
            or not math.isfinite(value)
        ):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    return (
        AESTHETIC_SCORES[0] if score is None else float(score),
        AESTHETIC_SCORES[1] if negative_score is None else float(negative_score),
    )


def add_time_ids(
    conditioning: Conditioning,
    height: int,
    width: int,
    unet_config,
    sizes: dict | None = None,
    aesthetic: tuple[float, float] | None = None,
    from_image: bool = False,
) -> None:
    """SDXL micro-conditioning: (original size, crop top-left, target size) per sample, from
    ``sizes`` (the keys of ``SIZE_KEYS``; each a (height, width) or (top, left) pair), as
    diffusers' SDXL pipeline reads them: original and target size default to the image size,
    the crop to (0, 0); the unconditional batch takes the ``negative_*`` ones when both
    negative sizes are given, else the same ids. ``from_image`` (img2img, inpainting) follows
    diffusers' SDXL img2img and inpainting pipelines instead: each negative size defaults to
    its positive one and the unconditional batch takes the positive crop, so
    negative_crops_coords_top_left, which they ignore, is refused.

    With ``aesthetic`` ((score, negative score): an SDXL refiner) the ids are (original size,
    crop top-left, aesthetic score), as diffusers' StableDiffusionXLImg2ImgPipeline makes them
    under requires_aesthetics_score: the unconditional batch takes negative_original_size
    (default: original_size), negative_crops_coords_top_left (default (0, 0)) and the negative
    score. Target sizes are not part of them, and are refused."""
    sizes = dict.fromkeys(SIZE_KEYS) | dict(sizes or {})
    count = time_id_count(aesthetic is not None)
    pooled_dim = conditioning.cond["text_embeds"].shape[-1]
    expected = unet_config.get("projection_class_embeddings_input_dim")
    per_id = unet_config.get("addition_time_embed_dim")
    provided = pooled_dim + count * per_id
    if expected != provided:  # embeddings given without a width check (see text_widths)
        raise ValueError(
            f"this U-Net expects {expected} added-condition features, but the pooled text "
            f"embeddings ({pooled_dim}) and {count} ids of {per_id} give {provided}"
        )
    if aesthetic is not None:
        targets = [key for key in ("target_size", "negative_target_size") if sizes[key]]
        if targets:
            raise ValueError(
                f"{' and '.join(targets)}: an SDXL refiner (requires_aesthetics_score) is "
                "conditioned on original_size, crops_coords_top_left and aesthetic_score, not "
                "on a target size"
            )
    pairs = {key: size_pair(value, key, 0 if "crops" in key else 1) for key, value in sizes.items()}
    negative = [pairs[key] for key in SIZE_KEYS[3:]]
    if aesthetic is None and from_image and negative[1] is not None:
        raise ValueError(
            "negative_crops_coords_top_left: diffusers' SDXL img2img and inpainting pipelines "
            "give the unconditional batch crops_coords_top_left too; pass that instead"
        )
    if (
        aesthetic is None
        and not from_image
        and any(v is not None for v in negative)
        and (negative[0] is None or negative[2] is None)
    ):
        # diffusers uses the negative ids only when both sizes are given, else ignores them.
        raise ValueError(
            "negative micro-conditioning needs both negative_original_size and "
            "negative_target_size (negative_crops_coords_top_left defaults to (0, 0))"
        )

    reference = conditioning.cond["encoder_hidden_states"]

    def ids(original, crop, last) -> torch.Tensor:
        values = [*(original or (height, width)), *(crop or (0, 0)), *last]
        row = torch.tensor([values], dtype=reference.dtype, device=reference.device)
        return row.expand(conditioning.batch_size, count).contiguous()

    original, crop, target = (pairs[key] for key in SIZE_KEYS[:3])
    if aesthetic is not None:
        conditioning.cond["time_ids"] = ids(original, crop, aesthetic[:1])
        if conditioning.uncond is not None:
            negative_original = negative[0] or original
            conditioning.uncond["time_ids"] = ids(negative_original, negative[1], aesthetic[1:])
        return
    time_ids = ids(original, crop, target or (height, width))
    conditioning.cond["time_ids"] = time_ids
    if conditioning.uncond is None:
        return
    if from_image:
        uncond_ids = ids(negative[0] or original, crop, negative[2] or target or (height, width))
    else:
        uncond_ids = ids(*negative) if negative[0] is not None else time_ids.clone()
    conditioning.uncond["time_ids"] = uncond_ids
