"""Shared test setup: every test is seeded; GPU tests are skipped without CUDA."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

# CI runs two pytest workers on two cores: more threads per worker only oversubscribe them.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
