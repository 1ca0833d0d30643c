"""A whole U-Net forward through the triton kernels equals the eager backend within the tolerance
rule: fp16 triton error against an fp32 eager reference <= 2 x the fp16 eager error + floor."""

from __future__ import annotations

import fastdiff.kernels.attention as attention_kernels
import fastdiff.kernels.bias_residual as bias_residual_kernels
import fastdiff.kernels.cat_channels as cat_kernels
import fastdiff.kernels.conv3x3 as conv3x3_kernels
import fastdiff.kernels.group_norm as group_norm_kernels
import fastdiff.kernels.layer_norm as layer_norm_kernels
import fastdiff.kernels.linear_geglu as linear_geglu_kernels
import pytest
import torch

from fastdiff.models import UNet2DConditionModel
from fastdiff.ops import use_backend
from tests.models.reference import UNET_CONFIGS, unet_inputs
from tests.ops.helpers import CallCounter, assert_within_tolerance


def cast(inputs: dict, device: str, dtype: torch.dtype) -> dict:
    def move(value):
        if isinstance(value, dict):
            return {key: move(item) for key, item in value.items()}
        if not torch.is_tensor(value):
            return value
        value = value.to(device)
        return value.to(dtype) if value.is_floating_point() else value

    return {key: move(value) for key, value in inputs.items()}


def compare_backends(
    name: str, device: str, dtype: torch.dtype, monkeypatch, fold_biases: bool = False
) -> None:
    """Eager (fp32 reference, then ``dtype``) against triton; with ``fold_biases`` the triton run
    fuses the projections, goes channels-last and folds the convolution biases (norm2's
    time-embedding offset inside the GroupNorm kernel), packing the cross-attentions' key and
    value projections."""
    counters = [
        CallCounter(monkeypatch, module, launcher)
        for module, launcher in (
            (group_norm_kernels, "group_norm_forward"),
            (attention_kernels, "attention_forward"),
            (layer_norm_kernels, "layer_norm_forward"),
            (linear_geglu_kernels, "linear_geglu_forward"),
        )
    ]
    model = UNet2DConditionModel(UNET_CONFIGS[name]).eval().to(device)
    inputs = unet_inputs(name)
    # cuDNN runs fp32 convolutions in TF32 by default: the reference must be true fp32.
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad(), use_backend("eager"):
            reference = model(**cast(inputs, device, torch.float32))
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    model = model.to(dtype)
    with torch.no_grad():
        with use_backend("eager"):
            eager = model(**cast(inputs, device, dtype))
        assert all(counter.calls == 0 for counter in counters)
        fast_inputs = cast(inputs, device, dtype)
        if fold_biases:  # as optimize() prepares it: fused projections (the cross-attentions'
            # to_kv then packed) and channels-last, where the 3x3 convolutions of these small
            # maps take the conv3x3 kernel (and the skip concatenations the cat_channels one)
            model.fuse_qkv_projections()
            model.to(memory_format=torch.channels_last)
            sample = fast_inputs["sample"]
            fast_inputs["sample"] = sample.contiguous(memory_format=torch.channels_last)
            counters.append(CallCounter(monkeypatch, conv3x3_kernels, "conv3x3_forward"))
            # and the up blocks' skip concatenations the channels-last copy kernel, the
            # identity-shortcut ResNet blocks' ends the bias_residual one
            counters.append(CallCounter(monkeypatch, cat_kernels, "cat_channels_forward"))
            counters.append(
                CallCounter(monkeypatch, bias_residual_kernels, "bias_residual_forward")
            )
        model.fold_conv_biases(fold_biases)
        with use_backend("triton"):
            fused = model(**fast_inputs)
    # Every kernel of a transformer U-Net ran (not a silent eager fallback).
    assert all(counter.calls > 0 for counter in counters), [c.calls for c in counters]
    assert_within_tolerance(fused, reference.to(dtype), eager, f"{name} U-Net {dtype}")


@pytest.mark.parametrize("fold_biases", [False, True], ids=["biases", "folded-biases"])
def test_tiny_sd1_unet_triton_equals_eager_on_cpu(triton_backend, monkeypatch, fold_biases):
    compare_backends("sd1", "cpu", torch.float32, monkeypatch, fold_biases)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("fold_biases", [False, True], ids=["biases", "folded-biases"])
def test_tiny_unets_triton_equals_eager_on_gpu(monkeypatch, name, dtype, fold_biases):
    compare_backends(name, "cuda", dtype, monkeypatch, fold_biases)
