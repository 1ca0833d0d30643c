"""ModelBase.fold_conv_biases: the same outputs, with convolution biases added inside other work.

The switch exists for speed on a GPU (PyTorch adds a cuDNN convolution's bias in a kernel of its
own); here, on CPU, each folded path is checked to give the unfolded result and to be the path
that actually ran (the folded-away convolution modules are not called)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastdiff import ops
from fastdiff.models.resnet import ResnetBlock2D
from fastdiff.models.transformer import BasicTransformerBlock, Transformer2DModel
from fastdiff.runtime import OptimizeReport, prepare_module
from tests.ops.helpers import CallCounter
from tests.runtime.conftest import tiny_pipeline


def randomize_biases(module: torch.nn.Module) -> None:
    """Biases large enough that a dropped or doubled one shows (init leaves some near zero)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("bias"):
                param.normal_()


@pytest.fixture
def conv_calls(monkeypatch):
    """conv_calls(layer, with_bias) -> how many F.conv2d calls used ``layer``'s weight, with a
    bias or without. Counted on torch.nn.functional, which nn.Conv2d calls too: patching the
    layer or its class would itself keep it from being folded."""
    conv2d = CallCounter(monkeypatch, F, "conv2d")

    def count(layer, with_bias):
        calls = zip(conv2d.argument(1, "weight"), conv2d.argument(2, "bias"), strict=True)
        return sum(w is layer.weight and (b is not None) == with_bias for w, b in calls)

    return count


@pytest.fixture
def group_norms(monkeypatch):
    """The ``fastdiff.ops.group_norm`` calls (``.argument(6, "offset")``: their offsets)."""
    return CallCounter(monkeypatch, ops, "group_norm")


def unfolded_and_folded(module: torch.nn.Module, *args) -> tuple[torch.Tensor, torch.Tensor]:
    """``module(*args)`` as it is, then with ``fold_biases`` switched on."""
    with torch.no_grad():
        expected = module(*args)
        module.fold_biases = True
        return expected, module(*args)


def unet_unfolded_and_folded(unet, calls: CallCounter, *args) -> tuple[torch.Tensor, torch.Tensor]:
    """``unet(*args)`` as it is, then after ``fold_conv_biases()``; ``calls`` keeps only the
    folded forward's calls."""
    with torch.no_grad():
        expected = unet(*args)
        unet.fold_conv_biases()
        calls.arguments.clear()
        return expected, unet(*args)


def layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("in_channels", [16, 8], ids=["identity-shortcut", "conv-shortcut"])
@pytest.mark.parametrize("with_temb", [True, False], ids=["temb", "no-temb"])
def test_resnet_block(conv_calls, group_norms, channels_last, in_channels, with_temb):
    block = ResnetBlock2D(in_channels, 16, 12, groups=4, eps=1e-5).eval()
    randomize_biases(block)
    x = layout(torch.randn(2, in_channels, 6, 6), channels_last)
    temb = torch.randn(2, 12) if with_temb else None
    expected, folded = unfolded_and_folded(block, x, temb)
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5)
    assert folded.is_contiguous(memory_format=torch.channels_last) == channels_last
    # conv1's bias (and the time embedding) enter norm2 as its offset: conv1 once with its bias
    # (unfolded), once without; norm1, norm2 unfolded, then norm1 and norm2 with the offset
    assert conv_calls(block.conv1, with_bias=False) == 1
    offsets = group_norms.argument(6, "offset")
    assert [offset is None for offset in offsets] == [True, True, True, False]
    assert offsets[-1].shape == ((2, 16) if with_temb else (16,))
    if block.conv_shortcut is not None:  # conv2's bias joins the shortcut's GEMM (channels-last)
        assert conv_calls(block.conv_shortcut, with_bias=True) == (1 if channels_last else 2)
        assert conv_calls(block.conv2, with_bias=False) == (1 if channels_last else 0)
    else:  # conv2's bias joins the residual addition (channels-last): ops.bias_residual
        assert conv_calls(block.conv2, with_bias=False) == (1 if channels_last else 0)
        assert conv_calls(block.conv2, with_bias=True) == (1 if channels_last else 2)


def hook(layer):
    layer.register_forward_hook(lambda module, inputs, out: out * 2)


def replace_forward(layer):  # as LoRA patches attach themselves
    original = layer.forward
    layer.forward = lambda *args, **kwargs: original(*args, **kwargs) + 0.5


def circular_padding(layer):
    layer.padding_mode = "circular"
    layer._reversed_padding_repeated_twice = [1, 1, 1, 1]


@pytest.mark.parametrize("patch", [hook, replace_forward])
def test_a_patched_norm2_keeps_conv1_bias_out_of_it(patch):
    block = ResnetBlock2D(8, 16, 12, groups=4, eps=1e-5).eval()
    randomize_biases(block)
    x = layout(torch.randn(2, 8, 6, 6), True)
    patch(block.norm2)  # it must see conv1's output with the bias and time embedding added
    expected, folded = unfolded_and_folded(block, x, torch.randn(2, 12))
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("patch", [hook, replace_forward, circular_padding])
def test_patched_layers_are_called_as_they_are(patch):
    block = ResnetBlock2D(8, 16, 12, groups=4, eps=1e-5).eval()
    randomize_biases(block)
    x = layout(torch.randn(2, 8, 6, 6), True)
    temb = torch.randn(2, 12)
    patch(block.conv1)
    if patch is not circular_padding:  # a 1x1 shortcut, a GroupNorm have no padding
        patch(block.conv_shortcut)
    expected, folded = unfolded_and_folded(block, x, temb)
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5)


def test_a_global_forward_hook_keeps_every_layer_unfolded():
    block = ResnetBlock2D(8, 16, 12, groups=4, eps=1e-5).eval()
    randomize_biases(block)
    x = layout(torch.randn(2, 8, 6, 6), True)
    temb = torch.randn(2, 12)
    doubled = (torch.nn.Conv2d, torch.nn.Linear)
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, inputs, out: out * 2 if isinstance(module, doubled) else out
    )
    try:
        expected, folded = unfolded_and_folded(block, x, temb)
    finally:
        handle.remove()
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("linear_projection", [False, True], ids=["conv-proj", "linear-proj"])
def test_transformer_projections(conv_calls, channels_last, linear_projection):
    model = Transformer2DModel(2, 8, 16, 1, 12, 4, use_linear_projection=linear_projection).eval()
    randomize_biases(model)
    x = layout(torch.randn(2, 16, 4, 4), channels_last)
    context = torch.randn(2, 5, 12)
    expected, folded = unfolded_and_folded(model, x, context)
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5)
    assert folded.is_contiguous(memory_format=torch.channels_last) == channels_last
    # a 1x1 conv runs as a GEMM on the token rows only where they are a view (channels-last)
    if not linear_projection:
        convolutions = 1 if channels_last else 2  # the unfolded call, and the folded one
        assert conv_calls(model.proj_in, with_bias=True) == convolutions
        assert conv_calls(model.proj_out, with_bias=True) == convolutions


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_unet_output_and_state_dict_unchanged(channels_last):
    unet = tiny_pipeline().unet
    randomize_biases(unet)
    state = {name: value.clone() for name, value in unet.state_dict().items()}
    x = layout(torch.randn(2, 4, 8, 8), channels_last)
    t = torch.tensor([999, 10])
    context = torch.randn(2, 7, 32)
    kinds = ResnetBlock2D | Transformer2DModel | BasicTransformerBlock
    blocks = [m for m in unet.modules() if isinstance(m, kinds)]
    foldable = [block for block in blocks if block.has_bias_folds]
    with torch.no_grad():
        expected = unet(x, t, context)
        report = OptimizeReport("cpu")
        prepare_module(unet, "unet", report, None, channels_last, True, fold_biases=True)
        folded = unet(x, t, context)
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5)
    # every U-Net ResNet block has a time embedding; the tiny U-Net's projections are 1x1 convs;
    # every transformer block has residual additions
    assert len(foldable) == len(blocks)
    assert f"unet: bias and residual folding on ({len(blocks)} blocks with something to fold)" in (
        report.applied
    )
    assert all(block.fold_biases for block in blocks)
    assert unet.state_dict().keys() == state.keys()
    assert all(torch.equal(unet.state_dict()[name], value) for name, value in state.items())
    # preparing again without the option switches the blocks back
    prepare_module(unet, "unet", OptimizeReport("cpu"), None, channels_last, True)
    assert not any(block.fold_biases for block in blocks)


def test_optimize_folds_the_unet_only():
    from fastdiff.runtime import optimize

    pipe = tiny_pipeline()
    optimize(pipe, verbose=False)  # on by default
    assert all(b.fold_biases for b in pipe.unet.modules() if hasattr(b, "has_bias_folds"))
    assert not any(getattr(b, "fold_biases", False) for b in pipe.vae.modules())
    optimize(pipe, fold_biases=False, verbose=False)  # again without it: off
    assert not any(getattr(b, "fold_biases", False) for b in pipe.unet.modules())


# --- the time projections: one GEMM for every ResNet block of the U-Net -----------------------


def unet_inputs(channels_last: bool = False):
    x = layout(torch.randn(2, 4, 8, 8), channels_last)
    return x, torch.tensor([999, 10]), torch.randn(2, 7, 32)


@pytest.fixture
def linear_calls(monkeypatch):
    """The F.linear calls (nn.Linear calls F.linear too); ``.argument(1, "weight")``."""
    return CallCounter(monkeypatch, F, "linear")


def time_projection_calls(unet, linear_calls: CallCounter) -> tuple[int, int]:
    """(batched GEMMs over all blocks' projections, GEMMs with one block's projection)."""
    weights = linear_calls.argument(1, "weight")
    blocks = unet.time_blocks()
    rows = sum(block.time_emb_proj.out_features for block in blocks)
    own = {id(block.time_emb_proj.weight) for block in blocks}
    batched = sum(w.shape == (rows, blocks[0].time_emb_proj.in_features) for w in weights)
    return batched, sum(id(w) in own for w in weights)


@pytest.mark.parametrize("config", ["tiny_sd15_unet", "tiny_sdxl_unet"])
def test_time_projections_run_as_one_gemm(linear_calls, group_norms, config):
    unet = tiny_pipeline(config).unet
    randomize_biases(unet)
    x, t, context = unet_inputs()
    kwargs = {}
    if config == "tiny_sdxl_unet":
        dim = unet.config.projection_class_embeddings_input_dim
        extra = dim - 6 * unet.config.addition_time_embed_dim
        kwargs = {
            "added_cond_kwargs": {
                "text_embeds": torch.randn(2, extra),
                "time_ids": torch.randn(2, 6),
            }
        }
    with torch.no_grad():
        expected = unet(x, t, context, **kwargs)
        assert time_projection_calls(unet, linear_calls) == (0, len(unet.time_blocks()))
        linear_calls.arguments.clear()
        group_norms.arguments.clear()
        unet.fold_conv_biases()
        folded = unet(x, t, context, **kwargs)
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5)
    assert time_projection_calls(unet, linear_calls) == (1, 0)
    # each block's norm2 got its slice of the batched shifts: a (B, C) view of one tensor
    offsets = [offset for offset in group_norms.argument(6, "offset") if offset is not None]
    assert len(offsets) == len(unet.time_blocks())
    assert len({offset.untyped_storage().data_ptr() for offset in offsets}) == 1


def test_a_hooked_time_projection_keeps_every_block_on_its_own(linear_calls):
    unet = tiny_pipeline().unet
    randomize_biases(unet)
    hook(unet.time_blocks()[1].time_emb_proj)
    expected, folded = unet_unfolded_and_folded(unet, linear_calls, *unet_inputs())
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5)
    assert time_projection_calls(unet, linear_calls) == (0, len(unet.time_blocks()))


@pytest.mark.parametrize("trained", ["all", "time-projections-only"])
def test_gradients_reach_every_time_projection_when_folded(trained):
    unet = tiny_pipeline().unet
    if trained != "all":  # emb needs no gradient, the projections do
        unet.requires_grad_(False)
        for block in unet.time_blocks():
            block.time_emb_proj.requires_grad_(True)
            block.conv1.bias.requires_grad_(True)
    unet.fold_conv_biases()
    x, t, context = unet_inputs()
    unet(x, t, context).square().mean().backward()
    for block in unet.time_blocks():
        assert block.time_emb_proj.weight.grad is not None
        assert block.time_emb_proj.weight.grad.abs().sum() > 0
        assert block.conv1.bias.grad is not None


# --- the transformer blocks: residual additions done by the LayerNorms after them -------------


@pytest.fixture
def residual_norms(monkeypatch):
    """The ``fastdiff.ops.add_layer_norm`` calls."""
    return CallCounter(monkeypatch, ops, "add_layer_norm")


@pytest.mark.parametrize("patched", [None, "norm3", "ff", "ff.net.2"])
def test_transformer_block_residuals(residual_norms, linear_calls, patched):
    block = BasicTransformerBlock(16, 2, 8, 12).eval()
    randomize_biases(block)
    x, context = torch.randn(2, 10, 16), torch.randn(2, 5, 12)
    if patched is not None:  # it must be called as it is
        hook(block.get_submodule(patched))
    expected, folded = unfolded_and_folded(block, x, context)
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5)
    # the residuals go through add_layer_norm unless norm3 is patched
    assert residual_norms.calls == (0 if patched == "norm3" else 2)
    # the feed-forward's last GEMM accumulates into the sum (no F.linear of its own) when the
    # feed-forward and its projection are plain: once for the unfolded call, else twice
    projections = sum(w is block.ff.net[2].weight for w in linear_calls.argument(1, "weight"))
    assert projections == (1 if patched is None else 2)


def output_projection_biases(block, linear_calls: CallCounter) -> list[bool]:
    """For each F.linear call with attn1's or attn2's output projection: whether it had a bias."""
    calls = zip(linear_calls.argument(1, "weight"), linear_calls.argument(2, "bias"), strict=True)
    outputs = (block.attn1.to_out[0].weight, block.attn2.to_out[0].weight)
    return [b is not None for w, b in calls if any(w is o for o in outputs)]


@pytest.mark.parametrize("patched", [None, "attn1", "attn2.to_out.0", "attn1.to_out.1"], ids=str)
def test_attention_output_biases_join_the_norms_after_them(residual_norms, linear_calls, patched):
    """Folded, the attentions' output projections run without their bias and add_layer_norm adds
    it (x_bias) as it reads; a patched attention, projection or dropout keeps its own."""
    block = BasicTransformerBlock(16, 2, 8, 12).eval()
    randomize_biases(block)
    x, context = torch.randn(2, 10, 16), torch.randn(2, 5, 12)
    if patched is not None:
        hook(block.get_submodule(patched))
    with torch.no_grad():
        expected = block(x, context)
        linear_calls.arguments.clear()
        block.fold_biases = True
        folded = block(x, context)
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5)
    own_bias = {None: [], "attn1": [True], "attn2.to_out.0": [True], "attn1.to_out.1": [True]}
    assert sorted(output_projection_biases(block, linear_calls)) == sorted(
        own_bias[patched] + [False] * (2 - len(own_bias[patched]))
    )
    x_biases = [b is not None for b in residual_norms.argument(6, "x_bias")]
    assert x_biases.count(True) == 2 - len(own_bias[patched])


class Replaced(torch.nn.Module):
    """Another module in an attention's place (wrapping it, as some adapters do)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x, context=None):
        return self.inner(x, context) * 1.5


@pytest.mark.parametrize("name", ["attn1", "attn2"])
def test_a_replaced_attention_is_called_as_it_is(name):
    block = BasicTransformerBlock(16, 2, 8, 12).eval()
    randomize_biases(block)
    setattr(block, name, Replaced(getattr(block, name)))
    x, context = torch.randn(2, 10, 16), torch.randn(2, 5, 12)
    expected, folded = unfolded_and_folded(block, x, context)
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("trained", ["all", "norm3-only"])
def test_transformer_block_with_gradients_keeps_the_sum_for_backward(linear_calls, trained):
    block = BasicTransformerBlock(16, 2, 8, 12)
    block.fold_biases = True
    if trained == "norm3-only":  # the feed-forward frozen, norm3 (which saves the sum) trained
        block.requires_grad_(False)
        block.norm3.requires_grad_(True)
    x, context = torch.randn(2, 10, 16), torch.randn(2, 5, 12)
    block(x, context).square().sum().backward()  # an in-place accumulate would break this
    assert block.norm3.weight.grad is not None
    if trained == "all":  # the output biases, added by add_layer_norm's eager path, get theirs
        for attention in (block.attn1, block.attn2):
            assert attention.to_out[0].bias.grad.abs().sum() > 0
    assert sum(w is block.ff.net[2].weight for w in linear_calls.argument(1, "weight")) == 1


def test_packed_rows_views_only_tensors_laid_out_one_after_another():
    """packed_rows is the batched time projections' view of the blocks' parameters: it must
    refuse tensors that share one storage but not in order (a view over them would read the
    wrong block's rows), gaps, other dtypes and other row shapes."""
    from fastdiff.models.packing import packed_rows

    storage = torch.arange(24.0)
    a, b, c = storage[0:8].view(2, 4), storage[8:16].view(2, 4), storage[16:24].view(2, 4)
    packed = packed_rows([a, b, c])
    assert packed is not None and torch.equal(packed, storage.view(6, 4))
    assert packed_rows([b, a, c]) is None  # same storage, out of order
    assert packed_rows([a, c]) is None  # a gap
    assert packed_rows([a, torch.zeros(2, 4)]) is None  # another storage
    assert packed_rows([a, storage[8:14].view(2, 3)]) is None  # another row shape
    assert packed_rows([storage[0:8].view(4, 2).t()]) is None  # not contiguous


def test_plain_layer_reads_the_same_under_torch_compile():
    """torch.compile traces plain_layer as Python runs it: a plain layer stays plain and a hooked
    one patched (a check on ``__qualname__`` strings read every layer as patched when traced,
    so no fold applied inside compiled blocks)."""
    from fastdiff.models.resnet import plain_layer

    conv, hooked, linear = torch.nn.Conv2d(4, 4, 3), torch.nn.Conv2d(4, 4, 3), torch.nn.Linear(2, 2)
    hook(hooked)

    def flags(x):
        return torch.stack([x * float(plain_layer(layer)) for layer in (conv, hooked, linear)]).sum(
            -1
        )

    x = torch.ones(3)
    compiled = torch.compile(flags, backend="eager", fullgraph=True)
    assert flags(x).tolist() == [3.0, 0.0, 3.0]
    assert compiled(x).tolist() == [3.0, 0.0, 3.0]
