"""Cross-attention keys and values of the text context in one GEMM (fastdiff.models.packing):
under fold_biases, a U-Net with fused projections packs every cross-attention's ``to_kv``
weights side by side and projects the context once per forward. Each case checks the output
against the unpacked model and counts the GEMMs that ran."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastdiff import ops
from fastdiff.models.packing import context_attentions
from tests.models.test_fold_biases import (
    hook,
    randomize_biases,
    replace_forward,
    time_projection_calls,
    unet_inputs,
    unet_unfolded_and_folded,
)
from tests.ops.helpers import CallCounter
from tests.runtime.conftest import tiny_pipeline


@pytest.fixture
def linear_calls(monkeypatch):
    """The F.linear calls (nn.Linear calls F.linear too); ``.argument(1, "weight")``."""
    return CallCounter(monkeypatch, F, "linear")


def context_projection_calls(unet, linear_calls: CallCounter) -> tuple[int, int]:
    """(GEMMs over all cross-attentions' packed to_kv weights, GEMMs with one module's)."""
    modules = context_attentions(unet)
    rows = sum(module.to_kv.out_features for module in modules)
    own = {id(module.to_kv.weight) for module in modules}
    weights = linear_calls.argument(1, "weight")
    batched = sum(w.shape == (rows, modules[0].to_kv.in_features) for w in weights)
    return batched, sum(id(w) in own for w in weights)


def sdxl_kwargs(unet) -> dict:
    dim = unet.config.projection_class_embeddings_input_dim
    extra = dim - 6 * unet.config.addition_time_embed_dim
    return {
        "added_cond_kwargs": {"text_embeds": torch.randn(2, extra), "time_ids": torch.randn(2, 6)}
    }


def fused_unet(config: str = "tiny_sd15_unet"):
    unet = tiny_pipeline(config).unet
    randomize_biases(unet)
    unet.fuse_qkv_projections()
    return unet


@pytest.mark.parametrize("config", ["tiny_sd15_unet", "tiny_sdxl_unet"])
def test_context_projections_run_as_one_gemm(monkeypatch, linear_calls, config):
    unet = fused_unet(config)
    modules = context_attentions(unet)
    assert len(modules) > 1
    x, t, context = unet_inputs()
    kwargs = sdxl_kwargs(unet) if config == "tiny_sdxl_unet" else {}
    with torch.no_grad():
        expected = unet(x, t, context, **kwargs)
        assert context_projection_calls(unet, linear_calls) == (0, len(modules))
        linear_calls.arguments.clear()
        unet.fold_conv_biases()
        attention = CallCounter(monkeypatch, ops, "attention")
        folded = unet(x, t, context, **kwargs)
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5)
    assert context_projection_calls(unet, linear_calls) == (1, 0)
    # every cross-attention read its keys and values from views of the one projection
    keys = [k for k in attention.argument(1, "k") if k.shape[2] == context.shape[1]]
    assert len(keys) == len(modules)
    assert len({k.untyped_storage().data_ptr() for k in keys}) == 1


def test_unfused_projections_are_not_packed(linear_calls):
    unet = tiny_pipeline().unet
    randomize_biases(unet)
    x, t, context = unet_inputs()
    with torch.no_grad():
        expected = unet(x, t, context)
        unet.fold_conv_biases()
        torch.testing.assert_close(unet(x, t, context), expected, rtol=1e-5, atol=1e-5)
    assert unet.packed_context_modules == () and context_attentions(unet) == []


def test_folding_off_again_projects_in_each_module(linear_calls):
    unet = fused_unet()
    x, t, context = unet_inputs()
    with torch.no_grad():
        unet.fold_conv_biases()
        expected = unet(x, t, context)
        unet.fold_conv_biases(False)
        linear_calls.arguments.clear()
        torch.testing.assert_close(unet(x, t, context), expected, rtol=1e-5, atol=1e-5)
    assert context_projection_calls(unet, linear_calls) == (0, len(context_attentions(unet)))


@pytest.mark.parametrize("kind", ["time", "context"])
def test_packing_keeps_the_state_dict_and_sees_loaded_weights(linear_calls, kind):
    """Both packings (the ResNet blocks' time projections, the cross-attentions' to_kv):
    parameters become views, so the state dict is unchanged and a load lands in the packed
    tensors, which the next forward's one GEMM reads."""
    unet, other = fused_unet(), fused_unet()
    with torch.no_grad():
        for param in other.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    state = {name: value.clone() for name, value in unet.state_dict().items()}
    unet.fold_conv_biases()
    assert unet.state_dict().keys() == state.keys()
    assert all(torch.equal(unet.state_dict()[name], value) for name, value in state.items())
    unet.load_state_dict(other.state_dict())  # copies into the packed storage in place
    x, t, context = unet_inputs()
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, context), other(x, t, context), rtol=1e-5, atol=1e-5)
    batched = time_projection_calls if kind == "time" else context_projection_calls
    assert batched(unet, linear_calls)[0] == 1


@pytest.mark.parametrize("kind", ["time", "context"])
def test_a_cast_after_folding_unpacks_and_each_layer_computes_its_own(linear_calls, kind):
    """.to() gives every parameter storage of its own: the packed views are gone, each layer
    computes its own output (the same numbers); folding again packs them again."""
    unet = fused_unet()
    x, t, context = unet_inputs()
    calls = time_projection_calls if kind == "time" else context_projection_calls
    layers = len(unet.time_blocks() if kind == "time" else context_attentions(unet))
    with torch.no_grad():
        expected = unet.double()(x.double(), t, context.double())
        unet.float().fold_conv_biases()
        unet.double()
        linear_calls.arguments.clear()
        torch.testing.assert_close(unet(x.double(), t, context.double()), expected)
        assert calls(unet, linear_calls) == (0, layers)
        unet.fold_conv_biases()
        linear_calls.arguments.clear()
        torch.testing.assert_close(unet(x.double(), t, context.double()), expected)
    assert calls(unet, linear_calls) == (1, 0)


@pytest.mark.parametrize("patch", [hook, replace_forward], ids=["hook", "lora"])
def test_a_patched_projection_is_called_as_it_is(linear_calls, patch):
    unet = fused_unet()
    modules = context_attentions(unet)
    patch(modules[1].to_kv)
    expected, folded = unet_unfolded_and_folded(unet, linear_calls, *unet_inputs())
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5)
    # the batch for the others; the patched module's own GEMM (its forward, as patched)
    assert context_projection_calls(unet, linear_calls) == (1, 1)


@pytest.mark.parametrize("trained", ["context", "projections-only"])
def test_gradients_take_each_modules_own_projection(trained):
    unet = fused_unet()
    unet.fold_conv_biases()
    x, t, context = unet_inputs()
    if trained == "context":
        unet.requires_grad_(False)
        context.requires_grad_(True)
    else:
        unet.requires_grad_(False)
        for module in context_attentions(unet):
            module.to_kv.requires_grad_(True)
    unet(x, t, context).square().mean().backward()
    if trained == "context":
        assert context.grad is not None and context.grad.abs().sum() > 0
    else:
        for module in context_attentions(unet):
            assert module.to_kv.weight.grad is not None
            assert module.to_kv.weight.grad.abs().sum() > 0


class LoRAWrapper(torch.nn.Module):
    """A linear layer wrapped with a low-rank update, as adapter libraries replace layers."""

    def __init__(self, base: torch.nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.down = torch.nn.Linear(base.in_features, 2, bias=False)
        self.up = torch.nn.Linear(2, base.out_features, bias=False)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


@pytest.mark.parametrize("when", ["before-folding", "after-folding"])
def test_a_to_kv_replaced_by_a_wrapper_projects_the_context_itself(when):
    unet = fused_unet()
    x, t, context = unet_inputs()
    module = context_attentions(unet)[1]
    with torch.no_grad():
        if when == "before-folding":
            module.to_kv = LoRAWrapper(module.to_kv)
            expected = unet(x, t, context)
            unet.fold_conv_biases()
            assert module not in unet.packed_context_modules
        else:
            unet.fold_conv_biases()
            module.to_kv = LoRAWrapper(module.to_kv)
            unet.fold_conv_biases(False)
            expected = unet(x, t, context)
            unet.fold_conv_biases()
        folded = unet(x, t, context)
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5)


def test_hooks_on_attn2_see_the_context_tensor():
    """A pre-hook on a cross-attention (as image-prompt adapters change the context) gets the
    context tensor, not the projections computed ahead, and its change takes effect."""
    unet = fused_unet()
    x, t, context = unet_inputs()
    module = context_attentions(unet)[0]
    seen = []

    def hook(layer, args):
        seen.append(type(args[1]))
        return (args[0], args[1] * 2.0)

    module.register_forward_pre_hook(hook)
    with torch.no_grad():
        expected = unet(x, t, context)
        unet.fold_conv_biases()
        folded = unet(x, t, context)
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5)
    assert seen == [torch.Tensor, torch.Tensor]


def test_a_context_projected_ahead_is_used_as_it_is(linear_calls):
    """``context_projections`` once, then forwards that receive its result (as a runtime does
    for every step of a generation): no context GEMM in them, the same output."""
    unet = fused_unet()
    x, t, context = unet_inputs()
    with torch.no_grad():
        unet.fold_conv_biases()
        expected = unet(x, t, context)
        linear_calls.arguments.clear()
        projected = unet.context_projections(context)
        assert context_projection_calls(unet, linear_calls) == (1, 0)
        linear_calls.arguments.clear()
        for _ in range(2):
            torch.testing.assert_close(unet(x, t, projected), expected, rtol=0, atol=0)
    assert context_projection_calls(unet, linear_calls) == (0, 0)


def test_projections_of_another_unet_leave_each_module_to_project(linear_calls):
    """A U-Net handed projections made for another one's modules finds none of its own among
    them: each of its cross-attentions projects the context itself."""
    unet, other = fused_unet(), fused_unet()
    other.fold_conv_biases()
    x, t, context = unet_inputs()
    with torch.no_grad():
        projected = other.context_projections(context)
        expected = unet(x, t, context)
        linear_calls.arguments.clear()
        torch.testing.assert_close(unet(x, t, projected), expected, rtol=1e-6, atol=1e-6)
    assert context_projection_calls(unet, linear_calls) == (0, len(context_attentions(unet)))


def test_loading_projections_of_another_packing_raises():
    unet = fused_unet()
    unet.fold_conv_biases()
    context = torch.randn(2, 7, 32)
    with torch.no_grad():
        static = unet.context_projections(torch.zeros_like(context))
        fresh = unet.context_projections(context)
        static.load_(fresh)  # the same packing: the static tensors take the new values
        torch.testing.assert_close(static.projected, fresh.projected)
        torch.testing.assert_close(static.states, context)
        shorter = unet.context_projections(torch.randn(2, 5, 32))
    with pytest.raises(ValueError, match="another packing"):
        static.load_(shorter)
