"""A real Ray cluster on this machine, as an operator builds one: a head and a second node, each a
separate `ray start --block` process on 127.0.0.1 (free ports, token authentication as
launch/README.md says), stopped by their process ids (never `ray stop`: other Ray instances on the
machine are not ours).

Everything of the cluster lives under one short temporary folder (Ray's socket paths sit inside
it): RAY_TMPDIR (where `ray_current_cluster` is written and read), HOME (with ~/.ray/auth_token).
Caches stay the user's (XDG_CACHE_HOME): DeepSpeed's compiled CPU collective op, matplotlib's font
list; a fresh HOME would rebuild them in every cluster (measured: 2 min before the first step).

The head's GCS declares a crashed node dead after 5 failed health checks 1 s apart (Ray's default:
3 s apart), so that a test of a node crash does not wait out Ray's 15 s; a node that is alive but
slow to answer (2 busy cores) still has 5 s per check, as by default."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# `ray start`, except that a loopback --node-ip-address / --address stays on loopback: Ray (on Linux,
# where multi-node clusters are on) swaps 127.0.0.1 for the machine's routable address, and with
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (which keeps it) a second node refuses to join.
# So the processes it starts (agents, dashboard, job drivers, workers) get RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
# which keeps them on loopback as well, and `ray start` itself is told clusters are on (or it refuses
# to join a second node) but keeps the loopback address.
RAY_START = [sys.executable, "-c", "import sys; from ray._private import ray_constants, services; "
             "ray_constants.ENABLE_RAY_CLUSTER = True; services.resolve_ip_for_localhost = lambda host: host; "
             "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; sys.exit(main())"]  # fmt: skip
RAY = str(Path(sys.executable).parent / "ray")
# A preemption notice's grace (Ray's default: 30 s): long enough for Ray Train to see the node drain
# (the test has its watcher poll every 0.2 s, its controller every 0.5 s), short beside the tests' runs
# (the group trains on until then, and must not reach the end)
DRAIN_TIMEOUT_S = 2.0
# Read by the head's GCS (RayConfig, from RAY_<name>): how soon a node that stopped answering is dead
NODE_DEATH_DETECTION = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "5000",
                        "RAY_health_check_failure_threshold": "5"}  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ports() -> list[str]:
    """The ports a `ray start` would otherwise take at fixed defaults (two nodes on one machine clash)."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}"]  # fmt: skip


@dataclass
class RayProcesses:
    root: Path
    port: int
    dashboard_port: int
    env: dict[str, str]
    """What a driver on this machine needs to join (HOME with the token, RAY_AUTH_MODE, RAY_TMPDIR)."""
    head: subprocess.Popen | None = None
    second: subprocess.Popen | None = None
    logs: dict[str, Path] = field(default_factory=dict)
    leftovers: list[int] = field(default_factory=list)
    """Processes of a crashed second node (its `ray start` exits with its raylet; these live on)."""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def jobs_address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = self.root / f"{name}.out"
        self.logs[name] = log
        with open(log, "ab") as out:
            return subprocess.Popen([*RAY_START, "start", *args, "--block"], env={**self.env, **(env or {})},
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

    def start_head(self) -> None:
        self.head = self._start("head", [
            "--head", f"--port={self.port}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={free_port()}", f"--temp-dir={self.root / 'ray'}", *_ports()],
            env=NODE_DEATH_DETECTION)  # fmt: skip

    def start_second(self) -> None:
        # SIGTERM drains the node first: its workers go on for up to this long (Ray's default: 30 s)
        drain = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": str(DRAIN_TIMEOUT_S)}
        self.second = self._start("second", [f"--address={self.address}", "--node-ip-address=127.0.0.1",
                                             "--num-cpus=1", *_ports()], env=drain)  # fmt: skip

    def wait_for_nodes(self, count: int, timeout_s: float = 90.0) -> None:
        """Until the cluster shows `count` live nodes (`ray status` through the head)."""
        deadline = time.monotonic() + timeout_s
        while True:
            for name, proc in (("head", self.head), ("second", self.second)):
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"ray start ({name}) exited: {self.logs[name].read_text()[-2000:]}")
            try:  # (`ray status` can take a minute to answer on a busy machine: ask again)
                done = subprocess.run([*RAY_START, "status", f"--address={self.address}"], env=self.env,
                                      capture_output=True, text=True, timeout=60)  # fmt: skip
                seen = f"{done.stdout[-1500:]}{done.stderr[-1500:]}"
                if done.returncode == 0 and done.stdout.count(" node_") >= count:
                    return
            except subprocess.TimeoutExpired:
                seen = "`ray status` did not answer within 60 s"
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not show {count} nodes: {seen}")
            time.sleep(1.0)

    def pids(self, proc: subprocess.Popen | None) -> list[int]:
        """`proc` and every process it started (its raylet, GCS, workers...)."""
        if proc is None:
            return []
        import psutil

        try:
            top = psutil.Process(proc.pid)
            return [proc.pid] + [c.pid for c in top.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def raylet_pid(self, proc: subprocess.Popen) -> int:
        import psutil

        for child in psutil.Process(proc.pid).children(recursive=True):
            if child.name() == "raylet":
                return child.pid
        raise RuntimeError("no raylet under this ray start")

    def kill(self, proc: subprocess.Popen | None, sig: int = signal.SIGKILL) -> None:
        """`proc` and its descendants (found before the first signal: orphans are re-parented)."""
        for pid in reversed(self.pids(proc)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if proc is not None:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def crash_second(self) -> None:
        """SIGKILL the second node's raylet (as a machine that dies); its other processes are kept in
        `leftovers`, to clean up later (`ray start --block` exits when its raylet dies, leaving them orphans)."""
        self.leftovers += self.pids(self.second)
        os.kill(self.raylet_pid(self.second), signal.SIGKILL)

    def stop_second(self) -> None:
        """SIGTERM to the second node's `ray start`, as a preemption notice stops a node: Ray drains it
        (DRAIN_TIMEOUT_S), then stops its processes."""
        self.second.send_signal(signal.SIGTERM)

    def ensure_second(self) -> None:
        """The second node up: as it is, or (after a crash or a stop) cleaned up by pid, started
        again, and joined (2 nodes)."""
        if self.second is not None and self.second.poll() is None and not self.leftovers:
            return
        kill_pids(self.leftovers)
        self.leftovers = []
        self.kill(self.second)
        self.start_second()
        self.wait_for_nodes(2)

    def stop(self) -> None:
        """Both nodes and everything they started, by pid, then anything else under our folder. SIGKILL:
        a test cluster has nothing to keep, and SIGTERM would drain each node (the head for Ray's 30 s)."""
        for proc in (self.second, self.head):
            self.kill(proc)
        kill_pids(self.leftovers)
        kill_under(self.root)


def kill_pids(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_under(root: Path) -> None:
    """SIGKILL every process whose command line names `root` (this cluster's GCS, raylets, workers)."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if str(root) in (proc / "cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ValueError):
            pass


def make_cluster(nodes: int = 2) -> RayProcesses:
    """A head (1 CPU) and, with nodes=2, a second node (1 CPU) joined with RAY_AUTH_MODE=token."""
    root = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's socket paths live under it
    home = root / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS")}
    caches = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")  # before HOME changes
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", HOME=str(home), RAY_AUTH_MODE="token",
               RAY_TMPDIR=str(root / "ray"), RAY_USAGE_STATS_ENABLED="0", XDG_CACHE_HOME=caches)  # fmt: skip
    cluster = RayProcesses(root, free_port(), free_port(), env)
    try:
        cluster.start_head()
        if nodes > 1:
            cluster.wait_for_nodes(1)
            cluster.start_second()
        cluster.wait_for_nodes(nodes)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def remove(cluster: RayProcesses) -> None:
    cluster.stop()
    shutil.rmtree(cluster.root, ignore_errors=True)
