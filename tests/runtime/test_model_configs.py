"""The benchmark architectures (benchmarks/model_configs.py) are the published ones: parameter
counts and FLOP per U-Net call, built on the meta device (no memory, no compute)."""

from __future__ import annotations

import pytest
import torch
from model_configs import MODELS, model_config

from fastdiff.models import AutoencoderKL, UNet2DConditionModel


def build_on_meta(name: str):
    cls = AutoencoderKL if "vae" in name else UNet2DConditionModel
    with torch.device("meta"):
        return cls(model_config(name))


@pytest.mark.parametrize(
    "name, millions",
    [("sd15_unet", 859.52), ("sdxl_unet", 2567.46), ("sd_vae", 83.65)],
)
def test_parameter_counts_match_published_models(name, millions):
    model = build_on_meta(name)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / 1e6 - millions) < 0.01


def test_sd15_unet_flops_match_baseline():
    import bench_unet

    flop = bench_unet.unet_flops(bench_unet.GPU_WORKLOADS["sd15_b2"])
    assert flop == pytest.approx(1.607e12, rel=1e-3)  # BASELINES.md: 1.607 T at batch 2


def test_model_config_returns_copies_and_rejects_unknown_names():
    config = model_config("sd15_unet")
    config["block_out_channels"].append(1)
    assert MODELS["sd15_unet"]["block_out_channels"] == [320, 640, 1280, 1280]
    with pytest.raises(ValueError, match="allowed values"):
        model_config("sd3")


def test_narrow_sd15_unet_has_every_sd15_layer():
    """host_overhead.py --unet times the narrow U-Net as SD1.5's op calls: the same modules,
    class by class, in the same order."""

    def layer_classes(name: str) -> list[str]:
        return [type(module).__name__ for module in build_on_meta(name).modules()]

    assert layer_classes("narrow_sd15_unet") == layer_classes("sd15_unet")
