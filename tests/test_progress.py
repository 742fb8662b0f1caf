"""Progress a person sees: rank 0 reports, the driver draws a bar on a terminal and one plain line
per log step otherwise; the driver's Console keeps routine notices in the run's log only."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import yaml

from scalesparse.progress import Console, LineProgress, ProgressView, RemoteProgress
from tests.conftest import REPO, tiny_config


def lines_of(total: int, every: int, start: int, steps: int) -> list[str]:
    out: list[str] = []
    p = LineProgress(total, "run", every, out=out.append)
    p.update(start)  # the loop's first call: where the run starts
    for i in range(steps):
        p.set_description(f"run loss {i}")
        p.update(1)
    p.close()
    return out


def test_one_line_every_log_step_and_at_the_end():
    out = lines_of(total=10, every=3, start=0, steps=10)
    assert [re.search(r"step (\d+)/10", line).group(1) for line in out] == ["3", "6", "9", "10"]
    assert out[0].startswith("run loss 2 | step 3/10 (30%) |") and "elapsed" in out[0] and "left" in out[0]


def test_a_resumed_run_counts_from_its_starting_step():
    out = lines_of(total=10, every=3, start=4, steps=6)
    assert [re.search(r"step (\d+)/10", line).group(1) for line in out] == ["6", "9", "10"]


def rank0_events(total: int, every: int, eval_every: int, start: int = 0, run: str = "a") -> list[dict]:
    """What the loop's calls on rank 0's RemoteProgress post, for a run that steps instantly."""
    events: list[dict] = []
    p = RemoteProgress(events.append, total, "run", interval_s=3600)  # only the forced reports
    p.id = run
    p.update(start)
    if start == 0:
        p.write("step 0: val_loss 9")
    for step in range(start + 1, total + 1):
        if step % every == 0 or step == total:
            p.set_description(f"run loss {step}")
        p.update(1)
        if step % eval_every == 0:
            p.write(f"step {step}: val_loss {step}")
    p.close()
    return events


class FakeConsole:
    def __init__(self) -> None:
        import threading

        self.lock, self.bar, self.logged = threading.RLock(), None, []

    def log_only(self, line: str) -> None:
        self.logged.append(line)


def test_the_driver_prints_rank0s_log_steps_and_lines_in_order(capsys):
    view = ProgressView(every=3, console=None, terminal=False)
    view.feed(rank0_events(total=10, every=3, eval_every=5))
    view.close()
    out = capsys.readouterr().out.splitlines()
    steps = [re.search(r"(step \d+/10|val_loss \d+)", line).group(1) for line in out]
    assert steps == ["val_loss 9", "step 3/10", "val_loss 5", "step 6/10", "step 9/10", "step 10/10",
                     "val_loss 10"]  # fmt: skip
    assert out[1].startswith("run loss 3 | step 3/10 (30%) |")


def test_a_restarted_rank0_starts_a_new_count(capsys):
    view = ProgressView(every=2, console=None, terminal=False)
    died = [e for e in rank0_events(total=10, every=2, eval_every=100) if e.get("n", 0) <= 5 and not e.get("closed")]
    view.feed(died)  # the worker group died after step 5; its replacement resumes from step 4
    view.feed(rank0_events(total=10, every=2, eval_every=100, start=4, run="b"))
    out = capsys.readouterr().out
    assert re.findall(r"step (\d+)/10", out) == ["2", "4", "6", "8", "10"]
    assert "step 6/10 (60%)" in out


def test_the_bar_moves_on_a_terminal_that_reports_no_width():
    """`script -qc` from a pipe: a pty nobody sized (0 columns), where tqdm would draw an empty bar."""
    import pty

    primary, secondary = pty.openpty()
    terminal = os.fdopen(secondary, "w", buffering=1)
    console = FakeConsole()
    console.terminal = terminal
    view = ProgressView(every=5, console=console, terminal=True)
    events = rank0_events(total=20, every=5, eval_every=100)
    for e in events:  # one report at a time, as the driver's follower thread gets them
        view.feed([e])
    view.close()
    terminal.close()
    drawn = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:
            break
        if not chunk:
            break
        drawn += chunk
    os.close(primary)
    text = drawn.decode(errors="replace")
    counts = set(re.findall(r"\| (\d+)/20 \[", text))
    assert {"5", "10", "15", "20"} <= counts, text[-2000:]
    assert "\r" in text  # redrawn in place
    assert [line for line in console.logged if "step" in line][-1].startswith("run loss 20 | step 20/20 (100%)")


def test_console_keeps_routine_notices_in_the_log_only(tmp_path, capsys):
    with Console(tmp_path / "train.log"):
        print("model: 1.3M parameters")
        print("(TrainController pid=1) [2026 E core_worker.cc:2465] Actor with class name: 'PreemptionWatcher' and "
              "ID: 'ab' has constructor arguments in the object store and max_restarts > 0.")  # fmt: skip
        sys.stderr.write("2026 WARNING authentication_token_setup.py:85 -- Token authentication is enabled for "
                         "this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.\n")  # fmt: skip
        print("(RayTrainWorker pid=2) DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built ", end="")
        print("successfully")
        print("(RayTrainWorker pid=2) moe: experts run on the 'grouped' backend (moe.backend)")  # the driver said it
        print("\x1b[36m(TrainController pid=3)\x1b[0m Requesting resources: {'CPU': 1.0} * 2")
        print("(TrainController pid=3) Attempting to start training worker group of size 2 with the following ...")
        print("(RayTrainWorker pid=2) Setting up process group for: env:// [rank=0, world_size=2]")
        print("(TrainController pid=3) Started training worker group of size 2: ")
        print("(TrainController pid=3) - (ip=127.0.0.1, pid=2) world_rank=0, local_rank=0, node_rank=0")
        sys.stderr.write("a real error\n")
        print("a line without its newline", end="")
    seen = capsys.readouterr()
    assert seen.out == "model: 1.3M parameters\na line without its newline\n"
    assert seen.err == "a real error\n"
    log = (tmp_path / "train.log").read_text()
    for kept in ("PreemptionWatcher", "Token authentication", "built successfully", "a real error", "model:",
                 "experts run on the", "Requesting resources", "world_rank=0", "Setting up process group"):
        assert kept in log


def test_ray_failure_notices_and_a_muted_console_stay_in_the_log(tmp_path, capsys):
    """Ray's account of a failure (the Train controller's decision and its traceback, a raylet's report of
    a lost node, the preemption watcher) stays in train.log; once the run is being stopped (mute), so
    does every line, while the lines before it reach the terminal."""
    with Console(tmp_path / "train.log") as console:
        print("(TrainController pid=3) [FailurePolicy] RETRY: worker group failed")
        print("(TrainController pid=3) Traceback (most recent call last):")
        print("(TrainController pid=3)   File \"x.py\", line 1, in f")
        print("(TrainController pid=3) ray.exceptions.ActorDiedError: The actor died")
        print("(TrainController pid=3) Attempting to start training worker group of size 1 with the following ...")
        print("(raylet, ip=127.0.0.1) The node with node id ab has been marked dead")
        print("    Last 20 lines of the Raylet logs:")
        print("(PreemptionWatcher pid=4) PreemptionWatcher: preemption detected on node ab")
        print("fault tolerance: continuing on 1 from step_00000010")
        console.mute()
        print("(TrainController pid=3) Failed to send resource request for train-1.")
        sys.stderr.write("(TrainController pid=3) Traceback (most recent call last):\n")
    seen = capsys.readouterr()
    assert seen.out == "fault tolerance: continuing on 1 from step_00000010\n" and seen.err == ""
    log = (tmp_path / "train.log").read_text()
    for kept in ("RETRY", "ActorDiedError", "marked dead", "Raylet logs", "preemption detected", "Failed to send"):
        assert kept in log


def test_console_drops_rays_colour_codes_where_they_would_be_garbage(tmp_path, capsys):
    coloured = "\x1b[36m(RayTrainWorker pid=7)\x1b[0m step 3: val_loss 5.1"
    redrawn = "\x1b[36m(_GangMember pid=8)\x1b[0m \rwanda 50%:   0%| 0/2\rwanda 50%: 100%| 2/2"  # a worker's tqdm
    with Console(tmp_path / "train.log"):
        print(coloured)
        print(redrawn)
    assert capsys.readouterr().out == ("(RayTrainWorker pid=7) step 3: val_loss 5.1\n"  # captured: not a terminal
                                       "(_GangMember pid=8) wanda 50%: 100%| 2/2\n")  # fmt: skip
    assert "(RayTrainWorker pid=7) step 3: val_loss 5.1" in (tmp_path / "train.log").read_text()
    assert "\x1b" not in (tmp_path / "train.log").read_text()


@pytest.mark.slow
@pytest.mark.distributed
def test_train_piped_prints_plain_progress_lines(tmp_path, small_data):
    """`scalesparse train … | tee log`: the Ray worker's progress arrives as one line per log step."""
    cfg = tiny_config(small_data, tmp_path / "run", parallel={"workers": 1, "zero_stage": 0},
                      train={"eval_every": 0, "steps": 6}, checkpoint={"every": 0},
                      logging={"log_every": 2, "progress": True, "tensorboard": False})  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "scalesparse", "train", str(tmp_path / "c.yaml")], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = re.findall(r"\| step (\d+)/6 \(", proc.stdout)
    assert steps == ["2", "4", "6"], proc.stdout[-3000:]
    assert "step 2/6" not in proc.stderr, "each line once, not also through Ray Train's logger"
    assert "\r" not in proc.stdout + proc.stderr and "it/s" not in proc.stdout
    assert "\x1b[" not in proc.stdout + proc.stderr, "no colour codes in a pipe"  # (Ray colours its prefixes)
