"""optimize()'s model transformations (fused QKV, bias folds, upsample folds) and the U-Net's
forward variants on models whose layers a user has hooked, patched or wrapped, as adapter
libraries do: each transformation must leave such a layer to be called as it is (the output
of the untransformed model with the same patch) and must not fail on it."""

from __future__ import annotations

import pytest
import torch

from fastdiff.models import UNet2DConditionModel
from fastdiff.models.transformer import BasicTransformerBlock
from tests.models.reference import UNET_CONFIGS, perturb, unet_inputs


class Wrapped(torch.nn.Module):
    """Another module in a layer's place, wrapping it (as some adapter libraries replace
    layers): no ``weight`` or ``bias`` of its own."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * 1.5


def hooked(layer: torch.nn.Module) -> torch.nn.Module:
    layer.register_forward_hook(lambda module, inputs, out: out * 2)
    return layer


def forward_replaced(layer: torch.nn.Module) -> torch.nn.Module:
    original = layer.forward
    layer.forward = lambda *args, **kwargs: original(*args, **kwargs) * 1.5
    return layer


PATCHES = {"hook": hooked, "replaced-forward": forward_replaced, "wrapper": Wrapped}


def tiny_unet(name: str = "sd1") -> UNet2DConditionModel:
    torch.manual_seed(0)
    unet = perturb(UNet2DConditionModel(UNET_CONFIGS[name]), seed=3)
    with torch.no_grad():  # biases large enough that a dropped one shows
        for param_name, param in unet.named_parameters():
            if param_name.endswith("bias"):
                param.normal_()
    return unet


def patch_layer(parent: torch.nn.Module, name: str, patch) -> None:
    setattr(parent, name, patch(getattr(parent, name)))


def run(unet: UNet2DConditionModel, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return unet(**inputs)


# --- fused QKV ----------------------------------------------------------------------------


@pytest.mark.parametrize("patch", list(PATCHES), ids=str)
@pytest.mark.parametrize("attention,projection", [("attn1", "to_q"), ("attn2", "to_k")])
def test_fusing_leaves_an_attention_with_a_patched_projection_unfused(patch, attention, projection):
    """A hooked projection lost its hook (the fused GEMM ran without it), a wrapped one made
    fuse_qkv_projections fail half-way, with the attentions before it fused."""
    unet = tiny_unet()
    inputs = unet_inputs("sd1")
    block = unet.mid_block.attentions[0].transformer_blocks[0]
    module = getattr(block, attention)
    patch_layer(module, projection, PATCHES[patch])
    expected = run(unet, inputs)
    count = unet.fuse_qkv_projections()
    torch.testing.assert_close(run(unet, inputs), expected, rtol=1e-5, atol=1e-5)
    assert not module.fused
    others = [m for m in unet.attention_modules() if m is not module]
    assert count == len(others) and all(m.fused for m in others)


# --- bias folds ---------------------------------------------------------------------------


@pytest.mark.parametrize("layer", ["conv1", "time_emb_proj"])
@pytest.mark.parametrize("when", ["before-folding", "after-folding"])
def test_bias_folds_call_a_wrapped_resnet_layer_as_it_is(layer, when):
    """fold_conv_biases read a wrapped conv1's or time projection's bias (an AttributeError,
    with every block's fold_biases already switched on, also when switching it off), and a
    folded U-Net's forward read it again."""
    unet = tiny_unet()
    inputs = unet_inputs("sd1")
    resnet = unet.up_blocks[0].resnets[1]
    if when == "before-folding":
        patch_layer(resnet, layer, Wrapped)
        expected = run(unet, inputs)
        unet.fold_conv_biases()
    else:
        unet.fold_conv_biases()
        patch_layer(resnet, layer, Wrapped)
        unet.fold_conv_biases(False)
        expected = run(unet, inputs)
        unet.fold_conv_biases()
    torch.testing.assert_close(run(unet, inputs), expected, rtol=1e-5, atol=1e-5)
    assert not resnet.batchable()


def test_bias_folds_call_a_replaced_feed_forward_as_it_is():
    block = BasicTransformerBlock(16, 2, 8, 12).eval()
    block.ff = Wrapped(block.ff)
    x, context = torch.randn(2, 10, 16), torch.randn(2, 5, 12)
    with torch.no_grad():
        expected = block(x, context)
        block.fold_biases = True
        folded = block(x, context)
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5)


# --- upsample folds -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["transposed", "phases", "auto"])
def test_upsample_fold_runs_a_wrapped_convolution_as_it_is(mode):
    """fold_upsampling derived a fold from a wrapped convolution's weight (an AttributeError
    half-way through the upsamplers), and refresh_folded_weights, which the runtime calls
    before every generation, read it too."""
    unet = tiny_unet()
    inputs = unet_inputs("sd1")
    upsampler = unet.up_blocks[0].upsamplers[0]
    patch_layer(upsampler, "conv", Wrapped)
    expected = run(unet, inputs)
    assert unet.fold_upsampling(mode) == 1
    assert unet.refresh_folded_weights() == 0
    torch.testing.assert_close(run(unet, inputs), expected, rtol=1e-5, atol=1e-5)


# --- the forward's per-row inputs ---------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 3])
def test_class_labels_given_as_a_list_per_row_repeat_the_samples(batch):
    """The U-Net takes class labels as a list too; with one per row ([null; class] for each
    sample, as classifier-free guidance gives them) the samples must be repeated up front,
    as for a tensor of labels. A list was not seen as per row: the blocks met a time
    embedding of twice the sample's batch and failed."""
    unet = tiny_unet("class_conditional")
    inputs = unet_inputs("class_conditional", batch=batch)
    null = UNET_CONFIGS["class_conditional"]["num_class_embeds"] - 1
    labels = [null] * batch + [i % null for i in range(batch)]
    sample, timestep = inputs["sample"], inputs["timestep"]
    with torch.no_grad():
        expected = unet(
            torch.cat([sample] * 2), timestep.repeat(2), class_labels=torch.tensor(labels)
        )
        for fold in (False, True):
            unet.fold_conv_biases(fold)
            out = unet(sample, timestep, class_labels=labels)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
