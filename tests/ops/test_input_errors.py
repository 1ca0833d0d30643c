"""Bad input to the ops and their kernel launchers fails with an error that names what is wrong
(the shapes, the type, the allowed values), before any kernel runs. One case per check, on tiny
tensors."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from fastdiff.ops import attention, autoselect, conv3x3, group_norm, linear_geglu, sampler_step


@pytest.mark.parametrize(
    "k_shape, v_shape",
    [
        ((2, 2, 6, 8), (2, 2, 6, 8)),
        ((1, 3, 6, 8), (1, 3, 6, 8)),
        ((1, 2, 6, 8), (1, 2, 7, 8)),
        ((1, 2, 6, 8), (2, 2, 6, 8)),
    ],
    ids=["k-v-batch-not-q-batch", "k-v-heads-not-q-heads", "v-keys-not-k-keys", "v-batch-not-k"],
)
def test_attention_names_the_disagreeing_shapes(k_shape, v_shape):
    q = torch.zeros(1, 2, 5, 8)
    message = f"batch/heads/keys disagree: q=(1, 2, 5, 8) k={k_shape} v={v_shape}"
    with pytest.raises(ValueError, match=re.escape(message)):
        attention(q, torch.zeros(k_shape), torch.zeros(v_shape))


@pytest.mark.parametrize(
    "op, x, weight, got",
    [
        (conv3x3, [[1.0]], torch.zeros(2, 1, 3, 3), "list and Tensor"),
        (conv3x3, torch.zeros(1, 1, 4, 4), None, "Tensor and NoneType"),
        # x.device used to be read before the check: an AttributeError that named no argument
        (linear_geglu, [1.0, 2.0], torch.zeros(2, 2), "list and Tensor"),
        (linear_geglu, torch.zeros(3, 2), np.zeros((2, 2)), "Tensor and ndarray"),
    ],
    ids=[
        "conv3x3-x-a-list",
        "conv3x3-weight-none",
        "linear-geglu-x-a-list",
        "linear-geglu-weight-numpy",
    ],
)
def test_projections_name_arguments_that_are_not_tensors(op, x, weight, got):
    with pytest.raises(ValueError, match=f"{op.__name__} expects tensors x and weight, got {got}"):
        op(x, weight)


@pytest.mark.parametrize(
    "x, message",
    [([1.0, 2.0], "got list"), (torch.zeros(4), r"got \(4,\)"), (torch.tensor(1.0), r"got \(\)")],
    ids=["x-a-list", "x-without-channels", "x-a-scalar"],
)
def test_group_norm_names_an_input_without_channels(x, message):
    with pytest.raises(ValueError, match=r"group_norm expects an \(N, C, \*\) tensor, " + message):
        group_norm(x, 1)


@pytest.mark.parametrize(
    "weight, bias, message",
    [
        (torch.ones(3), None, r"weight has shape \(3,\), expected \(4,\)"),
        (None, torch.zeros(4, 1), r"bias has shape \(4, 1\), expected \(4,\)"),
        (torch.ones(1, 4, 1, 1), torch.zeros(4), r"weight has shape \(1, 4, 1, 1\), expected"),
        ([1.0] * 4, None, r"weight must be a \(4,\) tensor or None, got list"),
    ],
    ids=[
        "weight-of-3-for-4-channels",
        "bias-a-column",
        "weight-broadcastable-not-flat",
        "weight-a-list",
    ],
)
def test_group_norm_names_mis_shaped_parameters(weight, bias, message):
    with pytest.raises(ValueError, match="group_norm: " + message):
        group_norm(torch.zeros(1, 4, 2, 2), 2, weight, bias)


X = (2, 4, 3, 3)


@pytest.mark.parametrize(
    "older_shape",
    [(0, *X), (4, *X), X, (1, 2, 4, 3, 4)],
    ids=["no-estimates", "four-estimates", "estimates-not-stacked", "estimate-of-another-shape"],
)
def test_sampler_step_names_mis_shaped_older_estimates(older_shape):
    x = torch.zeros(X)
    message = f"x0_older shape {older_shape} must be [K, *x.shape] with K in [1, 3] (x shape {X})"
    with pytest.raises(ValueError, match=re.escape(message)):
        sampler_step(x, x, torch.zeros(10), x0_older=torch.zeros(older_shape))


@pytest.mark.parametrize(
    "step, got",
    [
        (torch.tensor(1.0), "a torch.float32 tensor of shape ()"),
        (torch.tensor([1, 2]), "a torch.int64 tensor of shape (2,)"),
        # These used to fail with an AttributeError ('float' object has no attribute 'numel').
        (1.0, "1.0 (float)"),
        (np.int64(1), f"{np.int64(1)!r} (int64)"),
    ],
    ids=["float-tensor", "two-steps", "python-float", "numpy-int"],
)
def test_sampler_step_names_a_step_that_is_not_one_integer(step, got):
    x = torch.zeros(X)
    message = f"step must be an int or a one-element integer tensor, got {got}"
    with pytest.raises(ValueError, match=re.escape(message)):
        sampler_step(x, x, torch.zeros(5, 10), step)


@pytest.fixture
def backend_table(tmp_path, monkeypatch):
    """A table file that ``$FASTDIFF_BACKEND_TABLE`` names; the cached table is re-read after."""
    path = tmp_path / "table.json"
    monkeypatch.setenv("FASTDIFF_BACKEND_TABLE", str(path))
    autoselect.reload()
    yield path
    monkeypatch.delenv("FASTDIFF_BACKEND_TABLE")
    autoselect.reload()


@pytest.mark.parametrize(
    "table",
    [[], {"device": "NVIDIA H200"}, {"entries": {"op": "attention"}}],
    ids=["a-list", "no-entries", "entries-not-a-list"],
)
def test_backend_table_without_an_entries_list_names_the_file(backend_table, table):
    backend_table.write_text(json.dumps(table))
    message = f"backend table {backend_table}: expected an object with an 'entries' list"
    with pytest.raises(ValueError, match=re.escape(message)):
        autoselect.load_table()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"entries": [{"op": "attention", "key": "k", "ms": 3}]}', "entry 0 'ms' must map"),
        (
            '{"entries": [{"op": "attention", "key": "k", "ms": {"triton": "fast"}}]}',
            "entry 0 'ms'['triton'] must be a number of milliseconds or null, got 'fast'",
        ),
        (
            '{"entries": [{"op": "attention", "key": "k", "ms": {"triton": true}}]}',
            "entry 0 'ms'['triton'] must be a number of milliseconds or null, got True",
        ),
    ],
    ids=["not-json", "ms-not-a-mapping", "time-a-string", "time-a-bool"],
)
def test_backend_table_with_a_bad_field_names_the_file_and_field(backend_table, text, message):
    backend_table.write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"backend table {backend_table}: {message}")):
        autoselect.load_table()


def test_backend_table_skips_null_and_non_positive_times(backend_table):
    entry = {"op": "attention", "key": "k", "ms": {"triton": 0.5, "eager": None, "cuda": 0}}
    backend_table.write_text(json.dumps({"entries": [entry]}))
    assert autoselect.load_table() == {"attention|k": {"triton": 0.5}}


# ---- kernel launchers: callers that skip the op's checks and fallbacks ------------------------


def test_attention_launcher_names_a_head_dim_beyond_the_kernel():
    # The op runs such heads eagerly; the launcher refuses them before any kernel is compiled.
    from fastdiff.kernels.attention import attention_forward

    q = torch.zeros(1, 1, 2, 257)
    with pytest.raises(ValueError, match=r"attention kernel: head dim 257 > 256"):
        attention_forward(q, q, q)


def test_group_norm_launcher_names_spatial_dims_that_do_not_flatten():
    # The op runs such layouts eagerly; the launcher refuses them before any kernel is compiled.
    from fastdiff.kernels.group_norm import group_norm_forward

    x = torch.zeros(1, 4, 3, 5).transpose(2, 3)
    with pytest.raises(ValueError, match=re.escape(f"spatial dims of stride {x.stride()}")):
        group_norm_forward(x, 2, None, None, 1e-5, False)
