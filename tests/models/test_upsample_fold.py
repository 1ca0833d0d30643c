"""ModelBase.fold_upsampling: the upsamplers' nearest-neighbour doubling and 3x3 convolution as
one convolution over the small map, checked against the two steps (float64 for the arithmetic,
the tolerance rule at half precision), and the bookkeeping that keeps its summed weights in
step with the convolution's own."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from fastdiff.models.resnet import Upsample2D
from fastdiff.models.upsample_fold import (
    AUTO,
    MODES,
    FoldedWeight,
    derive,
    interleave_phases,
    phase_weight,
    transposed_weight,
    upsample_conv,
)
from fastdiff.ops import autoselect
from fastdiff.runtime import OptimizeReport, prepare_module
from tests.ops.helpers import CallCounter, assert_within_tolerance
from tests.runtime.conftest import tiny_pipeline

LAYOUTS = [
    pytest.param(torch.contiguous_format, id="nchw"),
    pytest.param(torch.channels_last, id="nhwc"),
]


def two_steps(x, weight, bias):
    """What Upsample2D computes unfolded."""
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)


def upsampler(channels: int, dtype=torch.float32, layout=torch.contiguous_format) -> Upsample2D:
    module = Upsample2D(channels).to(dtype).to(memory_format=layout).requires_grad_(False)
    with torch.no_grad():
        module.conv.bias.normal_()  # large enough that a dropped or doubled bias shows
    return module


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "shape",
    [(2, 6, 5, 7), (1, 3, 1, 1), (3, 4, 1, 6), (1, 8, 9, 2)],
    ids=["odd-rectangle", "one-pixel", "one-row", "tall"],
)
def test_folded_convolution_is_the_two_steps(mode, layout, shape):
    """Exact arithmetic (float64): the folded weights add up the right taps, every border
    included (the zero padding of the upsampled map falls on the small map's)."""
    batch, channels, height, width = shape
    x = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=layout)
    weight = torch.randn(channels + 1, channels, 3, 3, dtype=torch.float64)
    bias = torch.randn(channels + 1, dtype=torch.float64)
    out = upsample_conv(x, derive(weight, mode), bias, mode)
    want = two_steps(x, weight, bias)
    assert out.shape == (batch, channels + 1, 2 * height, 2 * width)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    without_bias = upsample_conv(x, derive(weight, mode), None, mode)
    torch.testing.assert_close(without_bias, two_steps(x, weight, None), rtol=1e-12, atol=1e-12)
    # The next layers get the layout the two steps give them (channels-last for channels-last
    # input; a 1x1 map is both layouts, and PyTorch takes it as NCHW).
    assert out.stride() == want.stride()


def test_folded_weights_add_up_the_taps_each_output_pixel_sees():
    """The summed weights themselves: one 3x3 weight with distinct powers of two per tap, so
    every sum names the taps in it."""
    weight = (2.0 ** torch.arange(9, dtype=torch.float64)).view(1, 1, 3, 3)
    tap = {(r, c): 2.0 ** (3 * r + c) for r in range(3) for c in range(3)}

    def total(rows, cols):
        return sum(tap[r, c] for r in rows for c in cols)

    transposed_rows = [(2,), (1, 2), (0, 1), (0,)]  # kernel rows top to bottom
    want = [[total(rows, cols) for cols in transposed_rows] for rows in transposed_rows]
    assert transposed_weight(weight)[0, 0].tolist() == want
    phase_rows = [[(0,), (1, 2)], [(0, 1), (2,)]]  # even output rows, odd ones
    phases = phase_weight(weight)
    for a in (0, 1):
        for b in (0, 1):
            want = [[total(rows, cols) for cols in phase_rows[b]] for rows in phase_rows[a]]
            assert phases[2 * a + b, 0].tolist() == want


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_half_precision_within_the_tolerance_rule(mode, dtype, layout):
    """The summed weights are rounded once to the weight's dtype: within the rule against the
    float32 reference, with the two steps in the same dtype as the eager error."""
    x = torch.randn(2, 48, 6, 5).to(dtype).contiguous(memory_format=layout)
    weight = (torch.randn(32, 48, 3, 3) / (9 * 48) ** 0.5).to(dtype)
    bias = torch.randn(32).to(dtype)
    reference = two_steps(x.float(), weight.float(), bias.float())
    out = upsample_conv(x, derive(weight, mode), bias, mode)
    assert_within_tolerance(out, reference, two_steps(x, weight, bias), f"{mode} {dtype}")


def test_interleave_puts_each_phase_at_its_parity():
    """Phase 2a + b's value at (i + a, j + b) lands on output pixel (2i + a, 2j + b)."""
    batch, channels, height, width = 1, 2, 3, 4
    z = torch.zeros(batch, 4 * channels, height + 1, width + 1)
    for phase in range(4):
        a, b = divmod(phase, 2)
        for c in range(channels):
            rows = torch.arange(height + 1).view(-1, 1) - a
            cols = torch.arange(width + 1).view(1, -1) - b
            z[0, phase * channels + c] = 1000 * phase + 100 * c + 10 * rows + cols
    out = interleave_phases(z, None)
    for y in range(2 * height):
        for x in range(2 * width):
            for c in range(channels):
                phase = 2 * (y % 2) + x % 2
                assert out[0, c, y, x] == 1000 * phase + 100 * c + 10 * (y // 2) + x // 2


def module_output(module, x, **kwargs):
    with torch.no_grad():
        return module(x, **kwargs)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_upsample2d_folded_runs_one_convolution(mode, layout, monkeypatch):
    module = upsampler(8, layout=layout)
    x = torch.randn(2, 8, 5, 6).contiguous(memory_format=layout)
    expected = module_output(module, x)
    module.set_fold(mode)
    interpolate = CallCounter(monkeypatch, F, "interpolate")
    out = module_output(module, x)
    assert interpolate.calls == 0
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert list(module.folds) == [mode] and module.folds[mode].tensor is not None
    module.set_fold(None)
    assert module.folds == {}  # the summed weights' memory is let go
    torch.testing.assert_close(module_output(module, x), expected, rtol=0, atol=0)
    assert interpolate.calls == 1


def test_output_size_other_than_double_keeps_the_two_steps(monkeypatch):
    """diffusers passes ``size`` where a skip connection's map is odd: not a doubling, so the
    nearest-neighbour resize runs as before."""
    module = upsampler(4)
    module.set_fold("transposed")
    transposed = CallCounter(monkeypatch, F, "conv_transpose2d")
    x = torch.randn(1, 4, 3, 3)
    out = module_output(module, x, size=(5, 7))
    assert out.shape == (1, 4, 5, 7) and transposed.calls == 0
    module.set_fold(None)
    torch.testing.assert_close(out, module_output(module, x, size=(5, 7)), rtol=0, atol=0)
    module.set_fold("transposed")
    module_output(module, x, size=(6, 6))  # a doubling given as a size
    assert transposed.calls == 1


@pytest.mark.parametrize(
    "change",
    ["instance-forward", "forward-hook", "grad-wanted", "stride", "inference-weight", "compiling"],
)
def test_fold_stands_aside_where_it_could_change_the_result(change, monkeypatch):
    """A patched conv (LoRA wrappers patch forward), a hook, a weight whose gradient is wanted,
    another geometry, a weight whose changes cannot be tracked, or torch.compile tracing the
    module (which compiles it as written): the two steps run."""
    module = upsampler(4)
    module.set_fold("transposed")
    x = torch.randn(1, 4, 3, 3)
    grad = False
    if change == "instance-forward":
        plain = module.conv.forward
        module.conv.forward = lambda t: plain(t) + 1
    elif change == "forward-hook":
        module.conv.register_forward_hook(lambda mod, args, out: out * 2)
    elif change == "grad-wanted":
        module.conv.weight.requires_grad_(True)
        grad = True
    elif change == "stride":
        module.conv.padding = (2, 2)
    elif change == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    else:  # a model built under inference_mode: its weights track no changes
        with torch.inference_mode():
            module = upsampler(4)
        module.set_fold("transposed")
    transposed = CallCounter(monkeypatch, F, "conv_transpose2d")
    with torch.set_grad_enabled(grad):
        out = module(x)
    assert transposed.calls == 0
    module.set_fold(None)
    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(out, module(x), rtol=0, atol=0)


def test_gradients_flow_through_the_two_steps_when_wanted():
    module = upsampler(4)
    module.conv.weight.requires_grad_(True)
    module.set_fold("phases")
    module(torch.randn(1, 4, 3, 3)).sum().backward()
    assert module.conv.weight.grad is not None and module.conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradients_reach_the_input_through_a_folded_upsampler(mode, layout):
    """Frozen weights, an input that wants its gradient (guidance by gradients, say): the fold
    applies, and the input's gradient is the two steps'."""
    module = upsampler(4, layout=layout)
    x = torch.randn(2, 4, 3, 5).contiguous(memory_format=layout).requires_grad_(True)
    upstream = torch.randn(2, 4, 6, 10)
    (module(x) * upstream).sum().backward()
    want = x.grad.clone()
    x.grad = None
    module.set_fold(mode)
    out = module(x)
    assert out.stride() == two_steps(x, module.conv.weight, module.conv.bias).stride()
    (out * upstream).sum().backward()
    torch.testing.assert_close(x.grad, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_an_in_place_change_of_the_weight_is_folded_again_into_the_same_memory(mode):
    """A LoRA fused into the conv changes its weight in place: the next call derives the
    summed weights again, into the memory a captured graph reads."""
    module = upsampler(4)
    module.set_fold(mode)
    x = torch.randn(1, 4, 3, 3)
    module_output(module, x)
    memory = module.folds[mode].tensor.data_ptr()
    with torch.no_grad():
        module.conv.weight.mul_(-0.5)
    out = module_output(module, x)
    assert module.folds[mode].tensor.data_ptr() == memory
    torch.testing.assert_close(out, two_steps(x, module.conv.weight, module.conv.bias))
    # A new weight tensor of another dtype: derived anew, in that dtype.
    module.half()
    assert module_output(module, x.half()).dtype == torch.float16
    assert module.folds[mode].tensor.dtype == torch.float16


def test_a_fold_derived_under_inference_mode_can_be_derived_again_outside_it():
    """A call under torch.inference_mode derives the summed weights as a normal tensor: a later
    change of the weight, outside inference mode, derives them again in place."""
    module = upsampler(4)
    module.set_fold("phases")
    x = torch.randn(1, 4, 3, 3)
    with torch.inference_mode():
        module(x)
    assert not module.folds["phases"].tensor.is_inference()
    with torch.no_grad():
        module.conv.weight.mul_(3.0)
        out = module(x)
    torch.testing.assert_close(out, two_steps(x, module.conv.weight, module.conv.bias))


def test_folded_weight_tracks_identity_and_version():
    weight = torch.randn(4, 4, 3, 3)
    folded = FoldedWeight("transposed")
    first = folded.get(weight)
    assert folded.get(weight) is first  # unchanged: not derived again
    with torch.inference_mode():
        untracked = torch.randn(4, 4, 3, 3)
    assert folded.source_key(untracked) is None
    assert folded.source_key(torch.nn.Parameter(untracked, requires_grad=False)) is None
    key = folded.key
    weight.add_(1)
    assert folded.source_key(weight) != key
    torch.testing.assert_close(folded.get(weight), transposed_weight(weight), rtol=0, atol=0)
    with pytest.raises(
        ValueError, match=r"upsample_fold must be one of \[None, 'auto', 'transposed'"
    ):
        FoldedWeight("bilinear")


def test_refresh_derives_changed_weights_again_in_place():
    """What the runtime calls before replaying graphs, which run no Python of their own."""
    pipe = tiny_pipeline()
    count = pipe.unet.fold_upsampling("phases")
    assert count == len(pipe.unet.folded_upsamplers) > 0
    first = pipe.unet.folded_upsamplers[0]
    memory = first.folds["phases"].tensor.data_ptr()  # derived when the fold was switched on
    assert pipe.unet.refresh_folded_weights() == 0
    with torch.no_grad():
        first.conv.weight.add_(0.25)
    assert pipe.unet.refresh_folded_weights() == 1
    assert first.folds["phases"].tensor.data_ptr() == memory
    torch.testing.assert_close(first.folds["phases"].tensor, phase_weight(first.conv.weight))
    assert pipe.unet.folded_weight_bytes() == sum(
        m.folds["phases"].tensor.numel() * 4 for m in pipe.unet.folded_upsamplers
    )
    assert pipe.unet.fold_upsampling(None) == count
    assert pipe.unet.folded_upsamplers == [] and pipe.unet.refresh_folded_weights() == 0
    with pytest.raises(ValueError, match="upsample_fold must be one of"):
        pipe.unet.fold_upsampling("nearest")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["refresh", "fold-again"])
def test_an_edit_through_data_is_folded_again_when_asked(mode, how):
    """``weight.data.copy_(...)`` writes without the version counter (``.data`` has its own),
    so nothing can see it: the model kept running the old summed weights, even after
    fold_upsampling (which optimize() runs) was called again. ``refresh_folded_weights(force=
    True)`` and switching the fold on again derive them anew, into the same memory."""
    pipe = tiny_pipeline()
    pipe.unet.fold_upsampling(mode)
    first = pipe.unet.folded_upsamplers[0]
    memory = first.folds[mode].tensor.data_ptr()
    first.conv.weight.data.copy_(torch.randn_like(first.conv.weight))
    assert pipe.unet.refresh_folded_weights() == 0  # unseen, as documented
    if how == "refresh":
        assert pipe.unet.refresh_folded_weights(force=True) == len(pipe.unet.folded_upsamplers)
    else:
        pipe.unet.fold_upsampling(mode)
    assert first.folds[mode].tensor.data_ptr() == memory
    torch.testing.assert_close(first.folds[mode].tensor, derive(first.conv.weight, mode))
    x = torch.randn(1, first.conv.in_channels, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(
            first(x), two_steps(x, first.conv.weight, first.conv.bias), rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize("mode", MODES)
def test_unet_and_vae_outputs_and_state_dicts_unchanged(mode):
    pipe = tiny_pipeline()
    unet, vae = pipe.unet, pipe.vae
    torch.manual_seed(0)
    sample = torch.randn(2, unet.config.in_channels, 16, 16)
    context = torch.randn(2, 77, unet.config.cross_attention_dim)
    latents = torch.randn(1, vae.config.latent_channels, 8, 8)
    with torch.no_grad():
        unet_before, vae_before = unet(sample, 10, context), vae.decode(latents)
        states = unet.state_dict(), vae.state_dict()
        assert unet.fold_upsampling(mode) > 0 and vae.fold_upsampling(mode) > 0
        unet_after, vae_after = unet(sample, 10, context), vae.decode(latents)
    torch.testing.assert_close(unet_after, unet_before, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(vae_after, vae_before, rtol=1e-4, atol=1e-5)
    for before, after in zip(states, (unet.state_dict(), vae.state_dict()), strict=True):
        assert before.keys() == after.keys()


def test_prepare_module_reports_the_fold_and_switches_it_back_off():
    pipe = tiny_pipeline()
    report = OptimizeReport("cpu")
    prepare_module(pipe.vae, "vae", report, None, False, False, False, "transposed")
    applied = [line for line in report.applied if "upsamplers" in line]
    assert len(applied) == 1 and "vae: " in applied[0] and "transposed convolution" in applied[0]
    assert all(m.fold == "transposed" for m in pipe.vae.folded_upsamplers)
    prepare_module(pipe.vae, "vae", OptimizeReport("cpu"), None, False, False, False, None)
    assert pipe.vae.folded_upsamplers == []
    # The default is "auto", reported with how many upsampler shapes the table has measured.
    report = OptimizeReport("cpu")
    prepare_module(pipe.vae, "vae", report, None, False, False)
    assert {m.fold for m in pipe.vae.folded_upsamplers} == {"auto"}
    (applied,) = [line for line in report.applied if "upsamplers" in line]
    assert "upsample_fold='auto'" in applied and "upsampler shapes in the table" in applied


def test_optimize_refuses_an_unknown_fold_before_changing_anything():
    pipe = tiny_pipeline()
    with pytest.raises(
        ValueError, match=r"upsample_fold must be one of \[None, 'auto', 'transposed'"
    ):
        pipe.optimize(upsample_fold="bilinear", verbose=False)
    assert getattr(pipe, "runtime", None) is None


@pytest.mark.parametrize("mode", [*MODES, AUTO])
def test_replayed_graphs_see_a_weight_changed_after_capture(mode, upsample_table):
    """Under the graph-faithful recording backend (replays run no Python): a generation, then
    an in-place change of every upsampler's weight (as fusing a LoRA makes), then the same
    generation again. The replays must use the new weights, which takes the runtime's refresh
    of the folded ones before each stage; the results equal the eager pipeline's. Under "auto"
    the table has each upsampler's shape measured fastest folded, the two ways in turn, so the
    summed weights are derived in the warm-up runs ahead of the captures."""
    from tests.runtime.fake_graph import RecordingGraphBackend

    pipe = tiny_pipeline()
    kwargs = dict(
        prompt_embeds=torch.randn(1, 7, 32),
        negative_prompt_embeds=torch.randn(1, 7, 32),
        num_inference_steps=3,
        output_type="tensor",
        progress=False,
    )
    keys = set()
    hooks = [
        module.register_forward_pre_hook(
            lambda mod, args: keys.add(autoselect.upsample_key(args[0]))
        )
        for model in (pipe.unet, pipe.vae)
        for module in model.modules()
        if isinstance(module, Upsample2D)
    ]
    want = pipe(seed=5, **kwargs)
    for hook in hooks:
        hook.remove()
    ways = [MODES[index % 2] for index in range(len(keys))]
    upsample_table(
        {key: {"eager": 2.0, way: 1.0} for key, way in zip(sorted(keys), ways, strict=True)}
    )
    runtime = pipe.optimize(backend=RecordingGraphBackend(), upsample_fold=mode, verbose=False)
    if mode == AUTO:
        assert any(
            f"{len(keys)} upsampler shapes in the table" in line for line in runtime.report.applied
        )
    else:
        assert any(f"upsamplers as one {mode}" in line for line in runtime.report.applied)
    torch.testing.assert_close(pipe(seed=5, **kwargs), want, rtol=1e-4, atol=1e-4)
    upsamplers = pipe.unet.folded_upsamplers + pipe.vae.folded_upsamplers
    assert len(upsamplers) >= 2
    derived = {
        way
        for module in upsamplers
        for way, folded in module.folds.items()
        if folded.tensor is not None
    }
    assert derived == ({mode} if mode != AUTO else set(ways))
    with torch.no_grad():
        for module in upsamplers:
            module.conv.weight.mul_(-2.0)
    captures = runtime.cache.stats.captures
    got = pipe(seed=5, **kwargs)
    assert runtime.cache.stats.captures == captures  # replays, not new captures
    runtime.attached = False
    for name in ("denoise", "decode_latents", "encode_moments"):
        pipe.__dict__.pop(name, None)  # the pipeline's own eager stages again
    pipe.unet.fold_upsampling(None)
    pipe.vae.fold_upsampling(None)
    want_changed = pipe(seed=5, **kwargs)
    assert not torch.allclose(want_changed, want, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(got, want_changed, rtol=1e-4, atol=1e-4)


@pytest.fixture
def upsample_table(tmp_path, monkeypatch):
    """Point the auto backend at a table of upsampler rows, {key: {way: ms}} (ways: eager =
    the two steps, transposed, phases); the packaged table again afterwards."""

    def write(timings: dict[str, dict[str, float]]) -> None:
        entries = [{"op": "upsample", "key": key, "ms": ms} for key, ms in timings.items()]
        path = tmp_path / "table.json"
        path.write_text(json.dumps({"device": "test", "entries": entries}))
        monkeypatch.setenv("FASTDIFF_BACKEND_TABLE", str(path))
        autoselect.reload()

    yield write
    monkeypatch.delenv("FASTDIFF_BACKEND_TABLE", raising=False)
    autoselect.reload()


def test_auto_runs_the_way_measured_fastest_at_each_shape(upsample_table, monkeypatch):
    """Under "auto" each call runs what the table measured fastest at its input's shape, dtype
    and layout; the two steps where the table says so and where nothing was measured near it
    (more than 4x the elements away, or another layout). Every way gives the two steps'
    result, and only the ways used hold summed weights."""
    upsample_table(
        {
            "1x8x4x4|fp32|nchw": {"eager": 3.0, "transposed": 1.0, "phases": 2.0},
            "1x8x16x16|fp32|nchw": {"eager": 3.0, "transposed": 2.0, "phases": 1.0},
            "1x8x64x64|fp32|nchw": {"eager": 1.0, "transposed": 2.0, "phases": 3.0},
        }
    )
    module = upsampler(8)
    module.set_fold(AUTO)
    transposed = CallCounter(monkeypatch, F, "conv_transpose2d")
    interpolate = CallCounter(monkeypatch, F, "interpolate")
    cases = [
        ((1, 8, 4, 4), torch.contiguous_format, "transposed"),
        ((1, 8, 4, 5), torch.contiguous_format, "transposed"),  # nearest measured shape
        ((1, 8, 16, 16), torch.contiguous_format, "phases"),
        ((1, 8, 64, 64), torch.contiguous_format, None),  # the two steps measured fastest
        ((1, 8, 256, 256), torch.contiguous_format, None),  # nothing measured near it
        ((1, 8, 4, 4), torch.channels_last, None),  # measured in another layout only
    ]
    for shape, layout, want in cases:
        x = torch.randn(shape).contiguous(memory_format=layout)
        assert module.fold_mode(x) == want, shape
        counts = (transposed.calls, interpolate.calls)
        out = module_output(module, x)
        ran = {
            (1, 0): "transposed",
            (0, 0): "phases",  # the 2x2 convolution: neither call
            (0, 1): None,
        }[(transposed.calls - counts[0], interpolate.calls - counts[1])]
        assert ran == want, shape
        want_out = two_steps(x, module.conv.weight, module.conv.bias)
        torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    assert sorted(module.folds) == ["phases", "transposed"]
    module.set_fold("phases")  # a fixed mode keeps its own summed weights only
    assert list(module.folds) == ["phases"]


def test_auto_with_the_packaged_table_runs_the_two_steps_everywhere(monkeypatch):
    """Until the table holds upsampler rows (bench_upsample's), "auto" (optimize()'s default)
    computes exactly what the checkpoint's two steps do and derives nothing."""
    monkeypatch.delenv("FASTDIFF_BACKEND_TABLE", raising=False)
    autoselect.reload()
    assert not any(key.startswith("upsample|") for key in autoselect.load_table())
    pipe = tiny_pipeline()
    torch.manual_seed(0)
    sample = torch.randn(2, pipe.unet.config.in_channels, 16, 16)
    context = torch.randn(2, 77, pipe.unet.config.cross_attention_dim)
    with torch.no_grad():
        want = pipe.unet(sample, 10, context)
        assert pipe.unet.fold_upsampling(AUTO) > 0
        got = pipe.unet(sample, 10, context)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert pipe.unet.folded_weight_bytes() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "shape", [(2, 1280, 8, 8), (2, 640, 32, 32), (1, 256, 64, 64)], ids=["unet8", "unet32", "vae"]
)
def test_cuda_fp16_channels_last_within_the_tolerance_rule(mode, shape):
    """cuDNN's kernels at model shapes (fp16, channels-last, as optimize() runs them), against
    the float32 two steps, the fp16 two steps giving the eager error."""
    batch, channels, height, width = shape
    x = torch.randn(shape, device="cuda").half().contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(channels, channels, 3, 3, device="cuda") / (9 * channels) ** 0.5).half()
    weight = weight.contiguous(memory_format=torch.channels_last)
    bias = torch.randn(channels, device="cuda").half()
    reference = two_steps(x.float(), weight.float(), bias.float())
    out = upsample_conv(x, derive(weight, mode), bias, mode)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_within_tolerance(out, reference, two_steps(x, weight, bias), f"{mode} {shape}")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_cuda_graph_replays_the_refreshed_weights(mode):
    """A real CUDA graph of a folded upsampler: a weight changed in place after the capture
    and refreshed (as the runtime does before a replay) is what the replay computes with."""
    module = upsampler(64, torch.float16, torch.channels_last).cuda()
    module.set_fold(mode)
    x = torch.randn(2, 64, 16, 16, device="cuda").half()
    x = x.contiguous(memory_format=torch.channels_last)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(stream):
        module(x)  # derives the folded weight, outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_out = module(x)
    with torch.no_grad():
        module.conv.weight.mul_(-1.5)
        module.folds[mode].get(module.conv.weight)  # what refresh_folded_weights does per module
    graph.replay()
    with torch.no_grad():
        want = two_steps(x.float(), module.conv.weight.float(), module.conv.bias.float())
    assert_within_tolerance(
        static_out, want, two_steps(x, module.conv.weight, module.conv.bias), mode
    )
