"""Reading a diffusers-format pipeline folder: ``model_index.json`` says which components exist,
each lives in its own subfolder (``unet/``, ``vae/``, ``scheduler/``, ``text_encoder/`` ...).

fastdiff extensions to ``model_index.json`` (diffusers ignores unknown keys):
- ``null_class_label`` (int): the class label a class-conditional U-Net was trained with as the
  "no condition" input for classifier-free guidance. Default: the last class index,
  ``num_class_embeds - 1`` (a model with K real classes has ``num_class_embeds = K + 1``).
- ``class_names`` (list of str, optional): display names of the real classes 0..K-1.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastdiff.pipeline.call_arguments import CallDefaults
from fastdiff.pipeline.text_encoding import (
    SUPPORTED_TEXT_ENCODERS,
    SUPPORTED_TOKENIZERS,
    PromptEncoder,
    load_text_component,
)
from fastdiff.pipeline.vae_scaling import ALL_LATENT_KEYS, latent_keys_for
from fastdiff.sampling.config import CLASS_DEFAULTS as SCHEDULER_CLASSES

# (text encoder, tokenizer) subfolder pairs in the order their embeddings are concatenated.
TEXT_COMPONENTS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"
# diffusers' SD 1.x/2.x pipelines treat a scheduler config with steps_offset != 1 or
# clip_sample = true as outdated and sample with steps_offset=1, clip_sample=False instead
# (StableDiffusionPipeline.__init__); the SDXL pipelines take the config as written.
OUTDATED_SCHEDULER_FIXES = {"steps_offset": 1, "clip_sample": False}
SD_PIPELINES = (
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
)


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"missing file: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def listed_class(index: dict[str, Any], name: str) -> str | None:
    """The class name model_index.json gives for component ``name``, or None when absent/null."""
    entry = index.get(name)
    if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None:
        return str(entry[1])
    return None


def is_inpainting_unet(unet_config: Any, vae_config: Any) -> bool:
    """An inpainting U-Net takes the latents, the mask and the masked image's latents stacked:
    2 * latent_channels + 1 input channels (9 in SD)."""
    return unet_config["in_channels"] == 2 * vae_config["latent_channels"] + 1


def check_latent_channels(unet_config: Any, vae_config: Any) -> None:
    """The U-Net must predict the VAE's latents and take them (or, an inpainting U-Net, them
    with a mask and the masked image's latents): refused here rather than failing mid-sampling."""
    latent = vae_config["latent_channels"]
    taken, predicted = unet_config["in_channels"], unet_config["out_channels"]
    if predicted != latent or (taken != latent and not is_inpainting_unet(unet_config, vae_config)):
        raise ValueError(
            f"the U-Net takes {taken} and predicts {predicted} channels but the VAE's "
            f"latent_channels is {latent}: it must predict {latent} and take {latent} (or "
            f"{2 * latent + 1}, an inpainting U-Net's latents, mask and masked-image latents)"
        )


def check_aesthetics_score(unet_config: Any, requires_aesthetics_score: bool) -> None:
    """Only an SDXL refiner's U-Net ('text_time' added embeddings) takes an aesthetic score."""
    if requires_aesthetics_score and unet_config.get("addition_embed_type") != "text_time":
        raise ValueError(
            "requires_aesthetics_score: the U-Net has no addition_embed_type 'text_time' to "
            "take an aesthetic score (only SDXL refiners do)"
        )


def replacement_vae(vae: Any, device=None, dtype=None) -> Any:
    """The autoencoder a caller passes in place of the folder's: a component folder (read by
    ``load_vae``: AutoencoderKL or AutoencoderTiny) or a fastdiff model, returned as it is (its
    latent channels are checked against the U-Net's by ``load_components`` and ``Pipeline``, as
    the folder's own VAE's are, before ``load_components`` moves and casts it)."""
    from fastdiff.models import AutoencoderKL, AutoencoderTiny, load_vae

    if isinstance(vae, (str, Path)):
        vae = load_vae(vae, dtype=dtype, device=device)
    elif isinstance(vae, (AutoencoderKL, AutoencoderTiny)):
        pass  # moved and cast by load_components once nothing else can fail (it is the caller's)
    else:
        raise ValueError(
            "vae must be a component folder or a fastdiff AutoencoderKL / AutoencoderTiny, got "
            f"{type(vae).__name__}"
        )
    return vae


def default_image_size(unet_config: Any, vae_scale_factor: int) -> tuple[int, int]:
    """(height, width) from the U-Net's ``sample_size``, an int or [height, width]."""
    sample_size = unet_config.get("sample_size")
    sides = list(sample_size) if isinstance(sample_size, (list, tuple)) else [sample_size] * 2
    if len(sides) != 2 or any(
        isinstance(side, bool) or not isinstance(side, int) or side < 1 for side in sides
    ):
        raise ValueError(
            f"the U-Net config's sample_size is {sample_size!r}, not a positive int or "
            "[height, width], so there is no default image size: pass height and width"
        )
    return sides[0] * vae_scale_factor, sides[1] * vae_scale_factor


@dataclass
class PipelineComponents:
    """Everything ``Pipeline`` needs, loaded from a folder."""

    unet: Any
    vae: Any
    scheduler_config: dict[str, Any]
    prompt_encoder: PromptEncoder | None = None
    null_class_label: int | None = None
    class_names: list[str] | None = None
    force_zeros_for_empty_prompt: bool = False
    requires_aesthetics_score: bool = False
    defaults: CallDefaults = field(default_factory=CallDefaults)
    source: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    vae_latent_keys: tuple[str, ...] = ALL_LATENT_KEYS


def null_class_label_for(unet_config: dict[str, Any], index: dict[str, Any], where: Path) -> int:
    num_class_embeds = unet_config.get("num_class_embeds")
    label = index.get("null_class_label", num_class_embeds - 1)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < num_class_embeds:
        raise ValueError(
            f"{where}: null_class_label must be an int in [0, {num_class_embeds}), got {label!r}"
        )
    return label


def pipeline_scheduler_config(index: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The scheduler config the folder's diffusers pipeline class samples with."""
    if index.get("_class_name") in SD_PIPELINES:
        return {**config, **OUTDATED_SCHEDULER_FIXES}
    return config


def model_index_flag(index: dict[str, Any], key: str) -> bool:
    """A true/false option of model_index.json (absent or null: false), refusing other values
    (a string "false" would read as true)."""
    value = index.get(key)
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"model_index.json: {key} must be true or false, got {value!r}")
    return bool(value)


def requires_aesthetics_score(index: dict[str, Any]) -> bool:
    """``requires_aesthetics_score`` from model_index.json: true in SDXL refiner folders, whose
    U-Net is conditioned on an aesthetic score in place of the target size
    (``fastdiff.pipeline.micro_conditioning.add_time_ids``)."""
    return model_index_flag(index, "requires_aesthetics_score")


def check_micro_conditioning(
    unet_config: Any, encoders: list[Any], aesthetics: bool, where: Path
) -> None:
    """An SDXL U-Net's added-condition width is the pooled text embedding's plus
    ``addition_time_embed_dim`` per micro-conditioning id: 6 size ids, or 5 (original size,
    crop, aesthetic score) in a refiner. Where the text encoders fix the pooled width and only
    the other count adds up, requires_aesthetics_score is set the wrong way: say so at load."""
    added = unet_config.get("projection_class_embeddings_input_dim")
    per_id = unet_config.get("addition_time_embed_dim")
    pooled = [
        encoder.config.projection_dim for encoder in encoders if hasattr(encoder, "text_projection")
    ]
    if not pooled or not isinstance(added, int) or not isinstance(per_id, int):
        return
    ids, other = (5, 6) if aesthetics else (6, 5)
    if pooled[0] + ids * per_id != added and pooled[0] + other * per_id == added:
        takes = "original size, crop, aesthetic score" if other == 5 else "the sizes"
        raise ValueError(
            f"{where}: the U-Net's {added} added-condition features are the pooled text "
            f"embedding's {pooled[0]} and {other} ids ({takes}), but requires_aesthetics_score "
            f"is {str(aesthetics).lower()}: set it to {str(not aesthetics).lower()}"
        )


def force_zeros_for_empty_prompt(index: dict[str, Any]) -> bool:
    """``force_zeros_for_empty_prompt`` from model_index.json, as diffusers reads it: only the
    StableDiffusionXL* pipelines have the option (true when absent; null reads as false); the
    other classes ignore the key and encode "" as the negative prompt."""
    is_sdxl = str(index.get("_class_name", "")).startswith("StableDiffusionXL")
    if "force_zeros_for_empty_prompt" not in index:
        return is_sdxl
    value = model_index_flag(index, "force_zeros_for_empty_prompt")  # checked in any class
    return is_sdxl and value


# Weight file names of a component folder that carry no variant tag (diffusers' and
# transformers' single-file and sharded names).
DEFAULT_WEIGHT_FILES = {
    f"{stem}.{extension}{index}"
    for stem in ("diffusion_pytorch_model", "model", "pytorch_model")
    for extension in ("safetensors", "bin")
    for index in ("", ".index.json")
}


def component_variant(folder: Path, variant: str | None) -> str | None:
    """The weights variant to read ``folder`` (a pipeline subfolder) with.

    As diffusers' pipeline loading does, a requested variant applies only to subfolders holding a
    file tagged with it (``diffusion_pytorch_model.fp16.safetensors``, ``model.fp16-00001-of-
    00002.safetensors``); the others read their default weights. With no variant asked for, a
    folder whose only weights are ``fp16`` ones reads those (as ``load_unet`` does).
    """
    try:
        names = [path.name for path in folder.iterdir()]
    except OSError:
        return variant  # the loader names the missing folder
    split_names = [name.split(".") for name in names]
    if variant is not None:
        tagged = any(len(parts) > 1 and parts[1].startswith(variant) for parts in split_names)
        return variant if tagged else None
    if any(name in DEFAULT_WEIGHT_FILES for name in names):
        return None
    has_fp16 = any(len(parts) > 2 and parts[1].startswith("fp16") for parts in split_names)
    return "fp16" if has_fp16 else None


def scheduler_config_for(index: dict[str, Any], root: Path) -> dict[str, Any]:
    """The scheduler config with the class diffusers would build: the one ``model_index.json``
    names (it decides, whatever ``_class_name`` the config file gives), and the fixes the SD
    1.x/2.x pipelines apply."""
    config = read_json(root / SCHEDULER_CONFIG)
    listed = listed_class(index, "scheduler")
    if listed is not None:
        if listed not in SCHEDULER_CLASSES:
            raise ValueError(
                f"{root / 'model_index.json'}: scheduler class {listed!r} is not a DDPM-family "
                f"scheduler fastdiff can read; known: {sorted(SCHEDULER_CLASSES)}"
            )
        config = {**config, "_class_name": listed}
    return pipeline_scheduler_config(index, config)


def fix_outdated_sample_size(index: dict[str, Any], unet_folder: Path, unet_config: Any) -> None:
    """diffusers' SD 1.x/2.x pipelines read ``sample_size`` below 64 in a U-Net config written
    before diffusers 0.9 (early CompVis v1-x configs, and fine-tunes copied from them, say 32)
    as 64: 512-pixel images by default, not 256."""
    if index.get("_class_name") not in SD_PIPELINES:
        return
    sample_size = unet_config.get("sample_size")
    if isinstance(sample_size, bool) or not isinstance(sample_size, int) or sample_size >= 64:
        return
    version = read_json(unet_folder / "config.json").get("_diffusers_version")
    if isinstance(version, str) and version_before(version, (0, 9, 0)):
        unet_config.sample_size = 64


def version_before(version: str, release: tuple[int, ...]) -> bool:
    """Whether ``version``'s release numbers ("0.8.0", "0.10.2"; "0.9.0.dev0" reads as 0.9.0)
    come before ``release``: diffusers compares the base version, so a pre-release of 0.9.0
    does not count as older than 0.9."""
    numbers = []
    for part in version.split("."):
        digits = "".join(itertools.takewhile(str.isdigit, part))
        if not digits:
            break
        numbers.append(int(digits))
        if digits != part:
            break
    if len(numbers) < len(release):
        numbers += [0] * (len(release) - len(numbers))
    return tuple(numbers[: len(release)]) < release


def load_components(
    folder, device=None, dtype=None, variant: str | None = None, vae: Any = None
) -> PipelineComponents:
    """Load the U-Net, VAE, scheduler config and (when listed) the CLIP text encoders of a
    diffusers pipeline folder; every missing piece raises an error that names its path.
    ``vae``: an autoencoder to use instead of the folder's (``replacement_vae``), whose
    ``vae/`` is then neither needed nor read."""
    from fastdiff.models import load_unet, load_vae  # models sit below the pipeline

    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"pipeline folder not found: {root}")
    index_path = root / "model_index.json"
    index = read_json(index_path)
    for required in ("unet", "scheduler") if vae is not None else ("unet", "vae", "scheduler"):
        if listed_class(index, required) is None:
            raise ValueError(f"{index_path} does not list a {required!r} component")
        if not (root / required).is_dir():
            raise FileNotFoundError(
                f"model_index.json lists {required!r} but the folder {root / required} is missing"
            )
    zeros_for_empty_prompt = force_zeros_for_empty_prompt(index)  # checked before the weights
    aesthetics = requires_aesthetics_score(index)
    variants = {
        name: component_variant(root / name, variant)
        for name in ("unet", "vae", *(pair[0] for pair in TEXT_COMPONENTS))
        if listed_class(index, name) is not None and (name != "vae" or vae is None)
    }
    if variant is not None and not any(variants.values()):
        raise FileNotFoundError(
            f"{root}: variant={variant!r} was asked for but no component folder "
            f"({', '.join(variants)}) has weights of that variant (e.g. "
            f"diffusion_pytorch_model.{variant}.safetensors)"
        )
    scheduler_config = scheduler_config_for(index, root)
    unet_folder, vae_folder = root / "unet", root / "vae"
    unet = load_unet(unet_folder, dtype=dtype, device=device, variant=variants["unet"])
    fix_outdated_sample_size(index, unet_folder, unet.config)
    passed_model = vae is not None and not isinstance(vae, (str, Path))
    if vae is None:
        vae = load_vae(vae_folder, dtype=dtype, device=device, variant=variants["vae"])
    else:
        vae = replacement_vae(vae, device, dtype)

    pairs, names = [], []
    for encoder_name, tokenizer_name in TEXT_COMPONENTS:
        encoder_class = listed_class(index, encoder_name)
        tokenizer_class = listed_class(index, tokenizer_name)
        if encoder_class is None and tokenizer_class is None:
            continue
        if encoder_class is None or tokenizer_class is None:
            raise ValueError(
                f"{index_path}: {encoder_name!r} and {tokenizer_name!r} must be listed together"
            )
        tokenizer = load_text_component(
            root / tokenizer_name, tokenizer_class, SUPPORTED_TOKENIZERS, device, dtype
        )
        encoder = load_text_component(
            root / encoder_name,
            encoder_class,
            SUPPORTED_TEXT_ENCODERS,
            device,
            dtype,
            variants[encoder_name],
        )
        pairs.append((tokenizer, encoder))
        names.append(encoder_name)

    unet_config = unet.config
    text_time = unet_config.get("addition_embed_type") == "text_time"
    if text_time:
        check_micro_conditioning(unet_config, [pair[1] for pair in pairs], aesthetics, index_path)
    prompt_encoder = PromptEncoder(pairs, penultimate=text_time, names=names) if pairs else None
    null_label = None
    if unet_config.get("num_class_embeds") is not None:
        null_label = null_class_label_for(unet_config, index, index_path)
    class_names = index.get("class_names")
    if class_names is not None and (
        not isinstance(class_names, list) or not all(isinstance(n, str) for n in class_names)
    ):
        raise ValueError(
            f"{index_path}: class_names must be a list of strings, got {class_names!r}"
        )
    num_class_embeds = unet_config.get("num_class_embeds")
    if class_names is not None and num_class_embeds is not None:
        if len(class_names) != num_class_embeds - 1:
            raise ValueError(
                f"{index_path}: class_names has {len(class_names)} names but the U-Net has "
                f"{num_class_embeds - 1} classes (num_class_embeds {num_class_embeds}, one of "
                "them the null class)"
            )
    if passed_model:
        # Checked first: the caller's model is cast in place, so a failing load would have
        # handed it back changed.
        check_latent_channels(unet_config, vae.config)
        check_aesthetics_score(unet_config, aesthetics)
        vae.to(device=device, dtype=dtype)  # as the folder's components are loaded
    return PipelineComponents(
        unet=unet,
        vae=vae,
        scheduler_config=scheduler_config,
        prompt_encoder=prompt_encoder,
        null_class_label=null_label,
        class_names=class_names,
        # SDXL: with no negative prompt the unconditional input is all zeros.
        force_zeros_for_empty_prompt=zeros_for_empty_prompt,
        requires_aesthetics_score=aesthetics,
        defaults=CallDefaults.for_folder(index, scheduler_config),
        vae_latent_keys=latent_keys_for(index.get("_class_name")),
        source=root,
    )
