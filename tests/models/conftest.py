"""Session fixture: the tiny diffusers reference checkpoints of ``tests.models.reference``."""

from __future__ import annotations

import pytest

from tests.models.reference import Checkpoints


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> Checkpoints:
    return Checkpoints(tmp_path_factory.mktemp("diffusers_checkpoints"))
