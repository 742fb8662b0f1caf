"""The GPU tests' harness, run on the CPU: cases train through the in-process worker loop, a resumed
run repeats the uninterrupted losses, an export reproduces the final validation loss, and a broken
case is reported without stopping the others. (On CPU this repeats what tests/distributed cover
through Ray; it is here so the harness the GPU tests depend on is known to work before a GPU runs it.)"""

from __future__ import annotations

import pytest

from tests.gpu.harness import run_cases

pytestmark = pytest.mark.slow


def test_harness_trains_resumes_exports_and_reports_failures(prepared, gpu_root):
    r = run_cases({
        "rigl": {"device": "cpu", "overrides": {"sparsity": {"method": "rigl", "update_interval": 2}},
                 "resume_at": 4, "export": True},
        "broken": {"device": "cpu", "overrides": {"model": {"n_heads": 5}}},
    }, prepared, gpu_root / "cpu")  # fmt: skip
    assert "n_heads" in r["broken"]["error"]
    rigl = r["rigl"]
    assert "error" not in rigl, rigl.get("error")
    assert sorted(int(s) for s in rigl["losses"]) == list(range(1, 9))
    assert rigl["resumed_losses"] == {s: v for s, v in rigl["losses"].items() if int(s) > 4}  # bit-identical on CPU
    assert rigl["resumed_dst"][-1]["mask_hash"] == rigl["dst"][-1]["mask_hash"]
    assert len({d["mask_hash"] for d in rigl["dst"]}) > 1
    assert rigl["exported_val_loss"] == pytest.approx(rigl["final_val_loss"], abs=1e-4)


def test_the_case_process_sees_what_only_pythonpath_provides(prepared, gpu_root, tmp_path, monkeypatch):
    """On the GPU machine DeepSpeed is importable only through PYTHONPATH (scripts/gpu_session.sh
    installs the carried wheels into a --target folder). Stand-in: a sitecustomize.py found only on
    PYTHONPATH, which records every interpreter that imports it; the case's process must be one."""
    site, marker = tmp_path / "site", tmp_path / "imported-by"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os, sys\n"
        f"with open({str(marker)!r}, 'a') as f:\n"
        "    f.write(' '.join(sys.argv[1:2]) + '\\n')\n")  # fmt: skip
    monkeypatch.setenv("PYTHONPATH", str(site))
    r = run_cases({"dense": {"device": "cpu", "overrides": {"train": {"steps": 2}}}}, prepared, gpu_root / "pythonpath")
    assert "error" not in r["dense"], r["dense"].get("error")
    assert "child" in marker.read_text().split(), "the case ran without the PYTHONPATH it was given"
