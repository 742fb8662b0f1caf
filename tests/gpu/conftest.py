"""Data for the GPU tests: the corpus prepared once per session (on a machine without `datasets`,
point SCALESPARSE_TEST_CACHE at a cache folder prepared elsewhere: the run script carries one)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def prepared(small_data):
    from scalesparse.config import DataConfig
    from scalesparse.data import prepare_data

    d = dict(small_data)
    if os.environ.get("SCALESPARSE_TEST_CACHE"):
        d["cache_dir"] = os.environ["SCALESPARSE_TEST_CACHE"]
    return prepare_data(DataConfig(**d))


@pytest.fixture(scope="session")
def gpu_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gpu")
