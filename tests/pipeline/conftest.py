"""Shared by the pipeline tests: torch on one thread, and tiny diffusers-format folders (built by
diffusers' save_pretrained; tests/pipeline/folders.py) and fastdiff pipelines loaded from them,
once per test module (a module may define its own ``sd`` / ``sdxl`` instead)."""

from __future__ import annotations

import pytest

from fastdiff.pipeline import Pipeline
from tests.pipeline.folders import (
    make_sd_folder,
    make_sdxl_folder,
    make_sdxl_refiner_folder,
    single_thread,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return make_sd_folder(tmp_path_factory.mktemp("sd") / "pipe")


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    return make_sdxl_folder(tmp_path_factory.mktemp("sdxl") / "pipe")


@pytest.fixture(scope="module")
def sdxl_refiner_folder(tmp_path_factory):
    return make_sdxl_refiner_folder(tmp_path_factory.mktemp("refiner") / "pipe")


@pytest.fixture(scope="module")
def sd_inpaint_folder(tmp_path_factory):
    return make_sd_folder(tmp_path_factory.mktemp("inpaint") / "pipe", inpainting=True)


@pytest.fixture(scope="module")
def sd(sd_folder):
    return Pipeline.from_pretrained(sd_folder)


@pytest.fixture(scope="module")
def sdxl(sdxl_folder):
    return Pipeline.from_pretrained(sdxl_folder)


@pytest.fixture(scope="module")
def refiner(sdxl_refiner_folder):
    return Pipeline.from_pretrained(sdxl_refiner_folder)
