"""Multi-node, simulated on this machine: a 2-node Ray cluster on 127.0.0.1 (ray.cluster_utils).

`scalesparse submit` sends a config as a Ray Job (logs streamed back, exit code returned); its 2
workers land on different nodes (SPREAD) and checkpoint to shared storage; `scalesparse train
--address` then resumes from that checkpoint on the same cluster and reproduces the losses.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from scalesparse.train.metrics import read_metrics
from tests.conftest import REPO, tiny_config
from tests.distributed.test_sparse_sync import free_port

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


@pytest.fixture(scope="module")
def two_nodes():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "dashboard_port": free_port(),
        "dashboard_agent_listen_port": free_port()})  # fmt: skip  (another Ray may hold the default port)
    cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def cli(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scalesparse", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def test_submit_spreads_workers_over_two_nodes_and_train_address_resumes(two_nodes, small_data, tmp_path):
    import json

    shared = tmp_path / "shared"  # stands for an NFS/Lustre path every node mounts
    cfg = tiny_config(small_data, shared / "run", resources={"placement": "SPREAD"})
    cfg["logging"]["progress"] = False
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg))

    done = cli("submit", str(config), "--address", f"http://{two_nodes.webui_url}", "--python", sys.executable)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "submitted job scalesparse-t-" in done.stdout
    assert "step 6: val_loss" in done.stdout  # the job's own output, streamed back
    assert "SUCCEEDED, exit code 0" in done.stdout

    run = shared / "run"
    nodes = {json.loads((run / "workers" / f"rank{r}.json").read_text())["node_id"] for r in (0, 1)}
    cluster_nodes = {two_nodes.head_node.node_id} | {n.node_id for n in two_nodes.worker_nodes}
    assert len(nodes) == 2 and nodes == cluster_nodes  # one worker per node
    assert (run / "checkpoints" / "latest").read_text() == "step_00000006"

    resumed_cfg = tiny_config(small_data, shared / "resumed", resources={"placement": "SPREAD"})
    config.write_text(yaml.safe_dump(resumed_cfg))
    again = cli("train", str(config), "--address", two_nodes.address,
                "--resume", str(run / "checkpoints" / "step_00000003"))  # fmt: skip
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    full, rest = losses(run), losses(shared / "resumed")
    assert sorted(rest) == [4, 5, 6]
    for step in rest:
        assert rest[step] == pytest.approx(full[step], abs=1e-6, rel=0), f"step {step}"


def test_submit_returns_the_jobs_failure(two_nodes, small_data, tmp_path):
    cfg = tiny_config({**small_data, "path": str(tmp_path / "missing.tar.gz")}, tmp_path / "run")
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(cfg))
    done = cli("submit", str(config), "--address", f"http://{two_nodes.webui_url}", "--python", sys.executable)
    assert done.returncode == 2, done.stdout[-2000:]  # the job's `scalesparse train` exit code
    assert "missing.tar.gz" in done.stdout and "FAILED, exit code 2" in done.stdout


def _kill_matching(marker: str) -> None:
    import os
    import signal
    from pathlib import Path

    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ValueError):
            pass


def test_joining_a_head_that_wants_a_token_says_how():
    """Ray 2.60 turns token auth on for a `ray start` head whenever ~/.ray/auth_token exists (any earlier
    local Ray writes one); a driver joining without RAY_AUTH_MODE=token is refused. scalesparse says so
    in one line, with the remedy, and the remedy works."""
    import os
    import secrets
    import socket
    import tempfile
    import time
    from pathlib import Path

    tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's socket paths live under it
    home = tmp / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS")}
    env["HOME"] = str(home)
    port = free_port()
    ray_cli = Path(sys.executable).parent / "ray"
    head = subprocess.Popen([str(ray_cli), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                             "--num-cpus=1", "--include-dashboard=false", f"--temp-dir={tmp / 'ray'}", "--block"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    join = (f"from scalesparse import launch; launch.init_ray('127.0.0.1:{port}'); import ray; "
            "print('joined', int(ray.cluster_resources()['CPU']))")  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and head.poll() is None, "ray start did not come up"
                time.sleep(0.5)
        refused = subprocess.run([sys.executable, "-c", join], env=env, capture_output=True, text=True,
                                 timeout=120, cwd=REPO)  # fmt: skip
        assert refused.returncode != 0
        assert "the cluster requires token authentication; export RAY_AUTH_MODE=token" in refused.stderr
        ok = subprocess.run([sys.executable, "-c", join], env={**env, "RAY_AUTH_MODE": "token"},
                            capture_output=True, text=True, timeout=120, cwd=REPO)  # fmt: skip
        assert "joined 1" in ok.stdout, ok.stderr[-2000:]
    finally:
        head.terminate()
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        _kill_matching(str(tmp))  # raylet, GCS and workers of this head only (never `ray stop`)
