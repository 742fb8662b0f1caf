"""Joining a cluster that wants token authentication, without the token: one line with the remedy, and
the remedy works. (`submit`, workers spread over two nodes and a resume on a cluster are tested on a
real two-node cluster of `ray start` processes: test_ray_start_cluster.py.)
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.distributed.test_sparse_sync import free_port

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


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
