"""Ray: start or join a cluster and run a function on N Ray Train workers. Nothing else imports Ray.

Defaults are safe for a laptop: a local Ray bound to 127.0.0.1, its dashboard on 127.0.0.1 only
(Ray Train's placement-group cleaner polls the State API, which the dashboard serves; without it
every worker logs a warning each second), and no usage reporting.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scalesparse.config import Config
from scalesparse.errors import ScalesparseError


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
        ray.init(address=address, log_to_driver=True)
        return
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",
        log_to_driver=True,
        logging_level="WARNING",
    )


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _ray_progress(total: int, desc: str):
    # Ray forwards worker stdout line by line; tqdm_ray renders one live bar on the driver instead
    from ray.experimental import tqdm_ray

    return tqdm_ray.tqdm(total=total, desc=desc)


def _worker_entry(args: dict[str, Any]) -> None:
    from scalesparse.train.loop import train_worker

    train_worker(args, progress_factory=_ray_progress)


def run_workers(cfg: Config, args: dict[str, Any], address: str | None = None,
                entry: Callable[[dict[str, Any]], None] = _worker_entry) -> None:  # fmt: skip
    """Run a training `entry(args)` on cfg.parallel.workers Ray Train workers."""
    run_on_workers(
        entry, args, workers=cfg.parallel.workers, cpus_per_worker=cfg.resources.cpus_per_worker,
        gpus_per_worker=cfg.resources.gpus_per_worker, placement=cfg.resources.placement,
        backend=cfg.parallel.backend, storage=Path(args["run_dir"]) / "ray", name=cfg.name,
        max_failures=cfg.fault_tolerance.max_failures, address=address,
    )  # fmt: skip


def run_on_workers(entry: Callable[[dict[str, Any]], None], args: dict[str, Any], *, workers: int,
                   cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0, placement: str = "PACK",
                   backend: str = "auto", storage: Path, name: str, max_failures: int = 0,
                   address: str | None = None) -> None:  # fmt: skip
    """Run `entry(args)` on `workers` Ray Train workers that share a torch process group."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    # Logical CPUs: 2 workers × 1 CPU must fit on a 2-core laptop next to the driver.
    init_ray(address, num_cpus=None if address else max(float(os.cpu_count() or 1), workers * cpus_per_worker))
    gpu = gpus_per_worker > 0
    backend = backend if backend != "auto" else ("nccl" if gpu else "gloo")
    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpu else {})}
    trainer = TorchTrainer(
        entry,
        train_loop_config=args,
        torch_config=TorchConfig(backend=backend),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu, resources_per_worker=resources,
                                     placement_strategy=placement),  # fmt: skip
        run_config=RunConfig(
            name=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
            storage_path=str(Path(storage).resolve()),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    )
    try:
        trainer.fit()
    except TrainingFailedError as e:
        raise ScalesparseError(f"{name} failed on the workers: {_root_cause(e)}") from e


def _root_cause(e: BaseException) -> str:
    """The first worker's own exception, in one line (Ray wraps it with tracebacks)."""
    failures = getattr(e, "worker_failures", None) or {}
    for _rank, err in sorted(failures.items()):
        cause = err
        while getattr(cause, "cause", None) is not None:
            cause = cause.cause
        text = str(cause).strip().splitlines()
        if text:
            return f"{type(cause).__name__}: {text[-1]}"
    return str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
