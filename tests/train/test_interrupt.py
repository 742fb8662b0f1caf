"""Ctrl-C at a terminal: a real SIGINT to the run's whole process group (what a terminal sends its
foreground job) while the workers train. The driver says which checkpoint to continue from, exits
with 130 and no traceback, and leaves none of its Ray processes behind; `--resume auto` continues."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import yaml

from scalesparse.train import checkpoint as ckpt
from tests.conftest import REPO, tiny_config

STEPS = 5000  # far more than the test waits for: the interrupt always lands mid-run


@pytest.mark.slow
@pytest.mark.distributed
def test_ctrl_c_names_the_checkpoint_to_continue_from_and_stops_everything(tmp_path, small_data):
    run = tmp_path / "run"
    cfg = tiny_config(small_data, run, train={"steps": STEPS, "eval_every": 0}, checkpoint={"every": 5, "keep": 2},
                      logging={"log_every": 5, "progress": True, "tensorboard": False})  # fmt: skip
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "scalesparse", "train", str(config)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip  (its own process group, as a terminal's job)
    try:
        deadline = time.monotonic() + 300
        while ckpt.latest_checkpoint(run / "checkpoints") is None:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.5)
        family = psutil.Process(proc.pid).children(recursive=True)  # Ray's processes and the workers
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()

    assert proc.returncode == 130, (proc.returncode, out[-2000:], err[-3000:])
    latest = ckpt.latest_checkpoint(run / "checkpoints")
    step = ckpt.read_state(latest)["step"]
    assert f"interrupted: the latest complete checkpoint is {latest} (step {step})" in out, out[-2000:]
    assert "--resume auto" in out
    assert "Traceback" not in out + err, err[-3000:]
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, [p.info for p in psutil.process_iter(["pid", "name", "cmdline"]) if p in alive]

    # and the command it names continues from there
    done = subprocess.run([sys.executable, "-m", "scalesparse", "train", str(config), "--resume", "auto",
                           "--set", f"train.steps={step + 5}"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {latest}" in done.stdout, done.stdout[-2000:]
