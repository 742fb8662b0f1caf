"""Fault injection: SIGKILL a training worker mid-run, to prove `fault_tolerance.max_failures` works.

Reads what the run itself records (workers/rank{r}.json: pid and host; checkpoints/latest;
metrics.jsonl), so it works against any run on this host, tests and benchmarks alike.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from scalesparse.train import checkpoint as ckpt
from scalesparse.train.metrics import read_metrics


@dataclass
class Kill:
    rank: int
    pid: int | None = None
    at_step: int | None = None
    """The last step rank 0 had logged when the kill was sent."""
    checkpoint: str | None = None
    """The complete checkpoint the restart must resume from."""
    time: float | None = None


def worker_info(run_dir: Path, rank: int) -> dict | None:
    try:
        return json.loads((Path(run_dir) / "workers" / f"rank{rank}.json").read_text())
    except (FileNotFoundError, ValueError):
        return None


def when_run_reaches(run_dir: Path, after_checkpoint: int, after_step: int, action: Callable[[int, str], bool],
                     timeout_s: float = 300.0) -> threading.Thread:  # fmt: skip
    """Start a thread that calls `action(last_step, latest_checkpoint)` once checkpoint `after_checkpoint`
    is complete and rank 0 has logged `after_step` (so some work past the checkpoint is lost); an action
    that returns False (not ready) is tried again."""
    want = ckpt.tag_for(after_checkpoint)

    def watch() -> None:
        deadline = time.time() + timeout_s
        root = Path(run_dir) / "checkpoints"
        while time.time() < deadline:
            latest = (root / ckpt.LATEST).read_text().strip() if (root / ckpt.LATEST).is_file() else None
            steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
            if latest and latest >= want and steps and steps[-1] >= after_step and action(steps[-1], latest):
                return
            time.sleep(0.01)

    thread = threading.Thread(target=watch, daemon=True, name="chaos")
    thread.start()
    return thread


def kill_worker_when(run_dir: Path, rank: int, after_checkpoint: int, after_step: int,
                     timeout_s: float = 300.0) -> tuple[threading.Thread, Kill]:  # fmt: skip
    """SIGKILL `rank` once checkpoint `after_checkpoint` is complete and rank 0 has logged `after_step`."""
    kill = Kill(rank)

    def act(step: int, latest: str) -> bool:
        info = worker_info(run_dir, rank)
        if not info:
            return False
        if info["host"] != socket.gethostname():
            raise RuntimeError(f"rank {rank} runs on {info['host']}, not on this host")
        kill.pid, kill.at_step, kill.checkpoint, kill.time = info["pid"], step, latest, time.time()
        os.kill(info["pid"], signal.SIGKILL)
        return True

    return when_run_reaches(run_dir, after_checkpoint, after_step, act, timeout_s), kill


def recovery_times(run_dir: Path, kill: Kill) -> dict[str, float]:
    """Seconds from the kill to the replacement worker starting, and to its first logged step."""
    info = worker_info(run_dir, kill.rank) or {}
    after = [r["time"] for r in read_metrics(run_dir) if "time" in r and r["time"] > (kill.time or 0)]
    return {
        "worker_restarted_s": info.get("started", float("nan")) - kill.time,
        "training_again_s": (min(after) if after else float("nan")) - kill.time,
    }
