"""LoRA weights (Hu et al. 2021) fused into a model's own weights: W += scale * alpha / r * B @ A.

Fused, a LoRA costs nothing at inference: the model keeps its layers, kernels and folds, and
captured CUDA graphs, which read the weights in place, see the new values without a recapture.
A projection that an attention module has fused with others (``to_q`` in ``to_qkv``, as
``pipe.optimize()`` fuses them) is patched in its rows of the fused weight (``fused_part``).
``LoraFusion`` keeps each changed weight's original, so ``restore`` gives back the model's
weights exactly.

Three file layouts are read, the ones diffusers' ``load_lora_weights`` reads for SD U-Nets and
CLIP text encoders (keys grouped by the module they patch, one prefix per component):

* PEFT / diffusers: ``<prefix>.<module>.lora_A.weight`` (A, r x in) and ``.lora_B.weight``
  (B, out x r), with an optional ``<prefix>.<module>.alpha``;
* diffusers' older attention-processor layout: ``<prefix>.<attention>.processor.to_q_lora.down
  .weight`` / ``.up.weight`` (``to_out_lora`` patches ``to_out.0``), and ``<module>.lora.down``;
  for text encoders ``<attention>.to_q_lora.down.weight`` (patching ``q_proj`` ... ``out_proj``)
  and ``<module>.lora_linear_layer.down.weight``;
* kohya (sd-scripts): ``lora_unet_<module path, dots as underscores>.lora_down.weight``,
  ``.lora_up.weight`` and ``.alpha``, with ``lora_te_`` (``lora_te1_`` / ``lora_te2_`` for
  SDXL's two encoders) for the text encoders. SDXL files name the U-Net's modules as the
  original (SGM / LDM) U-Net does (``input_blocks_4_1_transformer_blocks_0_attn1_to_q``):
  ``sgm_unet_path`` maps those to diffusers' module paths.

Without an alpha, alpha = r (scale 1), as diffusers assumes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

PROCESSOR = re.compile(r"^(.*?)(\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
# diffusers' older text-encoder layout names CLIP's projections as the processors named them
CLIP_PROJECTIONS = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


@dataclass
class LoraLayer:
    """One patched module's factors: ``down`` (A, r x in[, kh, kw]), ``up`` (B, out x r[, 1, 1])
    and ``alpha`` (None: r); ``rslora``: the update is scaled by alpha / sqrt(r) (PEFT's
    use_rslora) instead of alpha / r."""

    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None
    rslora: bool = False

    def delta(self, weight: torch.Tensor, scale: float, key: str) -> torch.Tensor:
        """scale * alpha / r * B @ A, shaped like ``weight``, in float32. The factors' shapes
        must fit the weight's: B's rows its outputs, A's columns its inputs (times the kernel,
        whose size a convolution's A must have)."""
        if self.down is None or self.up is None:
            raise ValueError(f"LoRA weights for {key!r}: both up and down factors are needed")
        rank = self.down.shape[0]
        down, up = self.down.flatten(1), self.up.flatten(1)
        kernel_ok = not (self.down.dim() == 4 and weight.dim() == 4) or (
            self.down.shape[2:] == weight.shape[2:]
        )
        if (
            up.shape != (weight.shape[0], rank)
            or down.shape[1] != weight[0].numel()
            or not (kernel_ok)
        ):
            raise ValueError(
                f"LoRA weights for {key!r}: up {tuple(self.up.shape)} and down "
                f"{tuple(self.down.shape)} do not fit a weight of shape {tuple(weight.shape)} "
                f"(up: ({weight.shape[0]}, r), down: (r, {', '.join(map(str, weight.shape[1:]))}))"
            )
        alpha = rank if self.alpha is None else self.alpha
        divisor = rank**0.5 if self.rslora else rank
        return (up.float() @ down.float()).reshape(weight.shape) * (scale * alpha / divisor)


def apply_adapter_config(layers: dict[str, LoraLayer], config: dict[str, object], where: str):
    """A PEFT adapter config (diffusers writes it into the file's safetensors metadata, key
    ``lora_adapter_metadata``): ``lora_alpha``, ``alpha_pattern`` (regular expressions that a
    module's name, or its part after some dot, must match to its end; the first that matches
    applies, as in PEFT's get_pattern_key) and ``use_rslora`` set the alphas of the layers
    the file gives none; DoRA is refused."""
    if config.get("use_dora"):
        raise ValueError(f"{where}: DoRA adapters (use_dora) are not supported")
    lora_alpha = config.get("lora_alpha")
    patterns = config.get("alpha_pattern") or {}
    for path, layer in layers.items():
        if layer.alpha is None:
            matched = [
                alpha
                for pattern, alpha in patterns.items()
                if re.match(rf"(.*\.)?({pattern})$", path)
            ]
            layer.alpha = float(matched[0]) if matched else lora_alpha
            layer.alpha = None if layer.alpha is None else float(layer.alpha)
        layer.rslora = bool(config.get("use_rslora"))


def split_components(
    state_dict: dict[str, torch.Tensor], prefixes: dict[str, tuple[str, ...]]
) -> dict[tuple[str, bool], dict[str, LoraLayer]]:
    """The file's layers per (component, kohya naming): ``prefixes`` maps a component name to
    the key prefixes that address it (``"unet"``: ``("unet.", "lora_unet_")``; those ending in
    "_" are kohya's). A key no prefix claims, or of a kind LoRA files do not hold, raises
    ValueError naming it, and so does a factor or alpha that two keys give for one module (in
    two layouts: one of them would be dropped) or an alpha that is not one number."""
    layers: dict[tuple[str, bool], dict[str, LoraLayer]] = {}
    given: dict[tuple[str, bool, str, str], str] = {}  # (component, kohya, module, part) -> key
    for key, value in state_dict.items():
        for component, starts in prefixes.items():
            start = next((prefix for prefix in starts if key.startswith(prefix)), None)
            if start is not None:
                kohya = start.endswith("_")
                text_encoder = component.startswith("text_encoder")
                module, part = parse_key(key[len(start) :], kohya, key, text_encoder)
                earlier = given.setdefault((component, kohya, module, part), key)
                if earlier != key:
                    raise ValueError(
                        f"LoRA keys {earlier!r} and {key!r} both give the {part} of {module!r}"
                    )
                layer = layers.setdefault((component, kohya), {}).setdefault(module, LoraLayer())
                if part == "alpha":
                    layer.alpha = read_alpha(value, key)
                else:
                    setattr(layer, part, value)
                break
        else:
            known = ", ".join(prefix for starts in prefixes.values() for prefix in starts)
            raise ValueError(f"LoRA key {key!r} addresses none of this pipeline's models ({known})")
    return layers


def read_alpha(value: object, key: str) -> float:
    """A LoRA alpha: one number (a scalar or one-element tensor)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
    raise ValueError(f"LoRA alpha {key!r} is not one number ({shape})")


def parse_key(rest: str, kohya: bool, key: str, text_encoder: bool = False) -> tuple[str, str]:
    """(module path, "down" | "up" | "alpha") of a key without its component prefix; kohya
    module paths keep their underscores (``resolve`` matches them). ``text_encoder``: the key
    addresses a CLIP text encoder, whose attention-processor layout (diffusers 0.15-0.16:
    ``self_attn.to_q_lora.down.weight``) names ``q_proj`` ... ``out_proj`` by the U-Net's names."""
    if kohya:
        for suffix, part in ((".lora_down.weight", "down"), (".lora_up.weight", "up")):
            if rest.endswith(suffix):
                return rest[: -len(suffix)], part
        if rest.endswith(".alpha"):
            return rest[: -len(".alpha")], "alpha"
    else:
        processor = PROCESSOR.match(rest)
        if processor:
            attention, _, projection, part = processor.groups()
            if text_encoder:
                projection = CLIP_PROJECTIONS[projection]
            elif projection == "to_out":
                projection = "to_out.0"
            return f"{attention}.{projection}", part
        for suffix, part in (
            (".lora_A.weight", "down"),
            (".lora_B.weight", "up"),
            (".lora.down.weight", "down"),
            (".lora.up.weight", "up"),
            (".lora_linear_layer.down.weight", "down"),  # diffusers 0.17-0.20 text encoders
            (".lora_linear_layer.up.weight", "up"),
            (".alpha", "alpha"),
        ):
            if rest.endswith(suffix):
                return rest[: -len(suffix)], part
    raise ValueError(
        f"LoRA key {key!r}: not a LoRA factor or alpha (expected lora_A/lora_B, lora.down/"
        "lora.up or kohya's lora_down/lora_up/alpha)"
    )


SGM_RESNET = {"in_layers_2": "conv1", "out_layers_3": "conv2", "emb_layers_1": "time_emb_proj"}
SGM_RESNET["skip_connection"] = "conv_shortcut"
SGM_OUTSIDE = {
    "input_blocks_0_0": "conv_in",
    "out_2": "conv_out",
    "time_embed_0": "time_embedding_linear_1",
    "time_embed_2": "time_embedding_linear_2",
    "label_emb_0_0": "add_embedding_linear_1",
    "label_emb_0_2": "add_embedding_linear_2",
}
SGM_BLOCK = re.compile(r"^(input_blocks|middle_block|output_blocks)_(\d+)_(?:(\d+)_)?(.*)$")


def sgm_unet_path(path: str, layers_per_block: int) -> str | None:
    """A kohya U-Net module path in the original SGM / LDM layout, as diffusers' (underscored):
    input block i > 0 is down block (i - 1) // (L + 1), layer (i - 1) % (L + 1), the last of
    which is the downsampler (``op``); output block i is up block i // (L + 1), layer
    i % (L + 1); their part 0 is the ResNet, 1 the transformer, 2 the upsampler; the middle
    block is ResNet, transformer, ResNet. None when ``path`` is not in that layout."""
    for name, mapped in SGM_OUTSIDE.items():
        if path == name:
            return mapped
    match = SGM_BLOCK.match(path)
    if match is None:
        return None
    kind, index, part, rest = match.group(1), int(match.group(2)), match.group(3), match.group(4)
    span = layers_per_block + 1
    if kind == "middle_block":
        inner = ("resnets_0", "attentions_0", "resnets_1")[index] if index < 3 else None
        rest = f"{part}_{rest}" if part is not None else rest  # the middle block has no part
        prefix = None if inner is None else f"mid_block_{inner}"
    elif part is None:
        return None
    elif kind == "input_blocks":
        if index == 0 or int(part) > 1:  # only conv_in (SGM_OUTSIDE), ResNet 0, transformer 1
            return None
        block, layer = divmod(index - 1, span)
        if layer == layers_per_block:  # the downsampler: op is its convolution
            prefix, rest = f"down_blocks_{block}_downsamplers_0", rest.replace("op", "conv", 1)
        else:
            prefix = f"down_blocks_{block}_{('resnets', 'attentions')[int(part)]}_{layer}"
    else:
        block, layer = divmod(index, span)
        inner = ("resnets", "attentions", "upsamplers")[int(part)] if int(part) < 3 else None
        layer = 0 if inner == "upsamplers" else layer
        prefix = None if inner is None else f"up_blocks_{block}_{inner}_{layer}"
    if prefix is None:
        return None
    if "resnets" in prefix:
        rest = SGM_RESNET.get(rest, rest)
    return f"{prefix}_{rest}"


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
    config = getattr(model, "config", None)  # a U-Net's (a text encoder's has no such key)
    get = getattr(config, "get", None)
    layers_per_block = get("layers_per_block") if callable(get) else None

    def find(path: str) -> nn.Module | None:
        module = modules.get(path)
        if module is None and kohya and isinstance(layers_per_block, int):
            mapped = sgm_unet_path(path, layers_per_block)
            path = path if mapped is None else mapped
            module = modules.get(path)
        if module is None and path.startswith(wrapper):  # a transformers 4 name, a 5 model
            module = modules.get(path[len(wrapper) :])
        if module is None and not path.startswith(wrapper):  # the other way round
            module = modules.get(wrapper + path)
        if module is None:
            return fused_part(modules, path, separator)
        return module

    return find


FUSED_PARTS = ("to_q", "to_k", "to_v")  # the projections attention modules fuse


def fused_part(modules: dict[str, nn.Module], path: str, separator: str):
    """For a projection that an attention module has fused (``to_q`` of a ``to_qkv``, as
    ``pipe.optimize()`` fuses them): (the fused Linear, the row range of its weight that is
    that projection's). None when ``path`` names no such projection."""
    part = next((name for name in FUSED_PARTS if path.endswith(separator + name)), None)
    parent = None if part is None else modules.get(path[: -len(separator + part)])
    if parent is None or not getattr(parent, "fused", False):
        return None
    layout = getattr(parent, "fused_layout", None)
    name, parts = layout() if callable(layout) else (None, ())
    layer = getattr(parent, name, None) if part in parts else None
    if not isinstance(layer, nn.Linear):
        return None  # a wrapped fused layer (its own LoRA, say): not patched through here
    rows = layer.out_features // len(parts)
    start = parts.index(part) * rows
    return layer, slice(start, start + rows)


@dataclass
class LoraFusion:
    """The weights LoRA layers were fused into, with their originals, kept in host memory (to
    ``restore`` them), and the models they belong to."""

    originals: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    models: list[nn.Module] = field(default_factory=list)

    @torch.no_grad()
    def fuse(self, targets: list[tuple[nn.Module, dict[str, LoraLayer], bool]], scale: float):
        """Add every layer's update to its module's weight, in place; ``targets``: (model, its
        layers, kohya naming). Every module is found and every update checked before any weight
        changes, so an error leaves all models as they were."""
        updates = []
        for model, layers, kohya in targets:
            find = module_finder(model, kohya)
            for path, layer in layers.items():
                module, rows = find(path), slice(None)
                if isinstance(module, tuple):  # a projection fused with others: its rows
                    module, rows = module
                weight = getattr(module, "weight", None)
                if not isinstance(module, (nn.Linear, nn.Conv2d)) or weight is None:
                    what = "no such module" if module is None else type(module).__name__
                    raise ValueError(
                        f"LoRA layer {path!r}: {what} in the {type(model).__name__} to patch (a "
                        "Linear or Conv2d)"
                    )
                updates.append((weight, rows, layer.delta(weight[rows], scale, path)))
        for model, _, _ in targets:
            if not any(model is known for known in self.models):
                self.models.append(model)
        for weight, rows, delta in updates:
            if id(weight) not in self.originals:
                self.originals[id(weight)] = (weight, weight.detach().to("cpu", copy=True))
            # Summed in float32, rounded once to the weight's dtype (an fp16 weight after
            # optimize(): adding an fp16-rounded update would round twice).
            part = weight[rows]
            part.copy_(part.float() + delta.to(device=weight.device, dtype=torch.float32))

    @torch.no_grad()
    def restore(self) -> int:
        """Put back every fused weight's original values; returns how many. Refused when some
        of those weights are no longer the models' (QKV projections fused since, by
        ``fuse_projections`` / ``pipe.optimize()``, hold copies that the originals cannot
        reach): nothing is restored then."""
        live = {id(p) for model in self.models for p in model.parameters()}
        if any(key not in live for key in self.originals):
            raise ValueError(
                "the LoRA weights were fused into layers replaced since (pipe.optimize() fuses "
                "the QKV projections into new ones): unload LoRA weights loaded before "
                "optimize() before it too, or load the pipeline again"
            )
        for weight, original in self.originals.values():
            weight.copy_(original)
        count = len(self.originals)
        self.originals.clear()
        self.models.clear()
        return count
