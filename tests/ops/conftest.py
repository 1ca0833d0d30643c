"""Op-test fixtures: run an op on the triton backend (GPU, or CPU under the interpreter)."""

from __future__ import annotations

import pytest

from fastdiff.ops import use_backend
from tests.ops.helpers import INTERPRET


@pytest.fixture
def triton_backend():
    """Force the triton backend; skip where Triton cannot run (no GPU and no interpreter)."""
    import torch

    if not (INTERPRET or torch.cuda.is_available()):
        pytest.skip("triton kernels need a GPU or TRITON_INTERPRET=1")
    with use_backend("triton"):
        yield
