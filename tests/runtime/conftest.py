"""Tiny fastdiff pipelines (random weights, real block structure) shared by the runtime tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))


def tiny_pipeline(
    unet_config: str = "tiny_sd15_unet",
    device: str = "cpu",
    dtype=torch.float32,
    inpainting: bool = False,
):
    """``inpainting``: the U-Net takes 9 channels (latents, mask, masked-image latents)."""
    from model_configs import SD_SCHEDULER, model_config

    from fastdiff.models import AutoencoderKL, UNet2DConditionModel
    from fastdiff.pipeline import Pipeline
    from fastdiff.sampling import NoiseSchedule

    torch.manual_seed(1234)
    config = model_config(unet_config)
    if inpainting:
        config["in_channels"] = 9
    unet = UNet2DConditionModel(config).to(device=device, dtype=dtype).eval()
    vae = AutoencoderKL(model_config("tiny_vae")).to(device=device, dtype=dtype).eval()
    # SD 1.5's scheduler config has skip_prk_steps (its PNDM: PLMS steps only), which the pndm
    # sampler needs and the others ignore
    schedule = NoiseSchedule.from_config({**SD_SCHEDULER, "skip_prk_steps": True})
    return Pipeline(unet, vae, schedule)


def with_folds(pipe):
    """The U-Net with optimize()'s default bias folds already on, so an eager reference computed
    before optimize() does the same arithmetic as the optimized runtime (the folds move fp32
    rounding by about 1e-5; tests/models/test_fold_biases.py compares the two)."""
    pipe.unet.fold_conv_biases(True)
    return pipe


@pytest.fixture
def pipe():
    return with_folds(tiny_pipeline())


@pytest.fixture
def sdxl_pipe():
    return with_folds(tiny_pipeline("tiny_sdxl_unet"))
