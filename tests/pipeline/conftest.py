"""Shared by the pipeline tests: torch on one thread, and tiny diffusers-format folders (built by
diffusers' save_pretrained; tests/pipeline/folders.py) once per test module."""

from __future__ import annotations

import pytest

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
