"""A worker SIGKILLed mid-run: Ray Train restarts the group, it resumes from the last complete
checkpoint, and every step's loss equals an uninterrupted run's (data position and RNG restored)."""

from __future__ import annotations

import time

import pytest

from scalesparse import chaos
from scalesparse.config import config_from_dict
from scalesparse.train import checkpoint as ckpt
from scalesparse.train.driver import run_training
from scalesparse.train.metrics import read_metrics
from tests.conftest import tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

STEPS = 40


def config(small_data, run_dir, max_failures):
    # wide enough that 40 steps take seconds, leaving a window to kill in after the step-10 checkpoint
    return config_from_dict(tiny_config(
        small_data, run_dir, model={"d_model": 128, "n_layers": 4, "seq_len": 64},
        train={"steps": STEPS, "global_batch_size": 16, "micro_batch_size": 4, "eval_every": 20},
        checkpoint={"every": 10, "keep": 2}, fault_tolerance={"max_failures": max_failures},
    ))  # fmt: skip


def step_losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def test_killed_worker_restarts_from_the_last_checkpoint_and_matches_an_uninterrupted_run(
    small_data, tmp_path, ray_session
):
    killed_dir = tmp_path / "killed"
    thread, kill = chaos.kill_worker_when(killed_dir, rank=1, after_checkpoint=10, after_step=12)
    run_training(config(small_data, killed_dir, max_failures=1))
    thread.join(timeout=5)
    assert kill.pid is not None, "the run finished before the worker could be killed"
    restarted = chaos.worker_info(killed_dir, 1)
    assert restarted["pid"] != kill.pid  # a new process took rank 1's place
    times = chaos.recovery_times(killed_dir, kill)
    print(f"\nkilled rank 1 (pid {kill.pid}) after step {kill.at_step}, {kill.checkpoint} complete: "
          f"replacement worker up after {times['worker_restarted_s']:.1f} s, "
          f"training again after {times['training_again_s']:.1f} s")  # fmt: skip
    assert times["training_again_s"] > 0

    reference_dir = tmp_path / "uninterrupted"
    run_training(config(small_data, reference_dir, max_failures=0))
    got, want = step_losses(killed_dir), step_losses(reference_dir)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))  # redone steps logged once
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-6, rel=0), f"step {step}"
    assert ckpt.latest_checkpoint(killed_dir / "checkpoints").name == ckpt.tag_for(STEPS)


def test_without_max_failures_a_killed_worker_fails_the_run_and_keeps_its_checkpoint(
    small_data, tmp_path, ray_session
):
    from scalesparse.errors import ScalesparseError

    run_dir = tmp_path / "run"
    thread, kill = chaos.kill_worker_when(run_dir, rank=0, after_checkpoint=10, after_step=11)
    with pytest.raises(ScalesparseError, match="failed on the workers"):
        run_training(config(small_data, run_dir, max_failures=0))
    thread.join(timeout=5)
    assert kill.pid is not None
    latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    assert latest.name >= ckpt.tag_for(10)
    ckpt.verify(latest)  # still complete and loadable: resume auto would continue from it


def test_elastic_run_continues_on_the_nodes_left_when_one_is_removed(small_data, tmp_path):
    """fault_tolerance.elastic on a simulated 2-node cluster: one worker per node; the second node is
    removed after the step-10 checkpoint, so the group cannot come back at full size. The run goes
    on with one worker from that checkpoint (reshaped), and every step's loss equals an
    uninterrupted 2-worker run's."""
    import json
    import subprocess
    import sys

    import yaml
    from ray.cluster_utils import Cluster

    from tests.conftest import REPO
    from tests.distributed.test_sparse_sync import free_port

    cluster = Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": free_port(), "dashboard_agent_listen_port": free_port()})  # fmt: skip
    second = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    try:
        def train(name: str, **fault_tolerance) -> subprocess.Popen:
            cfg = config(small_data, tmp_path / name, max_failures=1).to_dict()
            cfg["train"]["steps"] = 30
            cfg["resources"]["placement"] = "SPREAD"
            cfg["fault_tolerance"].update(fault_tolerance)
            (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
            return subprocess.Popen([sys.executable, "-m", "scalesparse", "train", str(tmp_path / f"{name}.yaml"),
                                     "--address", cluster.address, "--summary-json", str(tmp_path / f"{name}.json")],
                                    cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip

        reference = train("reference")
        out, _ = reference.communicate(timeout=300)
        assert reference.returncode == 0, out[-3000:]

        removed = {}

        def remove_second_node(step: int, latest: str) -> bool:
            removed.update(step=step, checkpoint=latest, time=time.time())
            cluster.remove_node(second, allow_graceful=False)
            return True

        thread = chaos.when_run_reaches(tmp_path / "elastic", after_checkpoint=10, after_step=12,
                                        action=remove_second_node)  # fmt: skip
        run = train("elastic", elastic=True, restart_timeout_s=10)
        out, _ = run.communicate(timeout=400)
        thread.join(timeout=5)
        assert run.returncode == 0, out[-3000:]
        assert removed, "the run finished before the node could be removed"
        assert "fault tolerance: 2 workers cannot be restarted (the cluster holds 1); continuing on 1" in out
        assert "resume: reshaping 2 workers ZeRO-2 → 1 worker ZeRO-2" in out
        lost = json.loads((tmp_path / "elastic.json").read_text())["workers_lost"]
        assert [(r["from_workers"], r["to_workers"]) for r in lost] == [(2, 1)]
        assert lost[0]["checkpoint"] >= ckpt.tag_for(10)
    finally:
        cluster.shutdown()
    after = [r["time"] for r in read_metrics(tmp_path / "elastic") if "time" in r and r["time"] > removed["time"]]
    print(f"\nnode removed after step {removed['step']} ({removed['checkpoint']} complete); training again on 1 "
          f"worker {min(after) - removed['time']:.1f} s later (restart_timeout_s 10)")  # fmt: skip
    got, want = step_losses(tmp_path / "elastic"), step_losses(tmp_path / "reference")
    assert sorted(got) == sorted(want) == list(range(1, 31))
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-5, rel=0), f"step {step}"
