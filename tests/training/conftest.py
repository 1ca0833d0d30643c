"""Tiny training configs: every stage runs in about a second on one CPU core."""

import copy

import pytest

TINY = {
    "device": "cpu",
    "progress": False,
    "export_dtype": "float32",
    "data": {"num_images": 96, "held_out_images": 24, "seed": 5},
    "classifier": {"steps": 6, "batch_size": 8, "width": 8, "checkpoint_every": 3},
    "vae": {
        "steps": 6,
        "batch_size": 4,
        "block_out_channels": [8, 16],
        "norm_num_groups": 4,
        "checkpoint_every": 3,
    },
    "unet": {
        "steps": 6,
        "batch_size": 8,
        "block_out_channels": [16, 32],
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "attention_head_dim": 8,
        "checkpoint_every": 3,
        "learning_rate": 2e-3,
        "ema_decay": 0.9,
    },
}


@pytest.fixture
def tiny_config_dict(tmp_path):
    """A fresh copy of the tiny config writing into this test's tmp_path."""
    values = copy.deepcopy(TINY)
    values["output_dir"] = str(tmp_path / "run")
    return values


@pytest.fixture(autouse=True)
def _eager_ops():
    """These tests measure training and the model, not the kernels (tests/ops covers those): run
    the reference ops even under TRITON_INTERPRET=1, where interpreted kernels take minutes."""
    from fastdiff.ops import use_backend

    with use_backend("eager"):
        yield
