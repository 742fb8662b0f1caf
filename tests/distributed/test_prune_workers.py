"""Pruning on 2 Ray workers (calibration split, statistics all-reduced, solves spread) must give the
1-worker result."""

import pytest
import torch
from safetensors.torch import load_file

from scalesparse.config import load_prune_config
from scalesparse.pruning.job import run_prune
from tests.pruning.test_job import exported  # noqa: F401  (fixture)

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def settings(model, small_data, out, method, workers, layer_error=False):
    sets = [f"model={model}", f"method={method}", "sparsity=0.5", f"out={out}", f"workers={workers}",
            "calibration.samples=6", "calibration.seq_len=32", "eval.tokens=0",
            f"data.cache_dir={small_data['cache_dir']}", f"layer_error={str(layer_error).lower()}"]  # fmt: skip
    if "path" in small_data:
        sets.append(f"data.path={small_data['path']}")
    return load_prune_config(None, sets)


# each method once; magnitude with the error report (the Gram sums all-reduced for a method that does not
# need them), Wanda without it (its per-column sums alone), SparseGPT's always on (its Hessian)
@pytest.mark.parametrize("method, layer_error", [("magnitude", True), ("wanda", False), ("sparsegpt", False)])
def test_two_workers_prune_exactly_like_one(exported, small_data, tmp_path, ray_session, method,  # noqa: F811
                                            layer_error):  # fmt: skip
    one = run_prune(settings(exported, small_data, tmp_path / "one", method, 1, layer_error), progress=False)
    two = run_prune(settings(exported, small_data, tmp_path / "two", method, 2, layer_error), progress=False)
    assert two["workers"] == 2 and one["workers"] == 1
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("one", "two"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5, msg=name)
    errors = [[r["rel_error"] for r in run["layers"]] for run in (one, two)]
    if method == "wanda":
        assert errors == [[None] * len(errors[0])] * 2  # not computed, on either
    else:
        assert errors[1] == pytest.approx(errors[0], rel=1e-4) and None not in errors[0]


def test_the_prune_command_on_two_workers_prints_each_line_once_and_no_ray_notices(exported, small_data,  # noqa: F811
                                                                                     tmp_path):  # fmt: skip
    """What a user sees from `scalesparse prune --workers 2 … | tee`: the driver's Console (as in
    training) keeps Ray's routine notices and colour codes in prune.log, off the terminal."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    out = tmp_path / "out"
    sets = ["calibration.samples=4", "calibration.seq_len=32", "eval.tokens=0",
            f"data.cache_dir={small_data['cache_dir']}"] + ([f"data.path={small_data['path']}"] if "path" in small_data
                                                            else [])  # fmt: skip
    command = ["prune", "--model", str(exported), "--method", "magnitude", "--workers", "2", "--out", str(out)]
    command += [a for x in sets for a in ("--set", x)]
    proc = subprocess.run([sys.executable, "-m", "scalesparse", *command], cwd=REPO,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    shown = proc.stdout + proc.stderr
    assert "magnitude unstructured 50%" in proc.stdout, shown[-2000:]
    assert "Token authentication" not in shown and "\x1b[" not in shown, shown[-3000:]
    forwarded = [line for line in shown.splitlines() if "pid=" in line]
    assert len(forwarded) == len(set(forwarded)) and all(line.count("pid=") == 1 for line in forwarded), shown
    assert all(line.startswith(forwarded[0].split(")")[0]) for line in forwarded), "rank 0 alone draws bars"
    # The log keeps the workers' lines. Whether Ray prints its token-authentication notice at all
    # depends on the machine (CI's did not), so the notice's routing is tested in test_progress.py.
    log = (out / "prune.log").read_text()
    assert "magnitude 50%" in log and "pid=" in log, log[-2000:]
