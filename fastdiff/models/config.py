"""Model configuration: the diffusers ``config.json`` keys, read and validated in one place.

``UNetConfig`` mirrors ``UNet2DConditionModel``'s keys and ``VAEConfig`` mirrors
``AutoencoderKL``'s, with the same defaults, so a diffusers ``config.json`` reads unchanged and
``to_dict()`` writes one diffusers reads back. A key whose value selects a feature fastdiff does
not implement raises a ``ValueError`` naming the key and the supported values; unknown keys are
kept and ignored, as diffusers does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from fastdiff.models.config_checks import (
    per_block,
    require_bool,
    require_choice,
    require_finite_number,
    require_fraction,
    require_group_channels,
    require_list,
    require_positive_int,
    require_positive_number,
)

# Keys diffusers writes for bookkeeping; never model structure.
META_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")


class ConfigBase:
    """Shared reading/writing for the config dataclasses (attribute and ``[key]`` access)."""

    class_name = ""

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ConfigBase:
        if not isinstance(raw, dict):
            raise ValueError(f"{cls.__name__}: config must be a dict, got {type(raw).__name__}")
        names = {field.name for field in dataclasses.fields(cls)} - {"extra"}
        known = {key: value for key, value in raw.items() if key in names}
        extra = {
            key: value for key, value in raw.items() if key not in names and key not in META_KEYS
        }
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The diffusers ``config.json`` content (with ``_class_name``) for this configuration."""
        out: dict[str, Any] = {"_class_name": self.class_name}
        for field in dataclasses.fields(self):
            if field.name == "extra":
                continue
            value = getattr(self, field.name)
            out[field.name] = list(value) if isinstance(value, tuple) else value
        out.update(self.extra)
        return out

    def __getitem__(self, key: str) -> Any:
        """Dict-style access to any key, the unknown ones kept in ``extra`` included."""
        if key != "extra" and key in {field.name for field in dataclasses.fields(self)}:
            return getattr(self, key)
        if key in self.extra:
            return self.extra[key]
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        try:
            self[key]  # type: ignore[index]
        except KeyError:
            return False
        return True

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default


@dataclasses.dataclass
class UNetConfig(ConfigBase):
    """``UNet2DConditionModel`` configuration (same keys and defaults as diffusers)."""

    class_name = "UNet2DConditionModel"

    sample_size: Any = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: Sequence[str] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: Sequence[str] = (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    )
    only_cross_attention: Any = False
    block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
    layers_per_block: Any = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0
    act_fn: str = "silu"
    norm_num_groups: int | None = 32
    norm_eps: float = 1e-5
    cross_attention_dim: Any = 1280
    transformer_layers_per_block: Any = 1
    reverse_transformer_layers_per_block: Any = None
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    attention_head_dim: Any = 8
    num_attention_heads: Any = None
    dual_cross_attention: bool = False
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    time_cond_proj_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    projection_class_embeddings_input_dim: int | None = None
    attention_type: str = "default"
    class_embeddings_concat: bool = False
    mid_block_only_cross_attention: bool | None = None
    cross_attention_norm: str | None = None
    addition_embed_type_num_heads: int = 64
    extra: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in ("down_block_types", "up_block_types", "block_out_channels"):
            require_list(key, getattr(self, key))
        blocks = len(self.down_block_types)
        for block in self.down_block_types:
            require_choice(
                "down_block_types",
                block,
                ("CrossAttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
            )
        for block in self.up_block_types:
            require_choice(
                "up_block_types", block, ("CrossAttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D")
            )
        require_choice(
            "mid_block_type",
            self.mid_block_type,
            ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None),
        )
        if len(self.up_block_types) != blocks or len(self.block_out_channels) != blocks:
            raise ValueError(
                "config down_block_types, up_block_types and block_out_channels must have the same "
                f"length, got {len(self.down_block_types)}, {len(self.up_block_types)} and "
                f"{len(self.block_out_channels)}"
            )
        for flag in per_block("only_cross_attention", self.only_cross_attention, blocks):
            require_choice("only_cross_attention", flag, (False,))
        require_choice(
            "mid_block_only_cross_attention", self.mid_block_only_cross_attention, (None, False)
        )
        require_choice("act_fn", self.act_fn, ("silu", "swish"))
        # (a JSON true is an int to Python: it reached the GroupNorm op, which refused it there)
        norm_groups = self.norm_num_groups
        if isinstance(norm_groups, bool) or not isinstance(norm_groups, int) or norm_groups < 1:
            raise ValueError(
                f"unsupported config value norm_num_groups={self.norm_num_groups!r}; "
                "supported values: a positive int"
            )
        for key in ("in_channels", "out_channels"):
            require_positive_int(key, getattr(self, key))
        require_positive_number("norm_eps", self.norm_eps)
        for key in (
            "center_input_sample",
            "flip_sin_to_cos",
            "upcast_attention",
            "use_linear_projection",
        ):
            require_bool(key, getattr(self, key))
        require_finite_number("freq_shift", self.freq_shift)  # NaN: every output NaN
        # 0 or NaN made the mid block's output NaN; a string or null failed in the first forward.
        require_positive_number("mid_block_scale_factor", self.mid_block_scale_factor)
        require_fraction("dropout", self.dropout)
        # diffusers' Downsample2D pads 1 all round, or 0 with a right/bottom pad; any other
        # padding changes the down path's sizes so that no 2x upsampling meets its skip.
        padding = self.downsample_padding
        if isinstance(padding, bool) or not isinstance(padding, int) or padding not in (0, 1):
            raise ValueError(
                f"unsupported config value downsample_padding={self.downsample_padding!r}; "
                "supported values: 0, 1"
            )
        time_widths = [("block_out_channels[0]", self.block_out_channels[0])]
        if self.addition_embed_type == "text_time":
            time_widths.append(("addition_time_embed_dim", self.addition_time_embed_dim))
        for key, width in time_widths:  # the sinusoids' frequency exponent divides by this
            if isinstance(width, int) and width // 2 and width // 2 == self.freq_shift:
                raise ValueError(
                    f"config freq_shift={self.freq_shift!r} equals half of {key}={width}: the "
                    "timestep embedding's frequencies would divide by zero"
                )
        require_positive_int("num_class_embeds", self.num_class_embeds, allow_none=True)
        require_positive_int("time_embedding_dim", self.time_embedding_dim, allow_none=True)
        # Guidance-embedded U-Nets (latent consistency models): w enters the time embedding.
        require_positive_int("time_cond_proj_dim", self.time_cond_proj_dim, allow_none=True)
        require_group_channels(self.block_out_channels, self.norm_num_groups)
        if self.reverse_transformer_layers_per_block is not None:
            raise ValueError(
                "unsupported config value reverse_transformer_layers_per_block="
                f"{self.reverse_transformer_layers_per_block!r}; supported values: None"
            )
        for depth in per_block(
            "transformer_layers_per_block", self.transformer_layers_per_block, blocks
        ):
            if not isinstance(depth, int) or depth < 1:
                raise ValueError(
                    f"unsupported config value transformer_layers_per_block entry {depth!r}; "
                    "supported values: a positive int per block"
                )
        require_choice("encoder_hid_dim", self.encoder_hid_dim, (None,))
        require_choice("encoder_hid_dim_type", self.encoder_hid_dim_type, (None,))
        if self.num_attention_heads is not None:
            # diffusers itself refuses this key (its attention_head_dim means the head count).
            raise ValueError(
                f"unsupported config value num_attention_heads={self.num_attention_heads!r}; "
                "supported values: None (attention_head_dim gives the number of heads, as in "
                "diffusers)"
            )
        # null reads as false for these flags, as diffusers reads it (see require_bool)
        require_choice("dual_cross_attention", self.dual_cross_attention, (False, None))
        require_choice("class_embed_type", self.class_embed_type, (None,))
        require_choice("addition_embed_type", self.addition_embed_type, (None, "text_time"))
        if self.addition_embed_type == "text_time":
            for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
                if getattr(self, key) is None:
                    raise ValueError(
                        "config addition_embed_type='text_time' needs addition_time_embed_dim "
                        "and projection_class_embeddings_input_dim to be ints"
                    )
                require_positive_int(key, getattr(self, key))
        require_choice("resnet_time_scale_shift", self.resnet_time_scale_shift, ("default",))
        require_choice("resnet_skip_time_act", self.resnet_skip_time_act, (False, None))
        require_choice("time_embedding_type", self.time_embedding_type, ("positional",))
        require_choice("time_embedding_act_fn", self.time_embedding_act_fn, (None,))
        require_choice("timestep_post_act", self.timestep_post_act, (None,))
        require_choice("attention_type", self.attention_type, ("default",))
        require_choice("class_embeddings_concat", self.class_embeddings_concat, (False, None))
        require_choice("cross_attention_norm", self.cross_attention_norm, (None,))
        for key in ("conv_in_kernel", "conv_out_kernel"):
            value = getattr(self, key)
            # (-1 % 2 == 1 in Python: a negative kernel reached torch's "negative dimension")
            if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % 2 != 1:
                raise ValueError(
                    f"unsupported config value {key}={value!r}; supported values: a positive odd "
                    "int"
                )
        # Validate the per-block values now so errors name the key, not a block or a matmul.
        for layers in self.blocks_layers_per_block():
            require_positive_int("layers_per_block", layers)
        for heads in self.blocks_heads():
            require_positive_int("attention_head_dim", heads)
        for width in self.blocks_cross_attention_dim():
            require_positive_int("cross_attention_dim", width, allow_none=True)
        # Every cross-attention block attends to the one encoder_hidden_states: blocks of
        # different context widths cannot all run (a matmul error in the first forward).
        widths = sorted(set(self.context_widths()) - {None})
        if len(widths) > 1:
            raise ValueError(
                f"unsupported config value cross_attention_dim={self.cross_attention_dim!r}: its "
                f"cross-attention blocks would take contexts of different widths {widths}; "
                "supported values: one width for every cross-attention block"
            )

    def blocks_layers_per_block(self) -> list[int]:
        return per_block("layers_per_block", self.layers_per_block, len(self.down_block_types))

    def blocks_transformer_layers(self) -> list[int]:
        return per_block(
            "transformer_layers_per_block",
            self.transformer_layers_per_block,
            len(self.down_block_types),
        )

    def blocks_heads(self) -> list[int]:
        """``attention_head_dim`` per block, read as diffusers reads it: the number of heads in
        cross-attention blocks, the width of one head in ``AttnDownBlock2D``/``AttnUpBlock2D``."""
        return per_block("attention_head_dim", self.attention_head_dim, len(self.down_block_types))

    def blocks_cross_attention_dim(self) -> list[int | None]:
        return per_block(
            "cross_attention_dim", self.cross_attention_dim, len(self.down_block_types)
        )

    def context_widths(self) -> list[int | None]:
        """``cross_attention_dim`` of each cross-attention block (down, mid, up), indexed as
        diffusers indexes it: by the matching down stage for the up blocks, the last for the mid
        block."""
        dims = self.blocks_cross_attention_dim()
        blocks = len(dims)
        widths = [
            dims[i] for i, kind in enumerate(self.down_block_types) if kind.startswith("Cross")
        ]
        if self.mid_block_type == "UNetMidBlock2DCrossAttn":
            widths.append(dims[-1])
        widths += [
            dims[blocks - 1 - i]
            for i, kind in enumerate(self.up_block_types)
            if kind.startswith("Cross")
        ]
        return widths

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or self.block_out_channels[0] * 4


@dataclasses.dataclass
class VAEConfig(ConfigBase):
    """``AutoencoderKL`` configuration (same keys and defaults as diffusers)."""

    class_name = "AutoencoderKL"

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: Sequence[str] = ("DownEncoderBlock2D",)
    up_block_types: Sequence[str] = ("UpDecoderBlock2D",)
    block_out_channels: Sequence[int] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: Any = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: Any = None
    latents_std: Any = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    extra: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in ("down_block_types", "up_block_types", "block_out_channels"):
            require_list(key, getattr(self, key))
        for key in ("in_channels", "out_channels", "latent_channels", "norm_num_groups"):
            require_positive_int(key, getattr(self, key))
        for key in (
            "force_upcast",
            "use_quant_conv",
            "use_post_quant_conv",
            "mid_block_add_attention",
        ):
            require_bool(key, getattr(self, key))
        require_group_channels(self.block_out_channels, self.norm_num_groups)
        for block in self.down_block_types:
            require_choice("down_block_types", block, ("DownEncoderBlock2D",))
        for block in self.up_block_types:
            require_choice("up_block_types", block, ("UpDecoderBlock2D",))
        if len(self.down_block_types) != len(self.block_out_channels) or len(
            self.up_block_types
        ) != len(self.block_out_channels):
            raise ValueError(
                "config down_block_types, up_block_types and block_out_channels must have the same "
                f"length, got {len(self.down_block_types)}, {len(self.up_block_types)} and "
                f"{len(self.block_out_channels)}"
            )
        require_choice("act_fn", self.act_fn, ("silu", "swish"))
        # 0, NaN or a string here would turn every decoded image into NaN or a TypeError.
        for key in ("scaling_factor", "shift_factor"):
            value = getattr(self, key)
            if value is None and key == "shift_factor":
                continue
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or (key == "scaling_factor" and value <= 0)
            ):
                wanted = "a positive number" if key == "scaling_factor" else "a number or null"
                raise ValueError(
                    f"unsupported config value {key}={value!r}; supported values: {wanted}"
                )
        require_positive_int("layers_per_block", self.layers_per_block)

    @property
    def downscale_factor(self) -> int:
        """Pixels per latent pixel along each side."""
        return 2 ** (len(self.block_out_channels) - 1)
