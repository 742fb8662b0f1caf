"""`scalesparse train` on a terminal, as a person runs it on a laptop: one tiny local run (2 workers)
under a pseudo-terminal, watched from outside while it runs.

- The progress bar reaches the terminal and moves (rank 0 reports, the driver draws).
- Ray's and DeepSpeed's routine notices stay off the terminal and in the run's train.log.
- Every socket that any process of the run listens on (the driver, Ray's GCS, raylet, agents,
  dashboard and workers, rank 0's torch.distributed store, gloo) is bound to a loopback address.
"""

from __future__ import annotations

import ipaddress
import os
import pty
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import pytest
import yaml

from scalesparse.progress import ROUTINE, routine
from tests.conftest import REPO, tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

STEPS = 60


@dataclass
class WatchedRun:
    returncode: int
    screen: str  # what the terminal received
    log: str  # the run's train.log
    listening: dict[tuple[str, int], str] = field(default_factory=dict)  # (address, port) → process name


def listening_sockets(root: int) -> dict[tuple[str, int], str]:
    """TCP sockets listening in `root` and all its descendants (Ray's processes are the driver's
    children, its workers the raylet's)."""
    import psutil

    found: dict[tuple[str, int], str] = {}
    try:
        top = psutil.Process(root)
        procs = [top, *top.children(recursive=True)]
    except psutil.NoSuchProcess:
        return found
    for proc in procs:
        try:
            for conn in proc.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    found[(conn.laddr.ip, conn.laddr.port)] = proc.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1, a dual-stack socket's loopback
    return (mapped or ip).is_loopback


def run_on_a_terminal(args: list[str], timeout: float = 300) -> tuple[int, str, dict[tuple[str, int], str]]:
    """Run `args` with a pseudo-terminal as stdin, stdout and stderr; what it drew, and the sockets
    its process tree listened on, sampled every quarter second while it ran.

    The terminal reports no size, as under `script -qc CMD` started from a pipe or a CI job (how the
    missing bar was found); and the command gets a user's environment, not the test session's
    (conftest keeps the session's own Ray on loopback with a variable a user does not set)."""
    primary, secondary = pty.openpty()
    user_env = {k: v for k, v in os.environ.items()
                if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}  # fmt: skip
    env = {**user_env, "PYTHONUNBUFFERED": "1", "TERM": "xterm"}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdin=secondary, stdout=secondary, stderr=secondary,
                            start_new_session=True)  # fmt: skip
    os.close(secondary)
    drawn: list[bytes] = []

    def read() -> None:
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # the terminal's other side closed
                return
            if not chunk:
                return
            drawn.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    listening: dict[tuple[str, int], str] = {}
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        listening.update(listening_sockets(proc.pid))
        time.sleep(0.25)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    reader.join(timeout=10)
    os.close(primary)
    return proc.returncode, b"".join(drawn).decode(errors="replace"), listening


@pytest.fixture(scope="module")
def watched(small_data, tmp_path_factory) -> WatchedRun:
    tmp = tmp_path_factory.mktemp("terminal")
    cfg = tiny_config(small_data, tmp / "run", train={"steps": STEPS, "eval_every": 0}, checkpoint={"every": 0},
                      logging={"log_every": 10, "progress": True, "tensorboard": False})  # fmt: skip
    (tmp / "c.yaml").write_text(yaml.safe_dump(cfg))
    code, screen, listening = run_on_a_terminal([sys.executable, "-m", "scalesparse", "train", str(tmp / "c.yaml")])
    log = tmp / "run" / "train.log"
    return WatchedRun(code, screen, log.read_text() if log.is_file() else "", listening)


def test_the_run_finishes(watched):
    assert watched.returncode == 0, watched.screen[-3000:]
    assert "done in" in watched.screen


def test_the_progress_bar_reaches_the_terminal_and_moves(watched):
    counts = [float(n) for n in re.findall(rf"\| *(\d+(?:\.\d+)?)/{STEPS}(?:\.0)? \[", watched.screen)]
    assert len(set(counts)) >= 3, f"bar counts drawn: {counts}\n{watched.screen[-3000:]}"
    assert counts == sorted(counts) and counts[-1] == STEPS
    assert "\r" in watched.screen and "tok/s" in watched.screen  # redrawn in place, with the loss and rate
    assert re.search(r"step 0: val_loss [\d.]+", watched.screen), "rank 0's lines are shown too"


def test_routine_notices_stay_off_the_terminal_and_in_the_log(watched):
    shown = [line for line in watched.screen.splitlines() if routine(line)]
    assert not shown, shown
    kept = [line for line in watched.log.splitlines() if routine(line)]
    assert kept, f"none of {ROUTINE} in train.log: the filter went untested\n{watched.log[-3000:]}"
    assert "step 0: val_loss" in watched.log


def test_every_process_of_a_local_run_listens_on_loopback_only(watched):
    names = set(watched.listening.values())
    # the scan must have seen the run's servers, or it proves nothing
    assert {"gcs_server", "raylet"} <= names and any("RayTrainWorker" in n for n in names), watched.listening
    exposed = {f"{addr}:{port}": name for (addr, port), name in watched.listening.items() if not is_loopback(addr)}
    assert not exposed, f"listening beyond loopback: {exposed}"
