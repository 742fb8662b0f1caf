"""Progress when the output is not a terminal: one plain line per log step, not a bar per refresh."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import yaml

from scalesparse.train.loop import LineProgress
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
