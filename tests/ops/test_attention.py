"""Flash-attention Triton kernel against the fp32 reference (tolerance rule in helpers.py)."""

from __future__ import annotations

import math

import fastdiff.kernels.attention as attention_kernels
import pytest
import torch
import triton
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdiff.ops import attention, attention_reference, use_backend
from fastdiff.ops.attention import attention_eager, attention_triton
from tests.ops.helpers import (
    DEVICE,
    CallCounter,
    assert_within_tolerance,
    kernel_dtypes,
    record_attention_launches,
)

# A split head dim that silently fell back to padding would hide a compile failure: fail instead.
pytestmark = pytest.mark.filterwarnings("error:.*split head dim failed:RuntimeWarning")

# (batch, heads, queries, keys, head_dim); the interpreter runs 16x16 blocks, so these lengths
# cover several blocks, a partial tail block, and keys fewer than one block.
EDGE_CASES = [
    pytest.param((1, 2, 32, 32, 40), id="self-d40-even"),
    pytest.param((1, 1, 33, 77, 40), id="cross-77-keys-d40"),
    pytest.param((2, 1, 20, 19, 64), id="not-block-multiple-d64"),
    pytest.param((1, 1, 17, 24, 80), id="d80"),
    pytest.param((1, 1, 9, 21, 160), id="d160"),
    pytest.param((1, 1, 16, 5, 256), id="d256-few-keys"),
    pytest.param((1, 3, 7, 3, 8), id="tiny-d8"),
]


def make_qkv(batch, heads, queries, keys, head_dim, dtype):
    q = torch.randn(batch, heads, queries, head_dim, device=DEVICE).to(dtype)
    k = torch.randn(batch, heads, keys, head_dim, device=DEVICE).to(dtype)
    v = torch.randn(batch, heads, keys, head_dim, device=DEVICE).to(dtype)
    return q, k, v


def check(q, k, v, scale=None, what=""):
    out = attention(q, k, v, scale)
    assert_within_tolerance(
        out, attention_reference(q, k, v, scale), attention_eager(q, k, v, scale), what
    )
    return out


@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("dims", EDGE_CASES)
def test_edge_shapes(triton_backend, monkeypatch, dims, dtype):
    counter = CallCounter(monkeypatch, attention_kernels, "attention_forward")
    check(*make_qkv(*dims, dtype), what=str(dims))
    assert counter.calls == 1


def test_output_is_heads_last_view(triton_backend):
    out = check(*make_qkv(1, 2, 18, 18, 40, torch.float32))
    # (B, H, N, D) view of (B, N, H, D) memory: merging heads afterwards needs no copy.
    assert out.transpose(1, 2).is_contiguous()


def test_explicit_scale(triton_backend):
    check(*make_qkv(1, 2, 18, 30, 64, torch.float32), scale=0.3)


def test_large_scores_stay_finite(triton_backend):
    q, k, v = make_qkv(1, 1, 20, 40, 64, torch.float32)
    check(q * 5, k * 5, v, what="scores of std ~25: peaked softmax, running max matters")


def test_keys_scoring_minus_infinity_in_a_whole_key_block(triton_backend, monkeypatch):
    """Every score of the first key blocks is -inf (keys holding -inf): the running max stays
    -inf there, and exp2(-inf - -inf) made every output NaN; the softmax over the other keys is
    finite."""
    q, k, v = make_qkv(1, 2, 5, 150, 16, torch.float32)
    q = q.abs() + 0.5
    k[:, :, :130, 0] = float("-inf")  # beyond the first block of every config (<= 128 keys)
    counter = CallCounter(monkeypatch, attention_kernels, "attention_forward")
    out = attention(q, k, v)
    want = attention_reference(q, k, v)
    assert bool(torch.isfinite(want).all()) and counter.calls == 1
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", kernel_dtypes())
def test_strided_views_of_fused_qkv(triton_backend, monkeypatch, dtype):
    counter = CallCounter(monkeypatch, attention_kernels, "attention_forward")
    batch, tokens, heads, head_dim = 2, 21, 2, 40
    qkv = torch.randn(batch, tokens, 3, heads, head_dim, device=DEVICE).to(dtype)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    check(q, k, v, what="fused QKV views")
    # Cross-attention: K and V from one fused projection of a 77-token context.
    kv = torch.randn(batch, 77, 2, heads, head_dim, device=DEVICE).to(dtype)
    check(q, kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2), what="fused KV views")
    assert counter.calls == 2


@settings(max_examples=6, deadline=None)
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 2),
    queries=st.integers(1, 40),
    keys=st.integers(1, 40),
    head_dim=st.sampled_from([8, 16, 24, 40, 64, 72]),
)
def test_random_shapes_property(batch, heads, queries, keys, head_dim):
    with use_backend("triton"):
        check(*make_qkv(batch, heads, queries, keys, head_dim, torch.float32))


test_random_shapes_property = pytest.mark.usefixtures("triton_backend")(test_random_shapes_property)


def with_changed(change):
    return change(*make_qkv(1, 1, 4, 4, 16, torch.float32))


@pytest.mark.parametrize(
    ("case", "make"),
    [
        ("head-dim-288", lambda: make_qkv(1, 1, 4, 4, 288, torch.float32)),
        ("float64", lambda: make_qkv(1, 1, 4, 4, 16, torch.float64)),
        ("mixed-dtypes", lambda: with_changed(lambda q, k, v: (q, k.half(), v))),
        ("value-dim-differs", lambda: with_changed(lambda q, k, v: (q, k, v[..., :8]))),
    ],
)
def test_unsupported_inputs_fall_back_to_eager(triton_backend, monkeypatch, case, make):
    counter = CallCounter(monkeypatch, attention_kernels, "attention_forward")
    q, k, v = make()
    if q.dtype != k.dtype:
        with pytest.raises(RuntimeError):  # PyTorch's own error for mixed dtypes
            attention(q, k, v)
    else:
        torch.testing.assert_close(attention(q, k, v), attention_eager(q, k, v))
    assert counter.calls == 0


def test_negative_scale_falls_back_to_eager(triton_backend, monkeypatch):
    counter = CallCounter(monkeypatch, attention_kernels, "attention_forward")
    q, k, v = make_qkv(1, 1, 6, 6, 16, torch.float32)
    torch.testing.assert_close(attention(q, k, v, -0.5), attention_reference(q, k, v, -0.5))
    assert counter.calls == 0


def test_zero_head_dim_runs_eagerly(triton_backend):
    # The default scale D^-1/2 used to raise ZeroDivisionError on the triton path.
    q = torch.zeros(1, 2, 3, 0)
    assert attention(q, q, q).shape == (1, 2, 3, 0)


def test_bad_shapes_raise():
    q, k, v = make_qkv(1, 2, 4, 4, 16, torch.float32)
    # SDPA returned finite numbers for a NaN scale, different from the reference's NaN.
    with pytest.raises(ValueError, match="scale must be a finite number or None, got nan"):
        attention(q, k, v, float("nan"))
    with pytest.raises(ValueError, match="expects tensors q, k, v"):
        attention(q.tolist(), k, v)
    with pytest.raises(ValueError, match="head dims differ"):
        attention(q, k[..., :8], v)
    with pytest.raises(ValueError, match=r"\(B, H, N, D\)"):
        attention(q[0], k, v)


def test_fake_kernel_matches_real_output(triton_backend):
    q, k, v = make_qkv(1, 2, 18, 7, 40, torch.float32)
    torch.library.opcheck(
        attention_triton, (q, k, v, 0.25), test_utils=("test_schema", "test_faketensor")
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "dims",
    [
        (2, 8, 4096, 4096, 40),
        (2, 8, 4096, 77, 40),
        (2, 8, 1024, 1024, 80),
        (2, 8, 256, 77, 160),
        (2, 10, 4096, 4096, 64),
        (2, 20, 1024, 77, 64),
        (1, 4, 300, 333, 96),
    ],
    ids=lambda dims: "-".join(map(str, dims)),
)
def test_sd_shapes_on_gpu(monkeypatch, dims, dtype):
    counter = CallCounter(monkeypatch, attention_kernels, "attention_forward")
    with use_backend("triton"):
        check(*make_qkv(*dims, dtype), what=str(dims))
    assert counter.calls == 1  # the kernel ran, not a silent eager fallback


@pytest.mark.gpu
def test_fp32_on_gpu_uses_full_precision_dots(monkeypatch):
    # tf32 dots would miss the fp32 floor; the kernel asks for ieee precision on fp32 inputs.
    counter = CallCounter(monkeypatch, attention_kernels, "attention_forward")
    with use_backend("triton"):
        check(*make_qkv(1, 2, 300, 77, 64, torch.float32))
    assert counter.calls == 1


def test_stride_unit_is_the_alignment_of_indexed_strides():
    q = torch.empty(2, 8, 64, 40)
    assert attention_kernels.stride_unit(q) == 8  # D = 40: rows start every 80 bytes in fp16
    assert attention_kernels.stride_unit(torch.empty(2, 8, 64, 64)) == 16
    assert attention_kernels.stride_unit(torch.empty(1, 1, 5, 7)) == 1
    qkv = torch.empty(2, 16, 3, 4, 40)  # fused QKV view: head stride 40, row stride 480
    view = qkv[:, :, 0].transpose(1, 2)
    assert attention_kernels.stride_unit(view) == 8
    assert attention_kernels.scaled_strides(view, 8) == (16 * 480 // 8, 40 // 8, 480 // 8, 1)


def test_inputs_needing_gradients_take_the_differentiable_eager_path(triton_backend, monkeypatch):
    counter = CallCounter(monkeypatch, attention_kernels, "attention_forward")
    q, k, v = (t.requires_grad_(True) for t in make_qkv(1, 2, 8, 8, 16, torch.float32))
    attention(q, k, v).sum().backward()
    assert counter.calls == 0 and q.grad is not None


@pytest.mark.parametrize(
    ("head_dim", "blocks"),
    [
        (40, (32, 16)),
        (48, (32, 16)),
        (80, (64, 16)),
        (160, (128, 32)),
        (64, (64, 0)),
        (8, (16, 0)),
        (24, (32, 0)),
        (100, (128, 0)),
        (256, (256, 0)),
    ],
)
def test_head_blocks_split_only_when_it_saves_columns(head_dim, blocks):
    assert attention_kernels.head_blocks(head_dim) == blocks
    assert attention_kernels.head_blocks(head_dim, split=False)[1] == 0


@pytest.mark.parametrize("switch", ["_split_head_dim_works", "SPLIT_HEAD_DIM"])
@pytest.mark.parametrize("head_dim", [40, 80, 160])
def test_padded_head_dim_matches_reference(triton_backend, monkeypatch, head_dim, switch):
    # One power-of-two padded block: the fallback when the split variant fails to compile, and
    # what SPLIT_HEAD_DIM = False (bench_attention's fastdiff-padded provider) launches.
    monkeypatch.setattr(attention_kernels, switch, False)
    launched = record_attention_launches(monkeypatch)
    check(*make_qkv(1, 2, 19, 21, head_dim, torch.float32), what=f"padded d{head_dim}")
    assert [blocks for blocks, _ in launched] == [attention_kernels.head_blocks(head_dim, False)]


GPU_CONFIGS = [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
    for m, n, w, s in attention_kernels._GPU_SHAPES + attention_kernels._FP32_SHAPES
]


@pytest.mark.parametrize(
    ("dtype", "autotune", "tuned"),
    [
        pytest.param(torch.float16, "1", True, id="fp16-autotuned"),
        pytest.param(torch.float16, "0", False, id="fp16-autotune-off"),
        pytest.param(torch.float32, "1", False, id="fp32-one-spill-free-config"),
        # heuristics only: still the spill-free fp32 shape, not the fp16 default
        pytest.param(torch.float32, "0", False, id="fp32-autotune-off"),
    ],
)
def test_a_lone_pruned_config_is_launched_without_the_autotuner(
    monkeypatch, dtype, autotune, tuned
):
    """Triton 3.6's autotuner would time a lone config at each new shape: launch it directly."""
    monkeypatch.setattr(attention_kernels.attention_forward_kernel, "configs", GPU_CONFIGS)
    monkeypatch.setenv("FASTDIFF_AUTOTUNE", autotune)
    q = torch.empty(2, 8, 4096, 64, dtype=dtype)
    kernel, options = attention_kernels.lone_config(q, 4096, 4096, 64, 0)
    if tuned:
        assert kernel is attention_kernels.attention_forward_kernel and options == {}
        return
    assert kernel is attention_kernels.attention_forward_kernel.fn
    wanted = attention_kernels.heuristic_shape(64, 4096, fp32=dtype == torch.float32)
    got = (options["BLOCK_M"], options["BLOCK_N"], options["num_warps"], options["num_stages"])
    assert got == wanted


@pytest.mark.parametrize("dtype", kernel_dtypes())
def test_running_max_keeps_an_earlier_block_maximum(triton_backend, monkeypatch, dtype):
    """Scores of about +100 in the first key block and -100 in every later one (a gap of 200,
    beyond fp32's exp range of 88): the running max must keep the first block's maximum, or the
    rescaling factor exp(200) overflows and the output turns NaN. Several key blocks of every
    config (the interpreter's are 16 keys; the GPU's at most 128)."""
    counter = CallCounter(monkeypatch, attention_kernels, "attention_forward")
    keys, first = 3 * 128, 128
    q = torch.ones(1, 1, 4, 16, device=DEVICE)
    k = torch.full((1, 1, keys, 16), -25.0, device=DEVICE)  # q.k * 16^-1/2 = -100
    k[:, :, :first] = 25.0  # +100
    k = k + torch.randn(k.shape, device=DEVICE) * 0.05  # scores spread by about 0.1
    v = torch.randn(1, 1, keys, 16, device=DEVICE)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out = check(q, k, v, what="score gap of 200 across key blocks")
    assert counter.calls == 1
    # Only the first block's values count: the later keys weigh exp(-200) = 0.
    head = attention_reference(q.float(), k[..., :first, :].float(), v[..., :first, :].float())
    torch.testing.assert_close(out.float(), head.float(), atol=2e-3, rtol=2e-3)


def test_partial_key_block_when_keys_are_a_multiple_of_16_only(triton_backend, monkeypatch):
    """EVEN_KEYS (no key mask) must hold only when the key count is a multiple of BLOCK_N: 48
    keys in blocks of 32 leave a partial block even though 48 is a multiple of 16. The keys and
    values are views of 64-key tensors whose hidden keys would dominate the softmax if read.
    The autotuner's configs are replaced by that one (the interpreter's is 16 x 16)."""
    config = triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1)
    monkeypatch.setattr(attention_kernels.attention_forward_kernel, "configs", [config])
    monkeypatch.setattr(attention_kernels, "_lone_configs", {})
    launched = record_attention_launches(monkeypatch)
    q, k, v = make_qkv(1, 2, 20, 64, 16, torch.float32)
    q = q.abs() + 0.5
    k[:, :, 48:] = 10.0  # q.k of about 40 or more for the 16 keys beyond the view
    v[:, :, 48:] = 1000.0
    check(q, k[:, :, :48], v[:, :, :48], what="48 keys in blocks of 32")
    assert [options["BLOCK_N"] for _, options in launched] == [32]


@pytest.mark.parametrize("scale", [None, 0.3])
@pytest.mark.parametrize("dims", [(1, 2, 5, 7, 16), (2, 1, 9, 3, 40)], ids=["d16", "d40"])
def test_reference_matches_the_definition(dims, scale):
    """attention_reference, every kernel test's oracle, against softmax(q k^T * scale) v written
    out in float64: a wrong reference would make the tolerance rule's eager error large and every
    kernel test pass."""
    q, k, v = make_qkv(*dims, torch.float32)
    out = attention_reference(q, k, v, scale)
    factor = 1.0 / math.sqrt(dims[-1]) if scale is None else scale
    scores = torch.einsum("bhnd,bhmd->bhnm", q.double(), k.double()) * factor
    weights = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    weights = weights / weights.sum(dim=-1, keepdim=True)
    truth = torch.einsum("bhnm,bhmd->bhnd", weights, v.double())
    assert out.dtype == q.dtype
    torch.testing.assert_close(out.double(), truth, atol=1e-5, rtol=1e-5)
