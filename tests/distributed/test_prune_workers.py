"""Pruning on 2 Ray workers (calibration split, statistics all-reduced, solves spread) must give the
1-worker result."""

import pytest
import torch
from safetensors.torch import load_file

from scalesparse.config import load_prune_config
from scalesparse.pruning.job import run_prune
from tests.pruning.test_job import exported  # noqa: F401  (fixture)

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def settings(model, small_data, out, method, workers):
    sets = [f"model={model}", f"method={method}", "sparsity=0.5", f"out={out}", f"workers={workers}",
            "calibration.samples=6", "calibration.seq_len=32", "eval.tokens=0",
            f"data.cache_dir={small_data['cache_dir']}"]  # fmt: skip
    if "path" in small_data:
        sets.append(f"data.path={small_data['path']}")
    return load_prune_config(None, sets)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_two_workers_prune_exactly_like_one(exported, small_data, tmp_path, ray_session, method):  # noqa: F811
    one = run_prune(settings(exported, small_data, tmp_path / "one", method, 1), progress=False)
    two = run_prune(settings(exported, small_data, tmp_path / "two", method, 2), progress=False)
    assert two["workers"] == 2 and one["workers"] == 1
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("one", "two"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5, msg=name)
    assert [r["rel_error"] for r in two["layers"]] == pytest.approx([r["rel_error"] for r in one["layers"]], rel=1e-4)
