"""What the driver decides after a failure on the workers with fault_tolerance.elastic (no Ray: the
launcher, the cluster's view and the checkpoints are stand-ins)."""

from __future__ import annotations

from pathlib import Path

import pytest

from scalesparse import launch
from scalesparse.config import config_from_dict
from scalesparse.train import driver
from tests.conftest import tiny_config


class Cluster:
    """run_workers fails `failures` times; worker_slots answers from `slots` in turn (the last repeats)."""

    def __init__(self, failures: int, slots: list[int]) -> None:
        self.failures, self.slots, self.runs = failures, list(slots), []

    def run_workers(self, cfg, args, address=None, progress=None):
        self.runs.append((cfg.parallel.workers, args.get("resume")))
        if len(self.runs) <= self.failures:
            raise launch.WorkersFailed("t failed on the workers: RuntimeError: gloo: Connection closed by peer")

    def worker_slots(self, cpus, gpus, address=None):
        return self.slots.pop(0) if len(self.slots) > 1 else self.slots[0]


@pytest.fixture
def setup(monkeypatch, tmp_path):
    def make(failures: int, slots: list[int], checkpoints: list[str], timeout_s: float = 0.5):
        cluster = Cluster(failures, slots)
        monkeypatch.setattr(launch, "run_workers", cluster.run_workers)
        monkeypatch.setattr(launch, "worker_slots", cluster.worker_slots)
        found = iter(checkpoints)
        monkeypatch.setattr(driver.ckpt, "latest_checkpoint", lambda root: Path(root) / next(found))
        monkeypatch.setattr(driver.ckpt, "read_state", lambda path: {})
        monkeypatch.setattr(driver, "check_compatible", lambda *a: None)
        cfg = config_from_dict(tiny_config({}, tmp_path, fault_tolerance={"elastic": True,
                                                                          "restart_timeout_s": timeout_s}))  # fmt: skip
        args = {"data": {"vocab_size": 512}, "resume": None}
        return cluster, lambda: driver.run_elastic(cfg, args, tmp_path, "127.0.0.1:1")

    return make


def test_a_node_declared_dead_late_is_waited_for_and_the_run_shrinks(setup, capsys):
    # the cluster still counts the crashed node for 2 looks, then shows it gone
    cluster, run = setup(failures=1, slots=[2, 2, 1], checkpoints=["step_00000020"], timeout_s=30)
    shrunk = run()
    assert [r["to_workers"] for r in shrunk] == [1]
    assert cluster.runs[-1][0] == 1 and cluster.runs[-1][1].endswith("step_00000020")
    assert "continuing on 1 from" in capsys.readouterr().out


def test_no_node_lost_restarts_once_at_full_size_then_gives_up_without_progress(setup, capsys):
    cluster, run = setup(failures=3, slots=[2], checkpoints=["step_00000020", "step_00000020"])
    with pytest.raises(launch.WorkersFailed):
        run()
    assert [w for w, _ in cluster.runs] == [2, 2]  # one restart at full size, none without a newer checkpoint
    assert "restarting 2 from" in capsys.readouterr().out


def test_elastic_without_checkpoints_is_refused_at_the_door(tmp_path):
    from scalesparse.errors import ConfigError

    cfg = config_from_dict(tiny_config({}, tmp_path, fault_tolerance={"elastic": True}, checkpoint={"every": 0}))
    with pytest.raises(ConfigError, match="fault_tolerance.elastic: .* checkpoint.every is 0"):
        driver.run_training(cfg)
