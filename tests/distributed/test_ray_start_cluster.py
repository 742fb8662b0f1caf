"""A real cluster, as an operator builds one on one machine: a head and a second node, each its own
`ray start --block` process on 127.0.0.1 with token authentication (tests/distributed/ray_processes.py),
one worker per node (SPREAD).

- `train --address`: each progress line and each `step N: val_loss` line reaches the terminal once,
  and Ray's routine warnings stay in train.log (two nodes on one machine share Ray's log folder,
  so Ray forwards every worker line twice).
- The second node crashes (SIGKILL of its raylet) after a checkpoint, with fault_tolerance.elastic
  and the default max_failures 0: the run continues on 1 worker, every loss equal to the
  uninterrupted run's (1e-4), and none of Ray's own notices of the death reaches the terminal. The
  same for a graceful stop (SIGTERM to its `ray start`), without waiting for a replacement node.
- `submit` without RAY_AUTH_MODE=token: refused in one line; with it, the job succeeds, each line once
  (and a failing job's exit code and error come back).
- A local run (no --address) while the cluster is up, and after it was killed without `ray stop`
  (Ray's temp folder still names it in ray_current_cluster): its own Ray, no traceback.

Time: one cluster and one uninterrupted run serve the module; the head declares a crashed node dead
within seconds (ray_processes.NODE_DEATH_DETECTION), and the second node is started again only
before a test that needs it (the last two run on the head alone).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from scalesparse import chaos
from scalesparse.config import FaultToleranceConfig
from scalesparse.train import checkpoint as ckpt
from scalesparse.train.metrics import read_metrics
from tests.conftest import REPO, tiny_config
from tests.distributed.ray_processes import DRAIN_TIMEOUT_S, make_cluster, remove

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

STEPS, EVERY = 40, 10
RUN_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def cluster():
    c = make_cluster(2)
    yield c
    remove(c)


@pytest.fixture
def two_nodes(cluster):
    """The cluster with its second node up (started again after an earlier test crashed or stopped it)."""
    cluster.ensure_second()
    return cluster


def write_config(small_data, folder: Path, name: str, **sections) -> Path:
    # wide enough that 40 steps take seconds: a window to crash the node in after the step-10 checkpoint
    base = {"model": {"d_model": 128, "n_layers": 4, "seq_len": 64},
            "train": {"steps": STEPS, "global_batch_size": 16, "micro_batch_size": 4, "eval_every": 10},
            "checkpoint": {"every": EVERY, "keep": 2}, "resources": {"placement": "SPREAD"},
            "logging": {"log_every": 1, "progress": True, "tensorboard": False}}  # fmt: skip
    for section, values in sections.items():
        base[section] = {**base.get(section, {}), **values}
    cfg = tiny_config(small_data, folder / name, **base)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def scalesparse(cluster, *args, env=None, timeout=RUN_TIMEOUT_S) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "scalesparse", *args], cwd=REPO, env=env or cluster.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def finish(proc: subprocess.Popen, timeout=RUN_TIMEOUT_S) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout} s: {out[-2000:]}{err[-2000:]}")


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def assert_each_line_once(text: str) -> None:
    lines = [line for line in text.splitlines() if "val_loss" in line or " tok/s | step " in line]
    assert lines, text[-2000:]
    twice = {line: n for line, n in Counter(lines).items() if n > 1}
    assert not twice, twice


# Ray's own account of a lost node or worker (the driver says what happened, and what it does next,
# in one line): kept in train.log, never on the terminal
RAY_DEATH_NOTICES = re.compile(
    r"marked dead|died or was killed|Raylet is terminated|\[state-dump\]|\[FailurePolicy\]|Traceback|"
    r"Error Snippet|ActorDiedError|ActorUnavailableError|WorkerGroupError|PreemptionError|preemption detected|"
    r"\(raylet\)|gcs_server"
)


def assert_no_ray_death_notices(terminal: str) -> None:
    shown = [line for line in terminal.splitlines() if RAY_DEATH_NOTICES.search(line)]
    assert not shown, "\n".join(shown[:40])


@pytest.fixture(scope="module")
def reference(cluster, small_data, tmp_path_factory):
    """The uninterrupted 2-worker run, through `train --address`: (stdout, stderr, run_dir)."""
    cluster.ensure_second()
    folder = tmp_path_factory.mktemp("ref")
    proc = scalesparse(cluster, "train", str(write_config(small_data, folder, "ref")), "--address", cluster.address)
    out, err = finish(proc)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return out, err, folder / "ref"


def test_train_address_prints_each_line_once_with_one_worker_per_node(reference):
    out, err, run_dir = reference
    assert_each_line_once(out + err)
    assert [f"step {s}: val_loss" in out for s in (0, 10, 20, 30, 40)] == [True] * 5
    nodes = {json.loads((run_dir / "workers" / f"rank{r}.json").read_text())["node_id"] for r in (0, 1)}
    assert len(nodes) == 2  # placement SPREAD: one worker on each node
    assert "t loss" in out and f"step {STEPS}/{STEPS} (100%)" in out  # the progress, one line per log step
    assert "State API may be temporarily unavailable" not in out + err
    assert "Traceback" not in out + err
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))


def crash_run(cluster, small_data, tmp_path, name: str, stop, env: dict[str, str] | None = None) -> tuple[str, dict]:
    """A run with fault_tolerance.elastic (max_failures left at 0) whose second node `stop()`s after the
    step-10 checkpoint; the run's output and what happened when. `env`: more for the driver's environment."""
    happened = {}

    def act(step: int, latest: str) -> bool:
        happened.update(step=step, checkpoint=latest, time=time.time())
        stop()
        return True

    thread = chaos.when_run_reaches(tmp_path / name, after_checkpoint=EVERY, after_step=EVERY + 2, action=act,
                                    timeout_s=RUN_TIMEOUT_S)  # fmt: skip
    config = write_config(small_data, tmp_path, name, fault_tolerance={"elastic": True})
    proc = scalesparse(cluster, "train", str(config), "--address", cluster.address, "--summary-json",
                       str(tmp_path / f"{name}.json"), env={**cluster.env, **(env or {})})  # fmt: skip
    out, err = finish(proc)
    thread.join(timeout=5)
    (tmp_path / f"{name}.terminal").write_text(out + err)  # what the user saw, beside the run's train.log
    assert happened, "the run finished before the node could be stopped"
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return out + err, happened


def assert_continued_on_one(text: str, run_dir: Path, happened: dict, reference_dir: Path, what: str) -> dict:
    """The run went on on 1 worker with the uninterrupted run's losses; what it cost (seconds after the
    node went: the old group failed, the driver continued, training again; steps recomputed)."""
    import json

    assert "continuing on 1 from" in text, text[-3000:]
    assert "resume: reshaping 2 workers ZeRO-2 → 1 worker ZeRO-2" in text
    lost = json.loads((run_dir.parent / f"{run_dir.name}.json").read_text())["workers_lost"]
    assert [(r["from_workers"], r["to_workers"]) for r in lost] == [(2, 1)]
    resumed_from = int(lost[0]["checkpoint"].rsplit("_", 1)[1])
    before = text[: text.index("fault tolerance:")]  # (metrics.jsonl drops the steps a resume redoes)
    last_before = max(int(n) for n in re.findall(rf" \| step (\d+)/{STEPS} ", before))
    timed = [r for r in read_metrics(run_dir) if "time" in r and "loss" in r]
    again = min(r["time"] for r in timed if r["time"] > lost[0]["time"])  # the first step of the 1-worker run
    cost = {"failed_s": lost[0]["failed_at"] - happened["time"], "continued_s": lost[0]["time"] - happened["time"],
            "again_s": again - happened["time"], "recomputed": last_before - resumed_from}  # fmt: skip
    print(f"\n{what} after step {happened['step']} ({happened['checkpoint']} complete): the old group went on "
          f"to step {last_before} and failed {cost['failed_s']:.1f} s after it; the driver continued on 1 worker "
          f"from {lost[0]['checkpoint']} at +{cost['continued_s']:.1f} s; training again at +{cost['again_s']:.1f} s; "
          f"{cost['recomputed']} steps recomputed")  # fmt: skip
    got, want = losses(run_dir), losses(reference_dir)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-4, rel=0), f"step {step}"
    assert ckpt.latest_checkpoint(run_dir / "checkpoints").name == ckpt.tag_for(STEPS)
    return cost


def test_elastic_run_survives_a_crashed_node_with_default_max_failures(two_nodes, reference, small_data, tmp_path):
    text, happened = crash_run(two_nodes, small_data, tmp_path, "crash", two_nodes.crash_second)
    assert_continued_on_one(text, tmp_path / "crash", happened, reference[2], "second node's raylet SIGKILLed")
    log = (tmp_path / "crash" / "train.log").read_text()
    assert RAY_DEATH_NOTICES.search(log), "Ray said nothing of the crash in train.log: the check below proves nothing"
    assert_no_ray_death_notices(text)


def test_elastic_run_survives_a_gracefully_stopped_node(two_nodes, reference, small_data, tmp_path):
    # As a preemption notice stops a node: Ray drains it (DRAIN_TIMEOUT_S), then stops its processes. Ray
    # Train's preemption watcher tells its controller (both poll faster here than Ray's 5 s and 2 s, so
    # that they surely see the short drain), which ends the group at the drain's deadline; the driver
    # continues at once, where Ray Train would restart the group at full size and wait
    # restart_timeout_s for a replacement node.
    faster = {"RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.2", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
    text, happened = crash_run(two_nodes, small_data, tmp_path, "graceful", two_nodes.stop_second, env=faster)
    cost = assert_continued_on_one(text, tmp_path / "graceful", happened, reference[2], "second node stopped (SIGTERM)")
    lost = json.loads((tmp_path / "graceful.json").read_text())["workers_lost"]
    assert "interrupted by node preemption" in lost[0]["error"], lost  # the path above, not a worker's death
    assert cost["continued_s"] < DRAIN_TIMEOUT_S + FaultToleranceConfig().restart_timeout_s / 2, cost
    assert_no_ray_death_notices(text)


def test_submit_refuses_a_missing_token_in_one_line_and_succeeds_with_it(cluster, small_data, tmp_path):
    config = write_config(small_data, tmp_path, "job", parallel={"workers": 1},
                          train={"steps": 10, "eval_every": 5})  # fmt: skip
    no_token = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_MODE"}
    proc = scalesparse(cluster, "submit", str(config), "--address", cluster.jobs_address, "--python", sys.executable,
                       env=no_token)  # fmt: skip
    out, err = finish(proc, timeout=120)
    assert proc.returncode == 2, out[-2000:] + err[-2000:]
    assert err.strip().splitlines() == [
        f"scalesparse: error: --address {cluster.jobs_address}: the cluster requires token authentication; export "
        "RAY_AUTH_MODE=token with the head's token in RAY_AUTH_TOKEN or ~/.ray/auth_token (`ray get-auth-token` "
        "on the head prints it)"]  # fmt: skip

    proc = scalesparse(cluster, "submit", str(config), "--address", cluster.jobs_address, "--python", sys.executable)
    out, err = finish(proc)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert "submitted job scalesparse-t-" in out
    assert "SUCCEEDED, exit code 0" in out
    assert "step 10: val_loss" in out  # the job's own output, streamed back
    assert_each_line_once(out + err)
    assert (tmp_path / "job" / "checkpoints" / "latest").read_text() == ckpt.tag_for(10)

    # a job that fails: its `scalesparse train` exit code, and its one-line error, come back
    bad = write_config({**small_data, "path": str(tmp_path / "missing.tar.gz")}, tmp_path, "bad",
                       parallel={"workers": 1})  # fmt: skip
    proc = scalesparse(cluster, "submit", str(bad), "--address", cluster.jobs_address, "--python", sys.executable)
    out, err = finish(proc, timeout=180)
    assert proc.returncode == 2, out[-2000:] + err[-2000:]
    assert "missing.tar.gz" in out and "FAILED, exit code 2" in out


def test_a_local_run_starts_its_own_ray_while_a_cluster_is_up_and_after_it_died(cluster, small_data, tmp_path):
    """Ray's temp folder (RAY_TMPDIR, shared with the cluster) names the cluster in ray_current_cluster."""
    env = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_MODE"}

    def local(name: str) -> str:
        config = write_config(small_data, tmp_path, name, parallel={"workers": 1}, resources={"placement": "PACK"},
                              train={"steps": 2, "eval_every": 0}, checkpoint={"every": 0})  # fmt: skip
        proc = scalesparse(cluster, "train", str(config), env=env)
        out, err = finish(proc, timeout=180)
        assert proc.returncode == 0, out[-3000:] + err[-3000:]
        assert "Traceback" not in out + err
        return out + err

    address_file = cluster.root / "ray" / "ray_current_cluster"
    assert address_file.read_text().strip().endswith(f":{cluster.port}")
    local("while-up")
    # SIGKILL to both `ray start` processes, no `ray stop`: the file stays behind, and their GCS,
    # raylets and agents go on as orphans
    orphans = cluster.pids(cluster.head)[1:] + cluster.pids(cluster.second)[1:]
    try:
        for proc in (cluster.second, cluster.head):
            proc.kill()
            proc.wait(timeout=10)
        assert address_file.is_file()
        local("after-kill")
    finally:
        for pid in orphans:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
