"""Run the training stages a config asks for and assemble the diffusers pipeline folder.

Layout of ``output_dir``:
  <stage>_checkpoint.pt, <stage>_log.csv   resumable state and loss log per stage
  metrics.json                            held-out accuracy / PSNR / scaling factor / final losses
  pipeline/                               model_index.json, unet/, vae/, scheduler/, classifier/
The stages run in the order classifier, vae, unet; a later stage reads what an earlier one wrote
to ``pipeline/`` (the U-Net trains on the latents of the VAE exactly as exported), so stages can
also run in separate invocations.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from fastdiff.files import atomic_write
from fastdiff.training.classifier import save_classifier
from fastdiff.training.config import TrainConfig, config_to_dict
from fastdiff.training.data import ShapesData
from fastdiff.training.distributed import (
    DistContext,
    barrier,
    setup_distributed,
    shutdown_distributed,
)
from fastdiff.training.model_io import save_unet, save_vae
from fastdiff.training.shapes import CLASS_NAMES, NUM_CLASSES
from fastdiff.training.stages import encode_means, train_classifier, train_vae
from fastdiff.training.unet_stage import scheduler_config_dict, train_unet

PIPELINE_DIR = "pipeline"


def write_json(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def model_index() -> dict[str, Any]:
    """``model_index.json``: the diffusers components plus fastdiff's class-conditioning keys
    (``null_class_label``: the label trained as "no condition"; ``class_names``)."""
    return {
        "_class_name": "FastdiffClassConditionalPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "null_class_label": NUM_CLASSES,
        "class_names": list(CLASS_NAMES),
    }


def load_trained_vae(folder: Path, device: torch.device):
    from fastdiff.models import load_vae

    vae = load_vae(folder, dtype=torch.float32, device=device)
    return vae.requires_grad_(False).eval()


def run_training(
    config: TrainConfig, stop_after_step: int | None = None, context: DistContext | None = None
) -> dict[str, Any]:
    """Run ``config.stages``; returns the metrics (also written to ``metrics.json``)."""
    own_context = context is None
    context = context or setup_distributed(config.device)
    try:
        return _run_stages(config, context, stop_after_step)
    finally:
        if own_context:
            shutdown_distributed(context)


def _run_stages(
    config: TrainConfig, context: DistContext, stop_after_step: int | None
) -> dict[str, Any]:
    torch.manual_seed(config.seed)
    output = Path(config.output_dir)
    if output.exists() and not output.is_dir():
        raise ValueError(f"output_dir {output} exists and is not a directory")
    pipeline = output / PIPELINE_DIR
    metrics_path = output / "metrics.json"
    metrics: dict[str, Any] = {}
    if metrics_path.exists():
        try:
            metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{metrics_path} is not a JSON file ({error})") from None
        if not isinstance(metrics, dict):
            raise ValueError(
                f"{metrics_path} holds a JSON {type(metrics).__name__}, not the object of "
                "metrics a training run writes: is output_dir another program's folder?"
            )
    metrics["config"] = config_to_dict(config)
    data = ShapesData.from_config(config.data).to(context.device)

    def record(stage: str, values: dict[str, Any], started: float) -> None:
        values["seconds"] = round(time.perf_counter() - started, 1)
        previous = metrics.get(stage) or {}
        if values.get("final_loss") is None and "final_loss" in previous:
            # Re-running a finished stage trains nothing: keep the loss of the run that did.
            values["final_loss"] = previous["final_loss"]
            values["seconds"] = previous.get("seconds", values["seconds"])
        metrics[stage] = values
        if context.is_main:
            write_json(metrics_path, metrics)
            print(f"[{stage}] " + ", ".join(f"{k}={v}" for k, v in values.items()), flush=True)

    if "classifier" in config.stages:
        started = time.perf_counter()
        outcome = train_classifier(config, data, context, stop_after_step)
        if context.is_main and outcome.result.finished:
            save_classifier(outcome.model, pipeline / "classifier")
        record(
            "classifier",
            {
                "held_out_accuracy": outcome.held_out_accuracy,
                "steps": outcome.result.step,
                "final_loss": _tail_mean(outcome.result.losses),
            },
            started,
        )

    if "vae" in config.stages:
        started = time.perf_counter()
        outcome = train_vae(config, data, context, stop_after_step)
        if context.is_main and outcome.result.finished:
            save_vae(outcome.model, pipeline / "vae", outcome.scaling_factor, config.export_dtype)
        record(
            "vae",
            {
                "held_out_psnr_db": round(outcome.held_out_psnr, 2),
                "scaling_factor": outcome.scaling_factor,
                "steps": outcome.result.step,
                "final_loss": _tail_mean(outcome.result.losses),
            },
            started,
        )
    barrier(context)

    if "unet" in config.stages:
        started = time.perf_counter()
        if not (pipeline / "vae").is_dir():
            raise FileNotFoundError(
                f"the unet stage needs a trained VAE in {pipeline / 'vae'}: run the vae stage first"
            )
        vae = load_trained_vae(pipeline / "vae", context.device)
        latents = encode_means(vae, data.images) * vae.config.scaling_factor
        vae_config = vae.config.to_dict()
        outcome = train_unet(
            config, latents, data.labels, context, stop_after_step, vae_config=vae_config
        )
        if context.is_main and outcome.result.finished:
            save_unet(outcome.ema_model, pipeline / "unet", config.export_dtype)
            write_json(
                pipeline / "scheduler" / "scheduler_config.json", scheduler_config_dict(config.unet)
            )
            write_json(pipeline / "model_index.json", model_index())
        record(
            "unet",
            {
                "latent_std": round(latents.std().item(), 4),
                "steps": outcome.result.step,
                "final_loss": _tail_mean(outcome.result.losses),
            },
            started,
        )
    barrier(context)
    return metrics


def _tail_mean(losses: list[float], count: int = 100) -> float | None:
    tail = losses[-count:]
    return round(sum(tail) / len(tail), 6) if tail else None
