"""The corpus prepared once per session for the GPU tests (from the shared cache when
$SCALESPARSE_TEST_CACHE names one: the GPU machine has no `datasets` to prepare it)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def prepared(small_data):
    from scalesparse.config import DataConfig
    from scalesparse.data import prepare_data

    return prepare_data(DataConfig(**small_data))


@pytest.fixture(scope="session")
def gpu_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gpu")
