"""Training configuration: JSON files mapped onto dataclasses, read in this one place.

A config file holds the top-level ``TrainConfig`` fields; each stage (``classifier``, ``vae``,
``unet``) has its own section. Missing keys take the defaults below; unknown keys raise, naming the
key and the allowed ones, so a typo never silently trains the wrong model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from fastdiff.sampling.schedule import BETA_SCHEDULES, PREDICTION_TYPES
from fastdiff.training.classifier import NORM_GROUPS
from fastdiff.training.shapes import IMAGE_SIZE

STAGES = ("classifier", "vae", "unet")


@dataclass
class OptimConfig:
    """Fields every stage shares: optimisation, batching and checkpoint cadence."""

    steps: int = 1000
    batch_size: int = 64  # global batch; split evenly over the data-parallel ranks
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    cosine_decay: bool = True  # decay the learning rate to 10 % along a cosine after warm-up
    grad_clip: float = 1.0
    checkpoint_every: int = 500
    log_every: int = 1


@dataclass
class ClassifierConfig(OptimConfig):
    width: int = 32
    noise_std: float = 0.08  # augmentation so generated (slightly noisy) samples score fairly


@dataclass
class VAEConfig(OptimConfig):
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 16
    kl_weight: float = 1e-6


@dataclass
class UNetConfig(OptimConfig):
    block_out_channels: list[int] = field(default_factory=lambda: [64, 128])
    layers_per_block: int = 2
    norm_num_groups: int = 32
    attention_head_dim: int = 32
    beta_schedule: str = "squaredcos_cap_v2"
    num_train_timesteps: int = 1000
    prediction_type: str = "epsilon"
    cond_drop_prob: float = 0.1
    min_snr_gamma: float | None = 5.0
    ema_decay: float = 0.999


@dataclass
class DataConfig:
    num_images: int = 16384  # the fixed training set (the VAE and U-Net see the same images)
    held_out_images: int = 512  # rendered from a different seed, never trained on
    seed: int = 0


@dataclass
class TrainConfig:
    output_dir: str = "runs/shapes"
    seed: int = 0
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    device: str = "auto"  # auto = cuda when available, else cpu
    progress: bool = True
    export_dtype: str = (
        "float16"  # weights in the exported pipeline folder (float16 halves its size)
    )
    data: DataConfig = field(default_factory=DataConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)

    def __post_init__(self) -> None:
        # Every value is checked here, before any stage trains: not when the U-Net stage starts
        # after the classifier and VAE have trained (hours on a CPU).
        if not isinstance(self.stages, list) or not self.stages:
            raise ValueError(f"stages must be a non-empty list of {STAGES}, got {self.stages!r}")
        for stage in self.stages:
            if stage not in STAGES:
                raise ValueError(f"stages: unknown stage {stage!r}; allowed values: {STAGES}")
        check_number_types(self, "")
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise ValueError(
                f"output_dir must be a non-empty folder path (a string), got {self.output_dir!r}"
            )
        for name in ("classifier", "vae", "unet"):
            section = getattr(self, name)
            check_number_types(section, name)
            check_ranges(section, name, OPTIM_RANGES)
        check_ranges(self.classifier, "classifier", CLASSIFIER_RANGES)
        check_ranges(self.vae, "vae", VAE_RANGES)
        check_ranges(self.unet, "unet", UNET_RANGES)
        if self.classifier.width % NORM_GROUPS:
            raise ValueError(
                f"classifier.width must be a multiple of {NORM_GROUPS} (the GroupNorm groups of "
                f"the classifier), got {self.classifier.width}"
            )
        check_number_types(self.data, "data")
        # Checked here, not when the U-Net stage starts after the classifier and VAE have trained.
        if self.unet.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"unet.prediction_type: unknown value {self.unet.prediction_type!r}; "
                f"allowed values: {', '.join(PREDICTION_TYPES)}"
            )
        if self.unet.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(
                f"unet.beta_schedule: unknown value {self.unet.beta_schedule!r}; "
                f"allowed values: {', '.join(BETA_SCHEDULES)}"
            )
        if not 0.0 <= self.unet.cond_drop_prob <= 1.0:
            raise ValueError(
                f"unet.cond_drop_prob must lie in [0, 1], got {self.unet.cond_drop_prob}"
            )
        for name in ("vae", "unet"):
            section = getattr(self, name)
            channels_list = section.block_out_channels
            if not isinstance(channels_list, list) or not channels_list:
                raise ValueError(
                    f"{name}.block_out_channels must be a non-empty list of ints, got "
                    f"{channels_list!r}"
                )
            for channels in channels_list:
                if (
                    isinstance(channels, bool)
                    or not isinstance(channels, int)
                    or channels < 1
                    or channels % section.norm_num_groups
                ):
                    raise ValueError(
                        f"{name}.norm_num_groups={section.norm_num_groups} must divide every "
                        f"entry of {name}.block_out_channels {channels_list} (positive ints)"
                    )
        # Every VAE block after the first halves the image: past log2(IMAGE_SIZE) + 1 blocks
        # the latent would be smaller than one pixel (a torch error once the VAE stage starts).
        max_vae_blocks = IMAGE_SIZE.bit_length()
        if len(self.vae.block_out_channels) > max_vae_blocks:
            raise ValueError(
                f"vae.block_out_channels has {len(self.vae.block_out_channels)} entries; at most "
                f"{max_vae_blocks} (each block after the first halves the {IMAGE_SIZE}-pixel "
                "images)"
            )
        if self.export_dtype not in ("float16", "float32"):
            raise ValueError(
                f"export_dtype: unknown value {self.export_dtype!r}; "
                "allowed values: float16, float32"
            )
        for key in ("num_images", "held_out_images"):
            if getattr(self.data, key) < 1:
                raise ValueError(f"data.{key} must be >= 1, got {getattr(self.data, key)!r}")


# Allowed ranges, (low, high, low_inclusive): every stage's optimisation, then each stage's own.
OPTIM_RANGES = {
    "steps": (1, None, True),
    "batch_size": (1, None, True),
    "checkpoint_every": (1, None, True),
    "log_every": (1, None, True),
    "warmup_steps": (0, None, True),
    "learning_rate": (0, None, False),
    "weight_decay": (0, None, True),
    "grad_clip": (0, None, True),  # 0: no clipping
}
CLASSIFIER_RANGES = {"width": (1, None, True), "noise_std": (0, None, True)}
VAE_RANGES = {
    "layers_per_block": (1, None, True),
    "latent_channels": (1, None, True),
    "norm_num_groups": (1, None, True),
    "kl_weight": (0, None, True),
}
UNET_RANGES = {
    "layers_per_block": (1, None, True),
    "norm_num_groups": (1, None, True),
    "attention_head_dim": (1, None, True),
    "num_train_timesteps": (2, None, True),
    "min_snr_gamma": (0, None, False),
    "ema_decay": (0, 1, True),
}


def check_ranges(section: Any, where: str, ranges: dict[str, tuple]) -> None:
    """Each listed field within its range (``high`` exclusive); None passes (optional fields)."""
    for key, (low, high, low_inclusive) in ranges.items():
        value = getattr(section, key)
        if value is None:
            continue
        below = value < low if low_inclusive else value <= low
        if below or (high is not None and value >= high):
            bounds = ("[" if low_inclusive else "(") + f"{low}, " + (f"{high})" if high else "inf)")
            raise ValueError(f"{where}.{key} must lie in {bounds}, got {value!r}")


def check_number_types(section: Any, where: str) -> None:
    """Each int/float field of a config section holds a number of that kind (JSON "1e-3" or
    true would otherwise fail, or train wrongly, deep inside a stage)."""
    for item in dataclasses.fields(section):
        value = getattr(section, item.name)
        if item.type in ("bool", bool):  # a string "false" would be true
            ok = isinstance(value, bool)
        elif item.type in ("int", int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif item.type in ("float", float, "float | None"):
            ok = (value is None and "None" in str(item.type)) or (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and math.isfinite(value)
            )
        else:
            continue
        if not ok:
            name = f"{where}.{item.name}" if where else item.name
            raise ValueError(f"{name} must be {item.type}, got {value!r}")


def _build(cls: type, values: dict[str, Any], where: str):
    section = where.rstrip(".") or "config"  # ``where`` is the prefix of its keys ("vae.")
    if not isinstance(values, dict):
        raise ValueError(f"{section}: expected a JSON object, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{section}: unknown key(s) {unknown}; allowed keys: {sorted(fields)}")
    kwargs = {}
    for name, value in values.items():
        default = fields[name].default_factory() if callable(fields[name].default_factory) else None
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value, f"{where}{name}.")
        else:
            kwargs[name] = value
    return cls(**kwargs)


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Build a ``TrainConfig`` from a (JSON) dict, rejecting unknown keys."""
    return _build(TrainConfig, values, "")


def load_config(path: str | os.PathLike) -> TrainConfig:
    """Read a JSON training config file."""
    with open(path, encoding="utf-8") as handle:
        try:
            values = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from None
    return config_from_dict(values)


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)
