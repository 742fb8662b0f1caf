"""Ray: start or join a cluster and run a function on N workers (Ray Train for training, a plain gang
of actors for one-shot jobs). Nothing else imports Ray.

Defaults are safe for a laptop: a local Ray bound to 127.0.0.1, its dashboard on 127.0.0.1 only
(Ray Train's placement-group cleaner polls the State API, which the dashboard serves; without it
every worker logs a warning each second), and no usage reporting.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from scalesparse.config import Config
from scalesparse.errors import LaunchError, ScalesparseError

# Ports Ray listens on when an address leaves the port out: GCS, Ray Client, dashboard / Jobs API.
DEFAULT_PORTS = {"": 6379, "ray": 10001, "http": 8265, "https": 443}
CONNECT_TIMEOUT_S = 5.0
_EMBEDDED = False  # this process started its own local Ray (rather than joining one)


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
    if not address:
        # On Linux Ray swaps a loopback node address for the routable one so other machines can
        # join; a local embedded Ray serves this machine only, so keep everything on 127.0.0.1.
        # (Read when Ray is first imported, hence before the import.)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return
    if address:
        try:
            ray.init(address=address, log_to_driver=True)
        except Exception as e:
            if _auth_refused(e):
                # Ray 2.60 turns token auth on for a `ray start` head whenever ~/.ray/auth_token exists
                # there, but a joining driver only uses a token when RAY_AUTH_MODE=token says so (and
                # guessing it breaks joining a cluster without auth: its workers cannot call back)
                raise LaunchError(
                    f"--address {address}: the cluster requires token authentication; export RAY_AUTH_MODE=token "
                    "with the head's token in RAY_AUTH_TOKEN or ~/.ray/auth_token (`ray get-auth-token` on the "
                    "head prints it)"
                ) from None
            raise
        return
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",
        log_to_driver=True,
        logging_level="WARNING",
    )
    global _EMBEDDED
    _EMBEDDED = True  # this process started it: see runs_locally


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


def _ray_progress(total: int, desc: str):
    # Ray forwards worker stdout line by line; tqdm_ray renders one live bar on the driver instead
    from ray.experimental import tqdm_ray

    return tqdm_ray.tqdm(total=total, desc=desc)


def _worker_entry(args: dict[str, Any]) -> None:
    from scalesparse.train.loop import train_worker

    _record_worker(Path(args["run_dir"]))
    train_worker(args, progress_factory=_ray_progress)


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
    what = f"resources.gpus_per_worker: {workers} workers × {gpus_per_worker:g} GPU need {want:g} GPUs"
    if runs_locally(address):
        raise LaunchError(f"{what}; this machine has {have:g}"
                          + ("" if have else " (no CUDA device; use resources.gpus_per_worker=0 on CPU)"))  # fmt: skip
    print(f"warning: {what}, the cluster has {have:g} now; waiting for its autoscaler to add GPU nodes", flush=True)


def run_workers(cfg: Config, args: dict[str, Any], address: str | None = None,
                entry: Callable[[dict[str, Any]], None] = _worker_entry) -> None:  # fmt: skip
    """Run a training `entry(args)` on cfg.parallel.workers Ray Train workers."""
    ft = cfg.fault_tolerance
    run_on_workers(
        entry, args, workers=cfg.parallel.workers, cpus_per_worker=cfg.resources.cpus_per_worker,
        gpus_per_worker=cfg.resources.gpus_per_worker, placement=cfg.resources.placement,
        backend=cfg.parallel.backend, storage=Path(args["run_dir"]) / "ray", name=cfg.name,
        max_failures=ft.max_failures, address=address, start_timeout_s=ft.restart_timeout_s if ft.elastic else None,
    )  # fmt: skip


def run_on_workers(entry: Callable[[dict[str, Any]], None], args: dict[str, Any], *, workers: int,
                   cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0, placement: str = "PACK",
                   backend: str = "auto", storage: Path, name: str, max_failures: int = 0,
                   address: str | None = None, start_timeout_s: float | None = None) -> None:  # fmt: skip
    """Run `entry(args)` on `workers` Ray Train workers that share a torch process group.

    `start_timeout_s`: give up (raise) when a worker group cannot get its resources within that
    time, instead of Ray Train's default of waiting and retrying forever; the caller can then
    continue on fewer workers (fault_tolerance.elastic)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    # Logical CPUs: 2 workers × 1 CPU must fit on a 2-core laptop next to the driver.
    _connect(address, workers * cpus_per_worker)
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
        failure = FailureConfig(max_failures=max_failures, controller_failure_limit=0)
    trainer = TorchTrainer(
        entry,
        train_loop_config=args,
        torch_config=TorchConfig(backend=backend),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu, resources_per_worker=resources,
                                     placement_strategy=placement),  # fmt: skip
        run_config=RunConfig(
            name=_unique(name),
            storage_path=str(Path(storage).resolve()),
            failure_config=failure,
        ),
    )
    try:
        trainer.fit()
    except TrainingFailedError as e:
        raise ScalesparseError(f"{name} failed on the workers: {_root_cause(e)}") from e
    finally:
        if saved_timeout is None:
            os.environ.pop(timeout_var, None)
        else:
            os.environ[timeout_var] = saved_timeout


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

    def free_port(self) -> tuple[str, int]:
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def run(self, entry, args, rank: int, world: int, master: tuple[str, int], backend: str, threads: int):
        import torch

        from scalesparse import comm

        torch.set_num_threads(threads)
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
        master = ray.get(actors[0].free_port.remote())
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

    client = JobSubmissionClient(address)
    entry = [python, "-m", "scalesparse", "train", "config.yaml"] + (["--resume", resume] if resume else [])
    with tempfile.TemporaryDirectory(prefix="scalesparse-submit-") as tmp:
        (Path(tmp) / "config.yaml").write_text(cfg.to_yaml())
        job_id = client.submit_job(
            entrypoint=shlex.join(entry),
            submission_id=_unique(f"scalesparse-{cfg.name}"),
            runtime_env={"working_dir": tmp, "env_vars": {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}},
        )
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
