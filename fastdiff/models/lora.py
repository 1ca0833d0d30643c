"""LoRA weights (Hu et al. 2021) fused into a model's own weights: W += scale * alpha / r * B @ A.

Fused, a LoRA costs nothing at inference: the model keeps its layers, kernels and folds, and
captured CUDA graphs, which read the weights in place, see the new values without a recapture.
``LoraFusion`` keeps each changed weight's original, so ``restore`` gives back the model's
weights exactly.

Three file layouts are read, the ones diffusers' ``load_lora_weights`` reads for SD U-Nets and
CLIP text encoders (keys grouped by the module they patch, one prefix per component):

* PEFT / diffusers: ``<prefix>.<module>.lora_A.weight`` (A, r x in) and ``.lora_B.weight``
  (B, out x r), with an optional ``<prefix>.<module>.alpha``;
* diffusers' older attention-processor layout: ``<prefix>.<attention>.processor.to_q_lora.down
  .weight`` / ``.up.weight`` (``to_out_lora`` patches ``to_out.0``), and ``<module>.lora.down``;
* kohya (sd-scripts): ``lora_unet_<module path, dots as underscores>.lora_down.weight``,
  ``.lora_up.weight`` and ``.alpha``, with ``lora_te_`` (``lora_te1_`` / ``lora_te2_`` for
  SDXL's two encoders) for the text encoders. Names in the original SD (LDM) layout, as
  SDXL kohya files use for the U-Net, are not mapped: they are refused with the key named.

Without an alpha, alpha = r (scale 1), as diffusers assumes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

PROCESSOR = re.compile(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")


@dataclass
class LoraLayer:
    """One patched module's factors: ``down`` (A, r x in[, kh, kw]), ``up`` (B, out x r[, 1, 1])
    and ``alpha`` (None: r)."""

    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None

    def delta(self, weight: torch.Tensor, scale: float, key: str) -> torch.Tensor:
        """scale * alpha / r * B @ A, shaped like ``weight``, in float32."""
        if self.down is None or self.up is None:
            raise ValueError(f"LoRA weights for {key!r}: both up and down factors are needed")
        rank = self.down.shape[0]
        if self.up.shape[1] != rank:
            raise ValueError(
                f"LoRA weights for {key!r}: down has rank {rank} but up has {self.up.shape[1]}"
            )
        product = self.up.flatten(1).float() @ self.down.flatten(1).float()
        if product.numel() != weight.numel():
            raise ValueError(
                f"LoRA weights for {key!r} make a {tuple(product.shape)} update for a weight of "
                f"shape {tuple(weight.shape)}"
            )
        alpha = rank if self.alpha is None else self.alpha
        return product.reshape(weight.shape) * (scale * alpha / rank)


def split_components(
    state_dict: dict[str, torch.Tensor], prefixes: dict[str, tuple[str, ...]]
) -> dict[tuple[str, bool], dict[str, LoraLayer]]:
    """The file's layers per (component, kohya naming): ``prefixes`` maps a component name to
    the key prefixes that address it (``"unet"``: ``("unet.", "lora_unet_")``; those ending in
    "_" are kohya's). A key no prefix claims, or of a kind LoRA files do not hold, raises
    ValueError naming it."""
    layers: dict[tuple[str, bool], dict[str, LoraLayer]] = {}
    for key, value in state_dict.items():
        for component, starts in prefixes.items():
            start = next((prefix for prefix in starts if key.startswith(prefix)), None)
            if start is not None:
                kohya = start.endswith("_")
                module, part = parse_key(key[len(start) :], kohya, key)
                layer = layers.setdefault((component, kohya), {}).setdefault(module, LoraLayer())
                if part == "alpha":
                    layer.alpha = float(value)
                else:
                    setattr(layer, part, value)
                break
        else:
            known = ", ".join(prefix for starts in prefixes.values() for prefix in starts)
            raise ValueError(f"LoRA key {key!r} addresses none of this pipeline's models ({known})")
    return layers


def parse_key(rest: str, kohya: bool, key: str) -> tuple[str, str]:
    """(module path, "down" | "up" | "alpha") of a key without its component prefix; kohya
    module paths keep their underscores (``resolve`` matches them)."""
    if kohya:
        for suffix, part in ((".lora_down.weight", "down"), (".lora_up.weight", "up")):
            if rest.endswith(suffix):
                return rest[: -len(suffix)], part
        if rest.endswith(".alpha"):
            return rest[: -len(".alpha")], "alpha"
    else:
        processor = PROCESSOR.match(rest)
        if processor:
            attention, projection, part = processor.groups()
            projection = "to_out.0" if projection == "to_out" else projection
            return f"{attention}.{projection}", part
        for suffix, part in (
            (".lora_A.weight", "down"),
            (".lora_B.weight", "up"),
            (".lora.down.weight", "down"),
            (".lora.up.weight", "up"),
            (".alpha", "alpha"),
        ):
            if rest.endswith(suffix):
                return rest[: -len(suffix)], part
    raise ValueError(
        f"LoRA key {key!r}: not a LoRA factor or alpha (expected lora_A/lora_B, lora.down/"
        "lora.up or kohya's lora_down/lora_up/alpha)"
    )


def module_finder(model: nn.Module, kohya: bool):
    """A function from a LoRA layer's module path to the module it patches (None if absent): the
    dotted path, or for kohya names the path with its dots written as underscores; a text
    encoder's path with or without the ``text_model`` level, which transformers 5's CLIP text
    model no longer has and files written with transformers 4 name."""
    modules = dict(model.named_modules())
    separator = "_" if kohya else "."
    if kohya:
        modules = {name.replace(".", "_"): module for name, module in modules.items()}
    wrapper = f"text_model{separator}"

    def find(path: str) -> nn.Module | None:
        module = modules.get(path)
        if module is None and path.startswith(wrapper):  # a transformers 4 name, a 5 model
            module = modules.get(path[len(wrapper) :])
        if module is None and not path.startswith(wrapper):  # the other way round
            module = modules.get(wrapper + path)
        return module

    return find


@dataclass
class LoraFusion:
    """The weights LoRA layers were fused into, with their originals (to ``restore`` them)."""

    originals: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @torch.no_grad()
    def fuse(self, targets: list[tuple[nn.Module, dict[str, LoraLayer], bool]], scale: float):
        """Add every layer's update to its module's weight, in place; ``targets``: (model, its
        layers, kohya naming). Every module is found and every update checked before any weight
        changes, so an error leaves all models as they were."""
        updates = []
        for model, layers, kohya in targets:
            find = module_finder(model, kohya)
            for path, layer in layers.items():
                module = find(path)
                weight = getattr(module, "weight", None)
                if not isinstance(module, (nn.Linear, nn.Conv2d)) or weight is None:
                    what = "no such module" if module is None else type(module).__name__
                    raise ValueError(
                        f"LoRA layer {path!r}: {what} in the {type(model).__name__} to patch (a "
                        "Linear or Conv2d; QKV projections fused by pipe.optimize() take LoRA "
                        "weights only before it)"
                    )
                updates.append((weight, layer.delta(weight, scale, path)))
        for weight, delta in updates:
            self.originals.setdefault(id(weight), (weight, weight.detach().clone()))
            weight.add_(delta.to(device=weight.device, dtype=weight.dtype))

    @torch.no_grad()
    def restore(self) -> int:
        """Put back every fused weight's original values; returns how many."""
        for weight, original in self.originals.values():
            weight.copy_(original)
        count = len(self.originals)
        self.originals.clear()
        return count
