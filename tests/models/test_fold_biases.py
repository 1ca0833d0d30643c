"""ModelBase.fold_conv_biases: the same outputs, with convolution biases added inside other work.

The switch exists for speed on a GPU (PyTorch adds a cuDNN convolution's bias in a kernel of its
own); here, on CPU, each folded path is checked to give the unfolded result and to be the path
that actually ran (the folded-away convolution modules are not called)."""

from __future__ import annotations

import pytest
import torch

from fastdiff.models.resnet import ResnetBlock2D
from fastdiff.models.transformer import Transformer2DModel
from fastdiff.runtime import OptimizeReport, prepare_module
from tests.runtime.conftest import tiny_pipeline


def randomize_biases(module: torch.nn.Module) -> None:
    """Biases large enough that a dropped or doubled one shows (init leaves some near zero)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("bias"):
                param.normal_()


@pytest.fixture
def forward_calls(monkeypatch):
    """{id(layer): calls} of every nn.Conv2d / nn.Linear forward (patched on the classes: a
    forward hook would itself keep a layer from being folded)."""
    counts: dict[int, int] = {}
    for cls in (torch.nn.Conv2d, torch.nn.Linear):

        def counting(self, *args, _forward=cls.forward, **kwargs):
            counts[id(self)] = counts.get(id(self), 0) + 1
            return _forward(self, *args, **kwargs)

        monkeypatch.setattr(cls, "forward", counting)
    return lambda layer: counts.get(id(layer), 0)


def layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("in_channels", [16, 8], ids=["identity-shortcut", "conv-shortcut"])
@pytest.mark.parametrize("with_temb", [True, False], ids=["temb", "no-temb"])
def test_resnet_block(forward_calls, channels_last, in_channels, with_temb):
    block = ResnetBlock2D(in_channels, 16, 12, groups=4, eps=1e-5).eval()
    randomize_biases(block)
    x = layout(torch.randn(2, in_channels, 6, 6), channels_last)
    temb = torch.randn(2, 12) if with_temb else None
    with torch.no_grad():
        expected = block(x, temb)
        before = forward_calls(block.conv1), forward_calls(block.conv_shortcut)
        block.fold_biases = True
        folded = block(x, temb)
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5)
    assert folded.is_contiguous(memory_format=torch.channels_last) == channels_last
    # conv1's bias joins the time embedding; conv2's the shortcut's GEMM (channels-last only)
    assert forward_calls(block.conv1) - before[0] == (0 if with_temb else 1)
    if block.conv_shortcut is not None:
        assert forward_calls(block.conv_shortcut) - before[1] == (0 if channels_last else 1)


def test_wrapped_or_hooked_layers_are_called_as_they_are():
    block = ResnetBlock2D(8, 16, 12, groups=4, eps=1e-5).eval()
    randomize_biases(block)
    x = layout(torch.randn(2, 8, 6, 6), True)
    temb = torch.randn(2, 12)
    # a hook that changes the output, as a LoRA-style patch would: folding must not skip it
    block.conv1.register_forward_hook(lambda module, inputs, out: out * 2)
    block.conv_shortcut.register_forward_hook(lambda module, inputs, out: out + 1)
    with torch.no_grad():
        expected = block(x, temb)
        block.fold_biases = True
        folded = block(x, temb)
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("linear_projection", [False, True], ids=["conv-proj", "linear-proj"])
def test_transformer_projections(forward_calls, channels_last, linear_projection):
    model = Transformer2DModel(2, 8, 16, 1, 12, 4, use_linear_projection=linear_projection).eval()
    randomize_biases(model)
    x = layout(torch.randn(2, 16, 4, 4), channels_last)
    context = torch.randn(2, 5, 12)
    with torch.no_grad():
        expected = model(x, context)
        before = forward_calls(model.proj_in), forward_calls(model.proj_out)
        model.fold_biases = True
        folded = model(x, context)
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5)
    assert folded.is_contiguous(memory_format=torch.channels_last) == channels_last
    # a 1x1 conv runs as a GEMM on the token rows only where they are a view (channels-last)
    called = 0 if channels_last and not linear_projection else 1
    assert forward_calls(model.proj_in) - before[0] == called
    assert forward_calls(model.proj_out) - before[1] == called


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_unet_output_and_state_dict_unchanged(channels_last):
    unet = tiny_pipeline().unet
    randomize_biases(unet)
    state = {name: value.clone() for name, value in unet.state_dict().items()}
    x = layout(torch.randn(2, 4, 8, 8), channels_last)
    t = torch.tensor([999, 10])
    context = torch.randn(2, 7, 32)
    blocks = [m for m in unet.modules() if isinstance(m, ResnetBlock2D | Transformer2DModel)]
    with torch.no_grad():
        expected = unet(x, t, context)
        report = OptimizeReport("cpu")
        prepare_module(unet, "unet", report, None, channels_last, True, fold_biases=True)
        folded = unet(x, t, context)
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5)
    assert f"unet: convolution biases folded ({len(blocks)} blocks)" in report.applied
    assert all(block.fold_biases for block in blocks)
    assert unet.state_dict().keys() == state.keys()
    assert all(torch.equal(unet.state_dict()[name], value) for name, value in state.items())
    # preparing again without the option switches the blocks back
    prepare_module(unet, "unet", OptimizeReport("cpu"), None, channels_last, True)
    assert not any(block.fold_biases for block in blocks)
