"""Every training feature on one GPU (issue 12's list): the worker loop in one process, world size 1
with the cpu:gloo,cuda:nccl group, no Ray. The selected cases run in one watched subprocess (one
DeepSpeed import, one CUDA context; tests/gpu/harness.py); in the GPU session its matrix step has
run them into $SCALESPARSE_GPU_CASES (JSON lines) before pytest starts, and pytest only reads that
file (a case missing from it fails); each test reads its case's result. Multi-rank equality stays
on CPU (NCCL refuses two ranks on one GPU); the tests needing two GPUs skip with fewer. In the GPU
rehearsal (SCALESPARSE_GPU_REHEARSAL=1) the cases run on the CPU (bf16 as fp32; MegaBlocks' skip,
as it needs CUDA)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from tests.gpu.harness import STEPS, on_cpu, read_results, rehearsing, run_cases, runnable_on_cpu

pytestmark = pytest.mark.gpu
DEVICE = "cpu" if rehearsing() else "cuda"

BF16 = {"train": {"dtype": "bf16"}}
MOE = {"model": {"mlp": "moe"}, "moe": {"num_experts": 4, "top_k": 2, "d_ff": 64}}


def sparse(method, **kw):
    return {"sparsity": {"method": method, "sparsity": 0.9, "update_interval": 2, "start_step": 0, **kw}}


def both(*parts):
    out: dict = {}
    for p in parts:
        for section, values in p.items():
            out.setdefault(section, {}).update(values)
    return out


CASES = {
    **{f"dense-zero{z}-fp32": {"overrides": {"parallel": {"zero_stage": z}}} for z in (0, 1, 2, 3)},
    **{f"dense-zero{z}-bf16": {"overrides": both(BF16, {"parallel": {"zero_stage": z}})} for z in (0, 2, 3)},
    **{f"moe-{b}-{d}": {"overrides": both(MOE, {"moe": {"backend": b}}, BF16 if d == "bf16" else {})}
       for b in ("grouped", "loop", "megablocks") for d in ("fp32", "bf16")},
    "moe-capacity-bf16": {"overrides": both(MOE, BF16, {"moe": {"backend": "grouped", "capacity_factor": 1.0}})},
    "static-unstructured-uniform": {"overrides": sparse("static", distribution="uniform")},
    "static-nm": {"overrides": sparse("static", granularity="nm", sparsity=0.5)},
    "snip-unstructured": {"overrides": sparse("snip")},
    "snip-nm": {"overrides": sparse("snip", granularity="nm", sparsity=0.5)},
    "gmp": {"overrides": sparse("gmp", stop_fraction=0.75)},
    "set-erk": {"overrides": sparse("set", distribution="erk")},
    "set-block": {"overrides": sparse("set", granularity="block", block_size=16)},
    "rigl-uniform-bf16": {"overrides": both(sparse("rigl", distribution="uniform"), BF16)},
    "rigl-erk-zero3": {"overrides": both(sparse("rigl"), {"parallel": {"zero_stage": 3}})},
    "rigl-block": {"overrides": sparse("rigl", granularity="block", block_size=16)},
    # checkpoint at step 4 → resume in a fresh run → the same losses; then export
    "resume-dense-bf16": {"overrides": BF16, "resume_at": 4, "export": True},
    "resume-dense-zero3": {"overrides": {"parallel": {"zero_stage": 3}}, "resume_at": 4, "export": True},
    "resume-rigl": {"overrides": sparse("rigl"), "resume_at": 4, "export": True},
    "resume-moe-grouped-bf16": {"overrides": both(MOE, BF16, {"moe": {"backend": "grouped"}}), "resume_at": 4,
                                "export": True},  # fmt: skip
}


def device_case(name: str) -> dict:
    return on_cpu(CASES[name]) if DEVICE == "cpu" else {**CASES[name], "device": "cuda"}


@pytest.fixture(scope="module")
def results(request, prepared, gpu_root):
    """The results of the cases this session's selected tests read (not the whole matrix: a `-k`
    run does only its cases), taken from the results file where it has them already."""
    selected = {item.callspec.params["name"] for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec")}  # fmt: skip
    names = [n for n in CASES if n in selected and (DEVICE == "cuda" or runnable_on_cpu(n))]
    results_file = os.environ.get("SCALESPARSE_GPU_CASES")
    if results_file:  # the session's matrix step ran the cases (each under its limit): read, never rerun
        have = read_results(Path(results_file))
        missing = {"error": "not in $SCALESPARSE_GPU_CASES: the session's matrix step did not run it (session.log)"}
        return {n: have[n] if have.get(n, {}).get("device") == DEVICE else missing for n in names}
    return run_cases({n: device_case(n) for n in names}, prepared, gpu_root / "train")


def case(results, name):
    if DEVICE == "cpu" and not runnable_on_cpu(name):
        pytest.skip("megablocks needs CUDA (rehearsal on the CPU)")
    r = results[name]
    assert "error" not in r, r.get("error")
    return r


def trained(r):
    """Trained: every step logged, finite, the loss went down, memory was on the device (on a GPU)."""
    losses = [r["losses"][str(s)] for s in range(1, STEPS + 1)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    assert r["device"] == DEVICE
    if DEVICE == "cuda":
        assert r["cuda_peak_mb"] > 0


@pytest.mark.rehearsal
@pytest.mark.parametrize("name", [n for n in CASES if n.startswith(("dense", "moe"))])
def test_dense_and_moe_train_on_cuda(results, name):
    if "megablocks" in name and DEVICE == "cuda":
        from scalesparse.model.moe.backends import megablocks_unavailable_reason

        if megablocks_unavailable_reason():
            pytest.skip(f"megablocks: {megablocks_unavailable_reason()}")
    r = case(results, name)
    trained(r)
    if name.startswith("moe"):
        assert r["moe_load"] is not None and len(r["moe_load"][0]) == 4


@pytest.mark.rehearsal
@pytest.mark.parametrize("name", [n for n in CASES if n.split("-")[0] in ("static", "snip", "gmp", "set", "rigl")])
def test_sparse_training_on_cuda_holds_its_target(results, name):
    r = case(results, name)
    trained(r)
    target = CASES[name]["overrides"]["sparsity"]["sparsity"]
    assert r["dst"][-1]["sparsity"] == pytest.approx(target, abs=0.02)
    if name.startswith(("set", "rigl")):  # masks changed during training
        assert len({d["mask_hash"] for d in r["dst"]}) > 1


@pytest.mark.rehearsal
@pytest.mark.parametrize("name", [n for n in CASES if n.startswith("resume")])
def test_resume_on_cuda_gives_the_uninterrupted_losses_and_exports(results, name):
    r = case(results, name)
    trained(r)
    after = {s: v for s, v in r["losses"].items() if int(s) > 4}
    assert r["resumed_losses"].keys() == after.keys()
    for s in after:  # deterministic kernels (train.deterministic): the same steps, bit for bit
        assert r["resumed_losses"][s] == pytest.approx(after[s], abs=1e-6, rel=0), s
    if "rigl" in name:
        assert r["resumed_dst"][-1]["mask_hash"] == r["dst"][-1]["mask_hash"]
    tol = 2e-2 if "bf16" in name else 1e-4  # bf16 training evaluates in bf16; the export in fp32
    assert r["exported_val_loss"] == pytest.approx(r["final_val_loss"], abs=tol)


@pytest.mark.slow
def test_killed_worker_restarts_on_the_gpu(small_data, tmp_path):
    """max_failures under Ray Train with one GPU worker: killed after the step-10 checkpoint, the run
    continues from it and every step's loss equals an uninterrupted run's."""
    pytest.importorskip("ray")
    from scalesparse import chaos, launch
    from scalesparse.config import config_from_dict
    from scalesparse.train.driver import run_training
    from scalesparse.train.metrics import read_metrics
    from tests.conftest import tiny_config

    def cfg(run_dir, max_failures):
        return config_from_dict(tiny_config(
            small_data, run_dir, model={"d_model": 128, "n_layers": 4, "seq_len": 64},
            train={"steps": 30, "global_batch_size": 16, "micro_batch_size": 4, "eval_every": 0,
                   "deterministic": True},
            parallel={"workers": 1}, resources={"gpus_per_worker": 1, "cpus_per_worker": 1},
            checkpoint={"every": 10, "keep": 2}, fault_tolerance={"max_failures": max_failures},
        ))  # fmt: skip

    launch.init_ray(num_cpus=4)
    try:
        thread, kill = chaos.kill_worker_when(tmp_path / "killed", rank=0, after_checkpoint=10, after_step=12)
        run_training(cfg(tmp_path / "killed", 1))
        thread.join(timeout=5)
        assert kill.pid is not None, "the run finished before the worker could be killed"
        run_training(cfg(tmp_path / "clean", 0))
    finally:
        launch.shutdown_ray()

    def losses(d):
        return {r["step"]: r["loss"] for r in read_metrics(d) if "loss" in r}

    clean, killed = losses(tmp_path / "clean"), losses(tmp_path / "killed")
    assert killed.keys() == clean.keys()
    for s in clean:
        assert killed[s] == pytest.approx(clean[s], abs=1e-6), s


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_expert_parallel_on_two_gpus_equals_data_parallel(small_data, tmp_path):
    """E=4 experts on 2 GPUs (2 each, all-to-all over NCCL) train the same steps as both GPUs holding
    every expert (fp32)."""
    pytest.importorskip("ray")
    from scalesparse import launch
    from scalesparse.config import config_from_dict
    from scalesparse.train.driver import run_training
    from scalesparse.train.metrics import read_metrics
    from tests.conftest import tiny_config

    def cfg(run_dir, ep):
        return config_from_dict(tiny_config(
            small_data, run_dir, model={"mlp": "moe"}, moe={"num_experts": 4, "top_k": 2, "expert_parallel": ep},
            parallel={"workers": 2, "zero_stage": 1}, resources={"gpus_per_worker": 1, "cpus_per_worker": 1},
            train={"deterministic": True},
        ))  # fmt: skip

    launch.init_ray(num_cpus=4)
    try:
        run_training(cfg(tmp_path / "ep", 2))
        run_training(cfg(tmp_path / "dp", 1))
    finally:
        launch.shutdown_ray()
    ep = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "ep") if "loss" in r}
    dp = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "dp") if "loss" in r}
    assert ep.keys() == dp.keys()
    for s in dp:
        assert ep[s] == pytest.approx(dp[s], abs=1e-4), s
