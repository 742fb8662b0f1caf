"""Ray: start or join a cluster and run a function on N workers (Ray Train for training, a plain gang
of actors for one-shot jobs). Nothing else imports Ray.

Defaults are safe for a laptop: a local Ray whose every process listens on 127.0.0.1 only (GCS,
raylet, workers, agents; its dashboard too: Ray Train's placement-group cleaner polls the State API,
which the dashboard serves, and without it every worker logs a warning each second), the workers'
torch.distributed store and gloo sockets on 127.0.0.1 as well, and no usage reporting. A cluster
(joined with --address, or built with `ray start`) listens where its nodes' addresses say.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shlex
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from scalesparse.config import Config
from scalesparse.errors import LaunchError, ScalesparseError
from scalesparse.progress import ROUTINE_PATTERN

# Ports Ray listens on when an address leaves the port out: GCS, Ray Client, dashboard / Jobs API.
DEFAULT_PORTS = {"": 6379, "ray": 10001, "http": 8265, "https": 443}
CONNECT_TIMEOUT_S = 5.0
_EMBEDDED = False  # this process started its own local Ray (rather than joining one)


class WorkersFailed(ScalesparseError):
    """The workers ran and failed (as opposed to a refusal before any worker started)."""


def check_reachable(address: str | None, flag: str = "--address", timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail in seconds, naming the address, when nothing listens there.

    ray.init and the Jobs client retry an unreachable address for a minute or more before giving
    up with a long traceback; one TCP connect tells the user the same thing at once. No address:
    $RAY_ADDRESS, as `init_ray` would join.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if not address or address in ("auto", "local"):
        return
    parts = urlsplit(address if "://" in address else f"//{address}")
    scheme = parts.scheme.lower()
    try:
        host, port = parts.hostname, parts.port or DEFAULT_PORTS.get(scheme)
    except ValueError:
        host = port = None
    if not host or port is None:
        raise LaunchError(f"{flag} {address}: not a Ray address (expected HOST:PORT, ray://HOST:PORT or http://HOST:PORT)")
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        why = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise LaunchError(f"{flag} {address}: cannot reach {host}:{port} ({why}); is the Ray head running?") from None


def init_ray(address: str | None = None, num_cpus: float | None = None) -> None:
    """Join `address` (or $RAY_ADDRESS), else start an embedded local Ray. Idempotent."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray holds back a line that several workers print (to print it once, counted) for seconds, or
    # until shutdown, when the run's Console no longer keeps routine notices off the terminal: let
    # those through at once. (Read when Ray is first imported.)
    os.environ.setdefault("RAY_DEDUP_LOGS_ALLOW_REGEX", f"__ray_testing_never_deduplicate__|{ROUTINE_PATTERN}")
    loopback = not address or _loopback_only(address)
    if loopback:
        # On Linux Ray swaps a loopback node address (even an explicit _node_ip_address) for the
        # routable one so that other machines can join, and then every Ray process listens there or on
        # all interfaces; a local embedded Ray serves this machine only, so keep it on 127.0.0.1. So
        # does a driver joining a cluster at 127.0.0.1 (else it looks for the head at the routable
        # address, where nothing listens, and waits). Read when Ray is first imported (hence before
        # the import) by this process and by the ones it starts.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return
    if loopback and os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0":
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False  # Ray was imported before the line above could count
    if address:
        try:
            ray.init(address=address, log_to_driver=True)
        except Exception as e:
            if _auth_refused(e):
                # Ray 2.60 turns token auth on for a `ray start` head whenever ~/.ray/auth_token exists
                # there, but a joining driver only uses a token when RAY_AUTH_MODE=token says so (and
                # guessing it breaks joining a cluster without auth: its workers cannot call back)
                raise LaunchError(_token_advice(address)) from None
            raise
        return
    dashboard_port = _free_loopback_port(preferred=DEFAULT_PORTS["http"])
    # Ray Train's placement-group cleaner finds the State API by looking for *a* local Ray (and fails,
    # printing a traceback, when another one runs on this machine); name ours to Ray's processes,
    # which inherit the variable, and to no one else (the test session's later drivers, say).
    with _environment(RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{dashboard_port}"):
        ray.init(
            # "local": a new Ray of our own, always. Without an address ray.init joins the cluster that
            # Ray's temp folder names (ray_current_cluster: the last `ray start` on this machine, running
            # or long dead) and then refuses num_cpus with a traceback.
            address="local",
            num_cpus=num_cpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=dashboard_port,
            _node_ip_address="127.0.0.1",
            log_to_driver=True,
            logging_level="WARNING",
        )
    global _EMBEDDED
    _EMBEDDED = True  # this process started it: see runs_locally


def _loopback_only(address: str) -> bool:
    """Is `address` (HOST:PORT) a Ray head on this machine's loopback and only there? Ray looks for a
    head at 127.0.0.1 under the machine's routable address instead (where a `ray start` that was asked
    for 127.0.0.1 on Linux also puts its node); a head kept on loopback is not found there."""
    parts = urlsplit(address if "://" in address else f"//{address}")
    try:
        host, port = parts.hostname, parts.port or DEFAULT_PORTS.get(parts.scheme.lower())
    except ValueError:
        return False
    if not host or port is None or not _is_loopback(host):
        return False
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("8.8.8.8", 80))  # (UDP: no packet is sent; picks the routable interface, as Ray does)
            routable = s.getsockname()[0]
    except OSError:
        return True
    if _is_loopback(routable):
        return True
    try:
        socket.create_connection((routable, port), timeout=1.0).close()
    except OSError:
        return True
    return False


def _free_loopback_port(preferred: int = 0) -> int:
    """`preferred` if nothing listens there on 127.0.0.1, else a free port."""
    for port in (preferred, 0) if preferred else (0,):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise LaunchError("no free port on 127.0.0.1")


@contextlib.contextmanager
def _environment(**values: str):
    """Set environment variables for the processes started inside the block, then restore them."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _token_advice(address: str) -> str:
    return (f"--address {address}: the cluster requires token authentication; export RAY_AUTH_MODE=token "
            "with the head's token in RAY_AUTH_TOKEN or ~/.ray/auth_token (`ray get-auth-token` on the "
            "head prints it)")  # fmt: skip


def _auth_refused(e: BaseException) -> bool:
    while e is not None:
        if type(e).__name__ == "AuthenticationError" or "InvalidAuthToken" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _connect(address: str | None, cpus_needed: float = 0.0) -> None:
    """Join `address`, or start a local Ray with logical CPUs for the work (at least the machine's)."""
    init_ray(address, num_cpus=None if address else max(float(os.cpu_count() or 1), cpus_needed))


def _unique(name: str) -> str:
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def shutdown_ray() -> None:
    import ray

    global _EMBEDDED
    if ray.is_initialized():
        ray.shutdown()
    _EMBEDDED = False


def _worker_entry(args: dict[str, Any]) -> None:
    from scalesparse.train.loop import train_worker

    _record_worker(Path(args["run_dir"]))
    train_worker(args, progress_factory=_board_progress(args.get("progress_board")))


class _ProgressBoard:
    """Where rank 0 posts its progress and the driver takes it (a Ray actor: a worker's own output
    reaches the driver only as prefixed log lines, where a terminal's bar cannot be drawn)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def post(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def take(self) -> list[dict[str, Any]]:
        events, self.events = self.events, []
        return events


def _board_progress(board: tuple[str, str] | None):
    """Rank 0's progress factory when the driver shows progress: reports to its board."""
    if board is None:
        return None
    import ray

    from scalesparse.progress import RemoteProgress

    handle = ray.get_actor(board[0], namespace=board[1])
    return lambda total, desc: RemoteProgress(handle.post.remote, total, desc)


@contextlib.contextmanager
def _progress_board(view, interval_s: float = 0.25):
    """A board for rank 0 to post to, followed by a thread that feeds `view` (the driver's bar or
    lines) until the block ends; yields the board's (name, namespace) for the workers, or None."""
    if view is None:
        yield None
        return
    import ray

    name = _unique("scalesparse-progress")
    board = ray.remote(_ProgressBoard).options(name=name, num_cpus=0).remote()
    stop = threading.Event()

    def follow() -> None:
        while not stop.wait(interval_s):
            try:
                events = ray.get(board.take.remote())
            except Exception:  # Ray going down under a failed run: the run's own error says why
                return
            view.feed(events)

    thread = threading.Thread(target=follow, name="scalesparse-progress", daemon=True)
    thread.start()
    try:
        yield name, ray.get_runtime_context().namespace
    finally:  # (never raising: a failed run's own error is the one to see)
        stop.set()
        thread.join(timeout=30)
        try:
            view.feed(ray.get(board.take.remote(), timeout=10))  # what came after the last look
            ray.kill(board)
        except Exception:
            pass
        view.close()


def _record_worker(run_dir: Path) -> None:
    """workers/rank{r}.json: where each rank runs (node, pid), for operators and chaos tests."""
    import ray

    from scalesparse import comm

    rank = comm.rank()
    folder = run_dir / "workers"
    folder.mkdir(parents=True, exist_ok=True)
    info = {"rank": rank, "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
            "host": socket.gethostname(), "started": time.time()}  # fmt: skip
    tmp = folder / f".rank{rank}.json.tmp"
    tmp.write_text(json.dumps(info))
    os.replace(tmp, folder / f"rank{rank}.json")


def resolve_backend(backend: str, gpu: bool) -> str:
    """auto: gloo on CPU; on GPUs NCCL for CUDA tensors and gloo for CPU ones (counts, hashes,
    objects), so no collective has to move small CPU-side values to the device first."""
    if backend != "auto":
        return backend
    return "cpu:gloo,cuda:nccl" if gpu else "gloo"


def runs_locally(address: str | None) -> bool:
    """Will this process start its own embedded Ray (so this machine's devices are all there is)?
    Not when it joins a cluster, nor inside a Ray task or job (a sweep's runs), which is on one."""
    ray = sys.modules.get("ray")
    inside = ray is not None and ray.is_initialized() and not _EMBEDDED
    return not (address or os.environ.get("RAY_ADDRESS") or inside)


def check_gpus(workers: int, gpus_per_worker: float, address: str | None, visible: int | None = None) -> None:
    """Refuse, before any worker starts, a run that asks for GPUs this machine's Ray does not have
    (Ray would otherwise wait for them forever); on a joined cluster, where an autoscaler may still
    add GPU nodes, say what is missing and go on. `visible`: this machine's CUDA devices, for a local
    run checked before Ray is started (the driver does, ahead of data preparation)."""
    if gpus_per_worker <= 0:
        return
    if visible is None:
        import ray

        have = float(ray.cluster_resources().get("GPU", 0.0))
    else:
        have = float(visible)
    want = workers * gpus_per_worker
    if have >= want:
        return
    what = (f"resources.gpus_per_worker: {workers} worker{'s' * (workers != 1)} × {gpus_per_worker:g} GPU "
            f"need{'s' * (workers == 1)} {want:g} GPU{'s' * (want != 1)}")  # "1 worker × 1 GPU needs 1 GPU"
    if runs_locally(address):
        raise LaunchError(f"{what}; this machine has {have:g}"
                          + ("" if have else " (no CUDA device; use resources.gpus_per_worker=0 on CPU)"))  # fmt: skip
    print(f"warning: {what}, the cluster has {have:g} now; waiting for its autoscaler to add GPU nodes", flush=True)


def run_workers(cfg: Config, args: dict[str, Any], address: str | None = None,
                entry: Callable[[dict[str, Any]], None] = _worker_entry, progress=None) -> None:  # fmt: skip
    """Run a training `entry(args)` on cfg.parallel.workers Ray Train workers; `progress`: the
    driver's view of rank 0's progress (scalesparse.progress.ProgressView), if it shows one."""
    ft = cfg.fault_tolerance
    run_on_workers(
        entry, args, workers=cfg.parallel.workers, cpus_per_worker=cfg.resources.cpus_per_worker,
        gpus_per_worker=cfg.resources.gpus_per_worker, placement=cfg.resources.placement,
        backend=cfg.parallel.backend, storage=Path(args["run_dir"]) / "ray", name=cfg.name,
        max_failures=ft.max_failures, address=address, start_timeout_s=ft.restart_timeout_s if ft.elastic else None,
        progress=progress,
    )  # fmt: skip


def run_on_workers(entry: Callable[[dict[str, Any]], None], args: dict[str, Any], *, workers: int,
                   cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0, placement: str = "PACK",
                   backend: str = "auto", storage: Path, name: str, max_failures: int = 0,
                   address: str | None = None, start_timeout_s: float | None = None,
                   progress=None) -> None:  # fmt: skip
    """Run `entry(args)` on `workers` Ray Train workers that share a torch process group.

    `start_timeout_s`: give up (raise) when a worker group cannot get its resources within that
    time, instead of Ray Train's default of waiting and retrying forever, and at once when a node is
    preempted (drained; Ray Train would restart at full size and wait that long for a replacement);
    the caller can then continue on fewer workers (fault_tolerance.elastic). `progress`: a view the
    driver feeds with what rank 0 reports (args["progress_board"] tells the workers where to report)."""
    # Logical CPUs: 2 workers × 1 CPU must fit on a 2-core laptop next to the driver. (Ray is
    # started before anything imports it: see init_ray.)
    _connect(address, workers * cpus_per_worker)
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    check_gpus(workers, gpus_per_worker, address)
    # Ray Train 2.5x routes a worker's print() through its logger (to the driver's stderr) *and* its
    # stdout, so every line reached the terminal twice; the driver propagates this switch to workers.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    gpu = gpus_per_worker > 0
    backend = resolve_backend(backend, gpu)
    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpu else {})}
    failure = FailureConfig(max_failures=max_failures)
    timeout_var = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
    saved_timeout = os.environ.get(timeout_var)
    if start_timeout_s is not None:  # read by Ray Train's controller, which the driver passes it to
        os.environ[timeout_var] = str(start_timeout_s)
        failure = FailureConfig(max_failures=max_failures, controller_failure_limit=0, max_preemption_failures=0)
    torch_config = _loopback_torch_config(backend) if _loopback_cluster() else TorchConfig(backend=backend)
    try:
        with _progress_board(progress) as board:
            trainer = _interruptible(TorchTrainer)(
                entry,
                train_loop_config={**args, "progress_board": board} if board else args,
                torch_config=torch_config,
                scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu, resources_per_worker=resources,
                                             placement_strategy=placement),  # fmt: skip
                run_config=RunConfig(
                    name=_unique(name),
                    storage_path=str(Path(storage).resolve()),
                    failure_config=failure,
                ),
            )
            trainer.fit()
    except TrainingFailedError as e:
        raise WorkersFailed(f"{name} failed on the workers: {_root_cause(e)}") from e
    finally:
        if saved_timeout is None:
            os.environ.pop(timeout_var, None)
        else:
            os.environ[timeout_var] = saved_timeout


def _interruptible(trainer_cls: type) -> type:
    """`trainer_cls` with Ctrl-C reaching the driver as KeyboardInterrupt. Ray Train's fit() installs
    its own SIGINT handler on the main thread, which asks its controller to abort and then ends the
    process with status 1 and no word; the driver instead says which checkpoint to continue from
    (train/driver.py), and its exit stops the workers (a local Ray is shut down; on a cluster, the
    job's actors share the driver's fate). tests/train/test_interrupt.py sends a real SIGINT; a Ray
    that no longer has the hook fails tests/train/test_driver_messages.py at once."""

    class Interruptible(trainer_cls):
        def _register_sigint_handler(self, *args, **kwargs) -> None:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    return Interruptible


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _loopback_cluster() -> bool:
    """Does every node of the Ray we are on live at a loopback address (the embedded local Ray, or a
    cluster simulated on this machine)? Then the workers' own sockets belong there too."""
    import ray

    return all(_is_loopback(n["NodeManagerAddress"]) for n in ray.nodes() if n.get("Alive"))


# Rank 0's rendezvous store servers, alive as long as its process: torch's process group keeps using them.
_STORES: list[Any] = []


def _serve_store_on_loopback() -> int:
    """Rank 0's store server on 127.0.0.1 only (comm.serve_store_on_loopback); its port."""
    from scalesparse import comm

    port, store = comm.serve_store_on_loopback()
    _STORES.append(store)
    return port


def _loopback_interface() -> str:
    import psutil  # Ray's own dependency

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == "127.0.0.1" for a in addrs):
            return name
    return "lo"


def _use_loopback_sockets() -> None:
    """gloo (CPU collectives) and NCCL's bootstrap listen on the interface these name; by default gloo
    takes the one the host name resolves to, NCCL any but loopback."""
    lo = _loopback_interface()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", lo)
    os.environ.setdefault("NCCL_SOCKET_IFNAME", lo)


def _rendezvous_on_loopback(port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    _use_loopback_sockets()


def _loopback_torch_config(backend: str):
    """Ray Train's TorchConfig, but the process group's store and sockets listen on 127.0.0.1 only.

    Ray Train's torch backend picks rank 0's node address and a free port and lets
    init_process_group start the store there, which listens on every interface; this one starts the
    store first (`_serve_store_on_loopback`), then does the rest of Ray's setup as Ray does it."""
    import ray
    from ray.train.torch import TorchConfig
    from ray.train.torch import config as ray_torch

    class LoopbackTorchBackend(ray_torch._TorchBackend):
        def on_start(self, worker_group, backend_config) -> None:
            port = worker_group.execute_single(0, _serve_store_on_loopback)
            worker_group.execute(_rendezvous_on_loopback, port)
            worker_group.execute(ray_torch._set_torch_distributed_env_vars)
            ray.get([worker_group.execute_single_async(i, ray_torch._setup_torch_process_group,
                                                       backend=backend_config.backend, world_rank=i,
                                                       world_size=len(worker_group), init_method="env://",
                                                       timeout_s=backend_config.timeout_s)
                     for i in range(len(worker_group))])  # fmt: skip

    class LoopbackTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return LoopbackTorchBackend

    return LoopbackTorchConfig(backend=backend)


def worker_slots(cpus_per_worker: float, gpus_per_worker: float = 0.0, address: str | None = None) -> int:
    """How many workers of this size the cluster's live nodes hold in all (busy or not)."""
    _connect(address)
    import ray

    slots = 0
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        have = node.get("Resources", {})
        fit = int(have.get("CPU", 0.0) // cpus_per_worker) if cpus_per_worker > 0 else 1 << 30
        if gpus_per_worker > 0:
            fit = min(fit, int(have.get("GPU", 0.0) // gpus_per_worker))
        slots += fit
    return slots


PLACEMENT_TIMEOUT_S = 300.0  # room for an autoscaler to add nodes; then a clear error, not a hang


class _GangMember:
    """One rank of `run_on_actors`: a plain Ray actor (made remote there, so importing launch needs no Ray)."""

    def free_port(self, loopback: bool = False) -> tuple[str, int]:
        import ray

        if loopback:  # this rank hosts the store, on 127.0.0.1 only (init_group's store reuses it)
            return "127.0.0.1", _serve_store_on_loopback()
        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def run(self, entry, args, rank: int, world: int, master: tuple[str, int], backend: str, threads: int):
        import torch

        from scalesparse import comm

        torch.set_num_threads(threads)
        if _is_loopback(master[0]):
            _use_loopback_sockets()
        comm.init_group(backend, rank, world, *master)
        # No try/finally: a rank that raises keeps its process group up until the driver kills the
        # gang, so its peers block instead of failing on the teardown and hiding the real error.
        result = entry(args)
        comm.close_group()
        return result


def run_on_actors(entry: Callable[[dict[str, Any]], Any], args: dict[str, Any], *, workers: int,
                  cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0, placement: str = "PACK",
                  backend: str = "auto", name: str, address: str | None = None) -> list[Any]:  # fmt: skip
    """Run `entry(args)` on `workers` plain Ray actors sharing a torch process group; each rank's result.

    For one-shot jobs (pruning) that need neither restarts nor checkpoints: a gang of actors in one
    placement group starts in ~5 s where a Ray Train run spends ~20 s on its controller, worker group
    and storage before the first line of user code. One rank failing stops them all.
    """
    _connect(address, workers * cpus_per_worker)
    check_gpus(workers, gpus_per_worker, address)
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    gpu = gpus_per_worker > 0
    backend = resolve_backend(backend, gpu)
    bundle = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpu else {})}
    group = placement_group([bundle] * workers, strategy=placement)
    actors = []
    try:
        ready, _ = ray.wait([group.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            raise LaunchError(f"{name}: cannot place {workers} workers × {bundle} ({placement}) within "
                              f"{PLACEMENT_TIMEOUT_S:.0f} s; the cluster has {ray.cluster_resources()}")  # fmt: skip
        member = ray.remote(_GangMember)
        actors = [member.options(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker,
                                 scheduling_strategy=PlacementGroupSchedulingStrategy(group, r)).remote()
                  for r in range(workers)]  # fmt: skip
        master = ray.get(actors[0].free_port.remote(_loopback_cluster()))
        threads = max(1, int(cpus_per_worker))
        refs = [a.run.remote(entry, args, r, workers, master, backend, threads) for r, a in enumerate(actors)]
        pending = list(refs)
        while pending:  # the first failure ends the run: the others would wait in a collective forever
            done, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(done[0])
            except Exception as e:
                raise ScalesparseError(f"{name} failed on the workers: {_one_line(e)}") from e
        return ray.get(refs)
    finally:
        for actor in actors:
            ray.kill(actor)
        remove_placement_group(group)


def _one_line(e: BaseException) -> str:
    """A worker's own exception in one line (Ray wraps it, with tracebacks, in `.cause` chains)."""
    while getattr(e, "cause", None) is not None:
        e = e.cause
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1]}" if text else type(e).__name__


def _root_cause(e: BaseException) -> str:
    """The first failed Ray Train worker's own exception, in one line."""
    failures = getattr(e, "worker_failures", None) or {}
    for _rank, err in sorted(failures.items()):
        return _one_line(err)
    return str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__


def submit_job(cfg: Config, *, address: str | None, resume: str | None = None, python: str = "python",
               wait: bool = True) -> int:  # fmt: skip
    """`scalesparse submit`: run `scalesparse train` as a Ray Job; stream its logs, return its exit code.

    The config travels resolved (overrides applied, validated here) as the job's working dir, so
    the cluster runs exactly what was checked on the laptop. Paths inside it (run_dir, data cache)
    are the cluster's: point them at shared storage.
    """
    import asyncio
    import tempfile

    address = address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"
    if "://" not in address:
        address = f"http://{address}"
    if address.startswith("ray://"):
        raise LaunchError(f"--address {address}: submit talks to the Ray Jobs API; give the dashboard's "
                          "http://HOST:8265 address (ray:// is for `scalesparse train --address`)")  # fmt: skip
    check_reachable(address)
    if not cfg.run_path.is_absolute():
        print(f"warning: run_dir {cfg.run_dir!r} is relative: on the cluster it lands inside the job's temporary "
              "working directory; set an absolute path on shared storage to keep the checkpoints", flush=True)
    from ray.job_submission import JobStatus, JobSubmissionClient

    entry = [python, "-m", "scalesparse", "train", "config.yaml"] + (["--resume", resume] if resume else [])
    try:
        client = JobSubmissionClient(address)
        with tempfile.TemporaryDirectory(prefix="scalesparse-submit-") as tmp:
            (Path(tmp) / "config.yaml").write_text(cfg.to_yaml())
            job_id = client.submit_job(
                entrypoint=shlex.join(entry),
                submission_id=_unique(f"scalesparse-{cfg.name}"),
                runtime_env={"working_dir": tmp, "env_vars": {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}},
            )
    except Exception as e:
        if _auth_refused(e):  # the Jobs API of a token-auth cluster, asked without the token
            raise LaunchError(_token_advice(address)) from None
        raise
    print(f"submitted job {job_id} to {address}", flush=True)
    if not wait:
        return 0

    async def follow() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(follow())
    except KeyboardInterrupt:
        print(f"\nstopped following; the job keeps running (ray job stop {job_id} --address {address})")
        raise
    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    info = client.get_job_info(job_id)
    while info.status not in terminal:  # the log stream can close a moment before the status settles
        time.sleep(0.5)
        info = client.get_job_info(job_id)
    code = getattr(info, "driver_exit_code", None)
    if code is None:
        code = 0 if info.status == JobStatus.SUCCEEDED else 1
    print(f"job {job_id}: {info.status.value}, exit code {code}", flush=True)
    return int(code)


def cluster_cpus(address: str | None = None) -> float:
    _connect(address)
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


def run_tasks(fn: Callable[[Any], Any], items: list[Any], *, max_concurrent: int,
              on_done: Callable[[Any, Any], None], address: str | None = None) -> None:  # fmt: skip
    """Run `fn(item)` as Ray tasks, at most `max_concurrent` at a time; `on_done(item, result)` as each
    finishes, in completion order. A task that raises yields {"error": one line}, never an exception.

    The tasks take no CPU of their own: each one drives a Ray Train job whose workers reserve the
    CPUs, so the cap (not Ray's scheduler) keeps concurrent jobs from waiting on each other.
    """
    _connect(address)
    import ray

    remote = ray.remote(num_cpus=0, max_retries=0)(fn)
    queue, pending = list(items), {}
    while queue or pending:
        while queue and len(pending) < max(1, max_concurrent):
            item = queue.pop(0)
            pending[remote.remote(item)] = item
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            item = pending.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as e:  # the task's process died, or fn raised
                text = str(e).strip().splitlines()
                result = {"error": f"{type(e).__name__}: {text[-1] if text else ''}"}
            on_done(item, result)
