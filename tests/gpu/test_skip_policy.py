"""The GPU run's skip policy (tests/gpu/skip_policy.py), proven on a throw-away test file in a real
pytest process: in the GPU run a skip for a reason not on the list fails, a listed one stays a skip,
and outside the GPU run nothing changes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

SAMPLE = '''
import pytest

def test_needs_megablocks():
    pytest.skip("megablocks: No module named 'megablocks'")

@pytest.mark.skipif(True, reason="needs 2 GPUs")
def test_two_gpus():
    pass

def test_ray():
    pytest.importorskip("a_module_that_is_not_there_ray")

@pytest.mark.xfail(reason="known")
def test_expected_failure():
    assert False

def test_plain():
    assert True
'''


def run_sample(tmp_path, **env) -> str:
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SCALESPARSE_GPU_")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.gpu.skip_policy", "-rA", "-q", "-p",
                           "no:cacheprovider", str(tmp_path / "test_sample.py")], cwd=tmp_path, text=True,
                          capture_output=True, env={**clean, "PYTHONPATH": str(REPO), **env}, timeout=120)  # fmt: skip
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("mode", ["SCALESPARSE_GPU_RUN", "SCALESPARSE_GPU_REHEARSAL"])
def test_in_the_gpu_run_only_listed_skips_stay_skips(tmp_path, mode):
    out = run_sample(tmp_path, **{mode: "1"})
    assert "FAILED test_sample.py::test_needs_megablocks" in out, out
    assert "may not skip for: \"megablocks: No module named 'megablocks'\"" in out, out
    assert "FAILED test_sample.py::test_ray" in out, out  # importorskip's reason is not "could not import 'ray'"
    assert "SKIPPED" in out and "needs 2 GPUs" in out, out
    assert "XFAIL test_sample.py::test_expected_failure" in out, out
    assert "2 failed, 1 passed, 1 skipped, 1 xfailed" in out, out


def test_ordinary_runs_keep_their_skips(tmp_path):
    out = run_sample(tmp_path)
    assert "1 passed, 3 skipped, 1 xfailed" in out, out
