"""One worker in this process, without Ray: the worker loop as the GPU tests and benchmarks reach it.

`scalesparse train` always goes through Ray Train; this runs the same entry point (loop.train_worker)
as the only rank of a one-process group, on this machine's first GPU when the config asks for one.
The group (the backend `launch` would pick) is created on the first call and kept, so many runs can
share a process (torch.distributed is initialised once per process).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from scalesparse.config import Config
from scalesparse.data import PreparedData


def join_single_group(cfg: Config) -> None:
    """Be rank 0 of a world of 1 (DeepSpeed and comm read the usual environment variables)."""
    from scalesparse import comm
    from scalesparse.launch import resolve_backend
    from scalesparse.train.engine import select_accelerator, use_cuda

    select_accelerator(cfg)
    if comm.is_distributed():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})  # fmt: skip
    comm.init_group(resolve_backend(cfg.parallel.backend, use_cuda(cfg)), 0, 1, "127.0.0.1", port)


def train_in_process(cfg: Config, data: PreparedData, resume: Path | None = None) -> list[dict[str, Any]]:
    """Train `cfg` (workers must be 1) in this process; returns the rows of its metrics.jsonl."""
    from scalesparse.train.loop import train_worker

    if cfg.parallel.workers != 1:
        raise ValueError(f"train_in_process runs one worker; parallel.workers is {cfg.parallel.workers}")
    join_single_group(cfg)
    run_dir = cfg.run_path
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    args = {"config": cfg.to_dict(), "run_dir": str(run_dir), "data": data.to_dict(),
            "resume": str(resume) if resume else None, "latest_at_launch": resume.name if resume else None}  # fmt: skip
    train_worker(args)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
