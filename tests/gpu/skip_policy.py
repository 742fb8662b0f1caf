"""In the GPU run, a test may not pass by skipping the thing it tests.

scripts/gpu_session.sh sets SCALESPARSE_GPU_RUN=1 on the GPU machine (and the rehearsal sets
SCALESPARSE_GPU_REHEARSAL=1 on the CPU). There, a skipped test is turned into a failure unless its
reason starts with one of the reasons listed below, each with why it may skip there. Anything else
(MegaBlocks that failed to build, a CUDA feature missing, an import that broke) fails the run.
"""

from __future__ import annotations

import os

import pytest

ALLOWED_ON_THE_GPU = {
    "needs 2 GPUs": "the session's machine has one H200 (expert parallelism over NCCL needs two)",
    "could not import 'ray'": "Ray is not carried to the GPU machine (its wheel is ~47 MB of the 64 MiB carry); "
                              "the Ray-driven GPU restart test runs where Ray is installed",
    "SmolLM2-135M not built here": "the model (a 98 MB GGUF, 517 MB as safetensors) is not carried",
}  # fmt: skip
ALLOWED_IN_REHEARSAL = {
    **ALLOWED_ON_THE_GPU,
    "needs CUDA": "the rehearsal's machine has no GPU: CUDA-only tests are collected (imports checked), not run",
    "megablocks needs CUDA": "MegaBlocks' kernels are CUDA-only",
}


def allowed_skips() -> dict[str, str] | None:
    """The reasons a test may skip in this run, or None where skips are not policed (ordinary runs)."""
    if os.environ.get("SCALESPARSE_GPU_RUN") == "1":
        return ALLOWED_ON_THE_GPU
    if os.environ.get("SCALESPARSE_GPU_REHEARSAL") == "1":
        return ALLOWED_IN_REHEARSAL
    return None


def skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    allowed = allowed_skips()
    if allowed is None or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = skip_reason(report)
    if not any(reason.startswith(r) for r in allowed):
        report.outcome = "failed"
        report.longrepr = (f"skipped in the GPU run, for a reason it may not skip for: {reason!r} "
                           f"(allowed: {sorted(allowed)}; see tests/gpu/skip_policy.py)")  # fmt: skip
