"""Classifier-free guidance (Ho & Salimans 2022) as a model wrapper, with guidance rescale
(Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Sec. 3.4)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Condition = torch.Tensor | dict[str, Any] | None


def combine_guidance(
    uncond: torch.Tensor,
    cond: torch.Tensor,
    guidance_scale: float,
    guidance_rescale: float = 0.0,
) -> torch.Tensor:
    """uncond + w (cond - uncond); with ``guidance_rescale`` = phi > 0 the result is blended with
    itself rescaled to the per-sample standard deviation of ``cond`` (Lin et al. 2023, Eq. 15-16):
    phi * g * std(cond) / std(g) + (1 - phi) * g, std over all non-batch dims (unbiased)."""
    if uncond.shape != cond.shape:
        raise ValueError(f"uncond shape {tuple(uncond.shape)} != cond shape {tuple(cond.shape)}")
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale must lie in [0, 1], got {guidance_rescale}")
    guided = uncond + guidance_scale * (cond - uncond)
    if guidance_rescale == 0.0:
        return guided
    dims = list(range(1, cond.dim()))
    std_cond = cond.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True)
    rescaled = guided * (std_cond / std_guided)
    return guidance_rescale * rescaled + (1.0 - guidance_rescale) * guided


def _batch_size(condition: Condition) -> int | None:
    if isinstance(condition, dict):
        sizes = {key: _batch_size(value) for key, value in condition.items()}
        sizes = {key: size for key, size in sizes.items() if size is not None}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"condition dict entries disagree on the batch size: {sizes}")
        return next(iter(sizes.values()), None)
    if isinstance(condition, torch.Tensor):
        if condition.dim() == 0:
            raise ValueError("a condition tensor needs a batch dimension")
        return condition.shape[0]
    return None


def _batch_conditions(uncond: Condition, cond: Condition) -> Condition:
    """[uncond; cond] along dim 0 for a tensor, a dict of tensors (per key), or None."""
    if cond is None and uncond is None:
        return None
    if isinstance(cond, dict) or isinstance(uncond, dict):
        if not (isinstance(cond, dict) and isinstance(uncond, dict)):
            raise ValueError(
                "cond and uncond must both be dicts when one is; got "
                f"{type(cond).__name__} and {type(uncond).__name__}"
            )
        if set(cond) != set(uncond):
            raise ValueError(f"cond keys {sorted(cond)} differ from uncond keys {sorted(uncond)}")
        return {key: _batch_conditions(uncond[key], cond[key]) for key in cond}
    if not (isinstance(cond, torch.Tensor) and isinstance(uncond, torch.Tensor)):
        raise ValueError(
            "cond and uncond must both be tensors, both dicts of tensors, or both None; got "
            f"{type(cond).__name__} and {type(uncond).__name__}"
        )
    if cond.shape != uncond.shape:
        raise ValueError(f"cond shape {tuple(cond.shape)} != uncond shape {tuple(uncond.shape)}")
    return torch.cat([uncond, cond], dim=0)


def classifier_free_guidance(
    model_fn: Callable[[torch.Tensor, torch.Tensor, Condition], torch.Tensor],
    cond: Condition,
    uncond: Condition,
    guidance_scale: float,
    guidance_rescale: float = 0.0,
    shared_input: bool = False,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Wrap ``model_fn(x, t, condition)`` into a guided ``model_fn(x_t, t)`` for
    :func:`fastdiff.sample`: each call runs ONE batched forward
    ``model_fn(cat[x, x], cat[t, t], cat[uncond, cond])`` and combines the halves with
    :func:`combine_guidance`. ``cond``/``uncond`` are tensors, dicts of tensors (e.g. SDXL's
    ``added_cond_kwargs``; concatenated per key) or both None, each with the batch first. The
    conditions are concatenated once, here, not at every step. ``shared_input``: the forward
    is ``model_fn(x, t, cat[uncond, cond])`` instead, for a model that takes two conditions
    per sample (fastdiff's U-Net: ``fastdiff.models.context_groups``) and returns both
    halves."""
    # The batch size first: it refuses a 0-dim condition, which torch.cat would reject unclearly.
    cond_batch = _batch_size(cond)
    conditions = _batch_conditions(uncond, cond)
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale must lie in [0, 1], got {guidance_rescale}")

    def guided(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        batch = x_t.shape[0]
        if cond_batch is not None and cond_batch != batch:
            raise ValueError(
                f"the condition has batch size {cond_batch} but x_t has batch size {batch}"
            )
        if shared_input:
            output = model_fn(x_t, t, conditions)
        else:
            output = model_fn(torch.cat([x_t, x_t]), torch.cat([t, t]), conditions)
        if output.shape[0] != 2 * batch:
            raise ValueError(
                f"guided model output has batch {output.shape[0]}, expected {2 * batch}"
            )
        output_uncond, output_cond = output.chunk(2)
        return combine_guidance(output_uncond, output_cond, guidance_scale, guidance_rescale)

    return guided
