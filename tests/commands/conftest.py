"""Fixtures of the command-line tests: one thread for torch (the tiny models run faster so on
two shared cores), and a tiny class-conditional pipeline folder shared by a module's tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    from tests.pipeline.folders import single_thread

    with single_thread():
        yield


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory):
    from tests.pipeline.folders import make_class_folder

    return make_class_folder(tmp_path_factory.mktemp("cls") / "pipe", num_classes=3)
