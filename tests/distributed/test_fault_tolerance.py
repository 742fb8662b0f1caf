"""A worker SIGKILLed mid-run: Ray Train restarts the group, it resumes from the last complete
checkpoint, and every step's loss equals an uninterrupted run's (data position and RNG restored).
A lost node with fault_tolerance.elastic is tested on a real two-node cluster of `ray start` processes
(test_ray_start_cluster.py), which also covers what `ray.cluster_utils`' node removal did here."""

from __future__ import annotations

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
