"""The latent-diffusion noise predictor: a ``UNet2DConditionModel``-compatible U-Net.

Architecture of Rombach et al. 2022 (LDM, sec. 3.3) on the DDPM U-Net (Ho et al. 2020): a
timestep embedding (+ optional class embedding, + SDXL's text/size "text_time" embedding, Podell
et al. 2023, sec. 2.2) conditions every ResNet block; transformer blocks cross-attend to
``encoder_hidden_states``. Built from the diffusers config dict; parameter names equal diffusers'
so its safetensors load unchanged.

The forward pass never reads tensor values on the host (no ``.item()``, no value-dependent
branches or shapes) so it can be captured in a CUDA graph.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.models.attention import ContextProjections
from fastdiff.models.config import UNetConfig
from fastdiff.models.context_groups import GroupedEmbedding, groups_of, repeat_batch
from fastdiff.models.embeddings import TimestepEmbedding, timestep_embedding
from fastdiff.models.module import ModelBase
from fastdiff.models.packing import (
    context_attentions,
    context_projections,
    pack_context_projections,
    pack_rows,
    packed_rows,
)
from fastdiff.models.resnet import GroupNorm, ResnetBlock2D, TimeShifts
from fastdiff.models.unet_blocks import (
    BlockSpec,
    CrossAttentionSpec,
    DownBlock,
    MidBlock,
    MidBlockCrossAttention,
    SelfAttentionSpec,
    UpBlock,
)
from fastdiff.ops.backend import needs_autograd


def cross_attention_spec(config: UNetConfig, heads: Any, depth: int, context_dim: Any):
    if heads is None or context_dim is None:
        raise ValueError(
            "cross-attention blocks need attention_head_dim and cross_attention_dim values, got "
            f"attention_head_dim={heads!r} cross_attention_dim={context_dim!r}"
        )
    return CrossAttentionSpec(heads, depth, context_dim, config.use_linear_projection)


class UNet2DConditionModel(ModelBase):
    """``unet(sample, timestep, encoder_hidden_states, added_cond_kwargs, class_labels)``."""

    # forward() takes k contexts per sample (fastdiff.models.context_groups): what the
    # optimized runtime checks before passing a guided step's sample once
    takes_context_groups = True
    packed_time_blocks: tuple = ()  # set by pack_time_projections: see time_shifts
    packed_context_modules: tuple = ()  # set by fold_conv_biases: see context_projections

    def __init__(self, config: UNetConfig | dict[str, Any]) -> None:
        super().__init__()
        config = UNetConfig.from_dict(config) if isinstance(config, dict) else config
        self.config = config
        channels = list(config.block_out_channels)
        blocks = len(channels)
        time_dim = config.time_embed_dim
        spec = BlockSpec(
            time_dim,
            config.norm_num_groups,
            config.norm_eps,
            config.dropout,
            # diffusers hands resnet_out_scale_factor only to block types fastdiff does not
            # build; its down/up blocks here always divide by 1.
            1.0,
        )
        heads = config.blocks_heads()
        depths = config.blocks_transformer_layers()
        context_dims = config.blocks_cross_attention_dim()
        layers = config.blocks_layers_per_block()

        self.conv_in = nn.Conv2d(
            config.in_channels,
            channels[0],
            config.conv_in_kernel,
            padding=config.conv_in_kernel // 2,
        )
        self.time_embedding = TimestepEmbedding(channels[0], time_dim, config.time_cond_proj_dim)
        self.class_embedding = (
            nn.Embedding(config.num_class_embeds, time_dim)
            if config.num_class_embeds is not None
            else None
        )
        self.add_embedding = (
            TimestepEmbedding(config.projection_class_embeddings_input_dim, time_dim)
            if config.addition_embed_type == "text_time"
            else None
        )

        self.down_blocks = nn.ModuleList()
        out_channels = channels[0]
        for i, block_type in enumerate(config.down_block_types):
            in_channels, out_channels = out_channels, channels[i]
            attention = None
            if block_type == "CrossAttnDownBlock2D":
                attention = cross_attention_spec(config, heads[i], depths[i], context_dims[i])
            elif block_type == "AttnDownBlock2D":
                attention = SelfAttentionSpec(heads[i] or out_channels)
            self.down_blocks.append(
                DownBlock(
                    in_channels,
                    out_channels,
                    layers[i],
                    spec,
                    i < blocks - 1,
                    config.downsample_padding,
                    attention,
                )
            )

        mid_spec = BlockSpec(
            time_dim,
            config.norm_num_groups,
            config.norm_eps,
            config.dropout,
            config.mid_block_scale_factor,
        )
        if config.mid_block_type == "UNetMidBlock2DCrossAttn":
            self.mid_block = MidBlockCrossAttention(
                channels[-1],
                mid_spec,
                cross_attention_spec(config, heads[-1], depths[-1], context_dims[-1]),
            )
        elif config.mid_block_type == "UNetMidBlock2D":
            self.mid_block = MidBlock(channels[-1], mid_spec, num_layers=0, add_attention=False)
        else:
            self.mid_block = None

        self.up_blocks = nn.ModuleList()
        reversed_channels = channels[::-1]
        out_channels = reversed_channels[0]
        for i, block_type in enumerate(config.up_block_types):
            prev_output, out_channels = out_channels, reversed_channels[i]
            in_channels = reversed_channels[min(i + 1, blocks - 1)]
            attention = None
            if block_type == "CrossAttnUpBlock2D":
                j = blocks - 1 - i  # the matching down stage
                attention = cross_attention_spec(config, heads[j], depths[j], context_dims[j])
            elif block_type == "AttnUpBlock2D":
                # diffusers indexes attention_head_dim by the up block's own (unreversed) index.
                attention = SelfAttentionSpec(heads[i] or out_channels)
            self.up_blocks.append(
                UpBlock(
                    in_channels,
                    prev_output,
                    out_channels,
                    layers[blocks - 1 - i] + 1,
                    spec,
                    i < blocks - 1,
                    attention,
                )
            )

        self.conv_norm_out = GroupNorm(config.norm_num_groups, channels[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(
            channels[0],
            config.out_channels,
            config.conv_out_kernel,
            padding=config.conv_out_kernel // 2,
        )
        # The width every cross-attention block's context has (the config checks they agree).
        self.context_width = next((w for w in config.context_widths() if w is not None), None)
        self.needs_context = any(
            block.has_cross_attention
            for block in [*self.down_blocks, *self.up_blocks, self.mid_block]
            if block is not None
        )

    def time_blocks(self) -> list[ResnetBlock2D]:
        """The ResNet blocks that take the timestep embedding, in module order."""
        return [
            module
            for module in self.modules()
            if isinstance(module, ResnetBlock2D) and module.time_emb_proj is not None
        ]

    def fold_conv_biases(self, enabled: bool = True) -> int:
        """``ModelBase.fold_conv_biases``; switching it on also packs the ResNet blocks' time
        projections (see ``pack_time_projections``) so ``time_shifts`` computes them together,
        and the fused cross-attentions' key and value projections of the text context, so that
        ``context_projections`` computes those in one GEMM (``fastdiff.models.packing``)."""
        count = super().fold_conv_biases(enabled)
        self.packed_context_modules = ()
        if enabled:
            self.pack_time_projections()
            modules = context_attentions(self)
            if pack_context_projections(modules):
                self.packed_context_modules = tuple(modules)
        return count

    def context_projections(
        self, context: torch.Tensor | ContextProjections | None
    ) -> torch.Tensor | ContextProjections | None:
        """Under ``fold_biases``, every packed cross-attention's keys and values of ``context`` in
        one GEMM (``fastdiff.models.packing.context_projections``); else ``context``. A context
        projected already (this method's result, computed once for many steps) is returned as
        it is."""
        if context is None or not self.packed_context_modules:
            return context
        if isinstance(context, ContextProjections):
            return context
        return context_projections(list(self.packed_context_modules), context)

    def pack_time_projections(self) -> bool:
        """Move the ResNet blocks' ``time_emb_proj`` weights, their biases and the ``conv1``
        biases into one tensor per kind, each block's parameters becoming views of it (names,
        values and the state dict unchanged; in-place updates such as ``load_state_dict`` land
        in the packed tensors). Returns whether they are packed (blocks without a bias, or with
        parameters of differing dtypes or devices, are left as they are)."""
        blocks = self.time_blocks()
        # (getattr: a wrapped layer has no parameters of its own, and is not packed)
        kinds = [
            [getattr(block.time_emb_proj, "weight", None) for block in blocks],
            [getattr(block.time_emb_proj, "bias", None) for block in blocks],
            [getattr(block.conv1, "bias", None) for block in blocks],
        ]
        if not blocks or any(param is None for params in kinds for param in params):
            return False
        if not pack_rows(kinds):
            return False
        self.packed_time_blocks = blocks  # (a plain list: not registered as submodules again)
        return True

    def time_shifts(self, emb: torch.Tensor) -> torch.Tensor | TimeShifts:
        """Under ``fold_biases``, every ResNet block's ``time_emb_proj(silu(emb)) + conv1.bias``
        as one GEMM (and one addition) over the packed projections, instead of a SiLU, a GEMM and
        an addition per block: ``TimeShifts`` for the blocks to pass down. ``emb`` itself where
        that does not apply (folding off, a block's layers patched or hooked, the parameters no
        longer packed after a ``.to()``, gradients wanted): each block then computes its own."""
        blocks = self.packed_time_blocks
        # batchable() is False at the first block when folding is off: one attribute read.
        if not blocks or not all(block.batchable() for block in blocks):
            return emb
        weight = packed_rows([block.time_emb_proj.weight for block in blocks])
        bias = packed_rows([block.time_emb_proj.bias for block in blocks])
        conv_bias = packed_rows([block.conv1.bias for block in blocks])
        if weight is None or bias is None or conv_bias is None:
            return emb
        # The packed views are detached: gradients (to emb or to any block's projection or conv1
        # bias) need the blocks' own layers.
        if needs_autograd(emb) or any(
            needs_autograd(block.time_emb_proj.weight, block.time_emb_proj.bias, block.conv1.bias)
            for block in blocks
        ):
            return emb
        if any(tensor.dtype != emb.dtype for tensor in (weight, bias, conv_bias)):
            return emb
        shifts = F.linear(F.silu(emb), weight, bias)
        shifts = shifts + conv_bias
        spans, start = {}, 0
        for block in blocks:
            width = block.time_emb_proj.out_features
            spans[id(block)] = (start, width)
            start += width
        return TimeShifts(emb, shifts, spans)

    @staticmethod
    def per_row_inputs(
        sample: torch.Tensor,
        timestep: Any,
        added_cond_kwargs: dict[str, torch.Tensor] | None,
        class_labels: torch.Tensor | None,
        timestep_cond: torch.Tensor | None,
    ) -> tuple:
        """The inputs with the sample repeated up front where a time-embedding input has one
        row per context rather than per sample (classifier-free guidance's [uncond; cond]
        class labels, SDXL's pooled text): batch k·B against the sample's B. The inputs given
        per sample are repeated with it; those given once for all are kept. Unchanged where
        every one is per sample or one for all: the samples then share their timestep
        embedding across their contexts (``fastdiff.models.context_groups``)."""
        batch = sample.shape[0]
        if class_labels is not None and not torch.is_tensor(class_labels):  # a list: per row?
            class_labels = torch.as_tensor(class_labels, device=sample.device)
        inputs = {"timestep": timestep, "class_labels": class_labels}
        inputs |= {"timestep_cond": timestep_cond, **(added_cond_kwargs or {})}
        per_row = [
            (name, value.shape[0])
            for name, value in inputs.items()
            if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] not in (1, batch)
        ]
        if not per_row:
            return sample, timestep, added_cond_kwargs, class_labels, timestep_cond
        name, rows = per_row[0]
        if rows % batch:
            raise ValueError(
                f"{name} has batch {rows}: it must be 1, the sample's batch {batch} or a "
                f"multiple of it"
            )
        groups = rows // batch

        def repeat(value):
            per_sample = torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == batch
            return repeat_batch(value, groups) if per_sample else value

        added = {key: repeat(value) for key, value in (added_cond_kwargs or {}).items()}
        return (
            repeat_batch(sample, groups),
            repeat(timestep),
            added if added_cond_kwargs is not None else None,
            repeat(class_labels),
            repeat(timestep_cond),
        )

    def timesteps_for(self, sample: torch.Tensor, timestep: Any) -> torch.Tensor:
        """Timesteps as a float/long tensor of shape (B,) on the sample's device."""
        batch = sample.shape[0]
        if not torch.is_tensor(timestep):
            dtype = torch.float32 if isinstance(timestep, float) else torch.long
            return torch.full((batch,), timestep, dtype=dtype, device=sample.device)
        if timestep.dim() == 0:
            timestep = timestep[None]
        if timestep.dim() != 1 or timestep.shape[0] not in (1, batch):
            raise ValueError(
                f"timestep must be a number, a 0-d tensor or a tensor of shape (1,) or ({batch},), "
                f"got shape {tuple(timestep.shape)}"
            )
        return timestep.to(sample.device).expand(batch)

    def embed(
        self,
        sample: torch.Tensor,
        timestep: Any,
        added_cond_kwargs: dict[str, torch.Tensor] | None,
        class_labels: torch.Tensor | None,
        timestep_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        config = self.config
        features = timestep_embedding(
            self.timesteps_for(sample, timestep),
            config.block_out_channels[0],
            config.flip_sin_to_cos,
            config.freq_shift,
        )
        emb = self.time_embedding(features.to(sample.dtype), timestep_cond)
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError(
                    "this U-Net is class-conditional (num_class_embeds="
                    f"{config.num_class_embeds}): pass class_labels"
                )
            if not torch.is_tensor(class_labels):
                class_labels = torch.as_tensor(class_labels, device=sample.device)
            emb = emb + self.class_embedding(class_labels).to(sample.dtype)
        if self.add_embedding is not None:
            missing = [
                key for key in ("text_embeds", "time_ids") if key not in (added_cond_kwargs or {})
            ]
            if missing:
                raise ValueError(
                    "addition_embed_type='text_time' needs added_cond_kwargs with keys "
                    f"'text_embeds' and 'time_ids'; missing {missing}"
                )
            text_embeds = added_cond_kwargs["text_embeds"]
            time_ids = added_cond_kwargs["time_ids"]
            rows = text_embeds.shape[0] if text_embeds.dim() == 2 else 0
            ids = time_ids.numel() // rows if rows and time_ids.numel() % rows == 0 else -1
            width = config.projection_class_embeddings_input_dim
            if ids < 0 or text_embeds.shape[-1] + ids * config.addition_time_embed_dim != width:
                raise ValueError(
                    f"text_embeds {tuple(text_embeds.shape)} and time_ids "
                    f"{tuple(time_ids.shape)} must give (B, features) and B rows of ids whose "
                    f"features + ids x addition_time_embed_dim ({config.addition_time_embed_dim})"
                    f" make projection_class_embeddings_input_dim ({width})"
                )
            time_features = timestep_embedding(
                time_ids.flatten(),
                config.addition_time_embed_dim,
                config.flip_sin_to_cos,
                config.freq_shift,
            ).reshape(text_embeds.shape[0], -1)
            extra = torch.cat([text_embeds, time_features], dim=-1).to(emb.dtype)
            emb = emb + self.add_embedding(extra)
        return emb

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        """FreeU (Si et al. 2024, "FreeU: Free Lunch in Diffusion U-Net"), as diffusers'
        ``enable_freeu``: in the first two up stages the backbone features' first half of
        channels is scaled by ``b1`` / ``b2`` and the skip features' lowest frequencies by
        ``s1`` / ``s2`` (UpBlock2D and CrossAttnUpBlock2D stages; a zero factor turns it off, as
        in diffusers). No weights change; a captured graph is keyed by it (``graph_state``)."""
        values = {"s1": s1, "s2": s2, "b1": b1, "b2": b2}
        for name, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"FreeU {name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"FreeU {name} must be a finite number, got {value!r}")
        stages = [(float(b1), float(s1)), (float(b2), float(s2))]
        # diffusers applies it only when every factor is non-zero, and never in AttnUpBlock2D
        enabled = all(values.values())
        for index, block in enumerate(self.up_blocks):
            applies = enabled and index < len(stages) and not block.self_attention
            block.freeu = stages[index] if applies else None

    def disable_freeu(self) -> None:
        for block in self.up_blocks:
            block.freeu = None

    def graph_state(self) -> tuple:
        """What a captured U-Net graph bakes in besides its inputs and weights: FreeU's factors."""
        return tuple(block.freeu for block in self.up_blocks)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, variant=None):
        """Same as ``fastdiff.models.load_unet``."""
        from fastdiff.models.loading import load_unet

        return load_unet(path, dtype=dtype, device=device, variant=variant)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor | ContextProjections | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the model output (noise, v or x0, per the training target) for ``sample``.
        ``encoder_hidden_states`` may be a context projected ahead (``context_projections``),
        and may hold k contexts per sample (batch k·B, one group of B after another, as
        classifier-free guidance's [uncond; cond]): the output then has batch k·B, group g the
        U-Net on ``sample`` with context group g. Where the timestep and the other
        time-embedding inputs are given per sample (batch B, or one for all), the blocks before
        the first cross-attention run once per sample, not k times
        (``fastdiff.models.context_groups``); inputs given per row (batch k·B) repeat the
        sample up front. ``timestep_cond``: the guidance-scale embedding of a U-Net with
        ``time_cond_proj_dim`` (``guidance_scale_embedding``)."""
        if sample.dim() != 4 or sample.shape[1] != self.config.in_channels:
            raise ValueError(
                f"sample must be (B, {self.config.in_channels}, H, W), got {tuple(sample.shape)}"
            )
        if self.needs_context and encoder_hidden_states is None:
            raise ValueError("this U-Net has cross-attention blocks: pass encoder_hidden_states")
        context = encoder_hidden_states
        if self.needs_context and isinstance(context, torch.Tensor) and self.context_width:
            if context.dim() != 3 or context.shape[-1] != self.context_width:
                raise ValueError(
                    f"encoder_hidden_states must be (B, tokens, {self.context_width}) (the "
                    f"config's cross_attention_dim), got {tuple(context.shape)}"
                )
        sample, timestep, added_cond_kwargs, class_labels, timestep_cond = self.per_row_inputs(
            sample, timestep, added_cond_kwargs, class_labels, timestep_cond
        )
        groups = groups_of(sample.shape[0], encoder_hidden_states)
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = self.embed(sample, timestep, added_cond_kwargs, class_labels, timestep_cond)
        emb = self.time_shifts(emb)
        if groups > 1:
            emb = GroupedEmbedding(emb, sample.shape[0], groups)
        context = self.context_projections(encoder_hidden_states)

        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, emb, context)
            skips.extend(block_skips)
        if self.mid_block is not None:
            x = self.mid_block(x, emb, context)
        if groups > 1:  # what still has one row per sample, repeated for the up blocks
            rows = groups * sample.shape[0]
            skips = [
                skip if skip.shape[0] == rows else repeat_batch(skip, groups) for skip in skips
            ]
            x = x if x.shape[0] == rows else repeat_batch(x, groups)
        for block in self.up_blocks:
            count = len(block.resnets)
            block_skips, skips = skips[-count:], skips[:-count]
            upsample_size = tuple(skips[-1].shape[2:]) if skips else None
            x = block(x, block_skips, emb, context, upsample_size)
        x = self.conv_norm_out(x, silu=True)
        return self.conv_out(x)
