"""Elastic resume: a checkpoint written by N workers at ZeRO stage s continues on M workers at stage s'.

Reference: the uninterrupted N-worker run. The resumed run must log the same per-step losses (1e-5,
the tolerance at which 1 and 2 workers already agree) for the 10 steps after the checkpoint, since
weights, both Adam moments, the Adam step, the data position and DST masks all carry over.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from scalesparse.config import config_from_dict
from scalesparse.train import checkpoint as ckpt
from scalesparse.train.driver import run_training
from scalesparse.train.metrics import read_metrics
from tests.conftest import tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

STEPS, AT = 14, 4  # resume from step 4's checkpoint: 10 steps to compare
LONG = {"train": {"steps": STEPS, "global_batch_size": 8, "micro_batch_size": 2, "warmup_steps": 2,
                  "eval_every": 0, "lr": 3e-3},
        "checkpoint": {"every": AT, "keep": 5}}  # fmt: skip


class Runs:
    """Each configuration trains once per module; resumed runs are keyed by their source."""

    def __init__(self, base: Path, data: dict) -> None:
        self.base, self.data, self.cache = base, data, {}

    def config(self, run_dir: Path, workers: int, stage: int, **sections):
        return config_from_dict(tiny_config(self.data, run_dir, parallel={"workers": workers, "zero_stage": stage},
                                            **LONG, **sections))  # fmt: skip

    def full(self, workers: int, stage: int, **sections) -> Path:
        key = ("full", workers, stage, json.dumps(sections, sort_keys=True))
        if key not in self.cache:
            run_dir = self.base / f"w{workers}-z{stage}-{len(self.cache)}"
            run_training(self.config(run_dir, workers, stage, **sections))
            self.cache[key] = run_dir
        return self.cache[key]

    def resumed(self, source: Path, workers: int, stage: int, **sections) -> Path:
        run_dir = self.base / f"{source.name}-to-w{workers}-z{stage}"
        run_training(self.config(run_dir, workers, stage, **sections),
                     resume=str(source / "checkpoints" / ckpt.tag_for(AT)))  # fmt: skip
        return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_data, ray_session) -> Runs:
    return Runs(tmp_path_factory.mktemp("elastic"), small_data)


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def assert_same_losses(resumed: Path, full: Path) -> None:
    want, got = losses(full), losses(resumed)
    assert sorted(got) == list(range(AT + 1, STEPS + 1)), sorted(got)
    for step in got:
        assert got[step] == pytest.approx(want[step], abs=1e-5, rel=0), f"step {step}"


# fewer workers and another stage, then more workers and another stage, from and to ZeRO-3's partitions
# (every pair of stages, 1 and 2 ranks, is tested without Ray: tests/train/test_elastic_state.py)
@pytest.mark.parametrize("before, after", [((2, 3), (1, 2)), ((1, 2), (2, 3))],
                         ids=["2to1-zero3to2", "1to2-zero2to3"])  # fmt: skip
def test_resume_on_another_worker_count_or_stage_continues_the_same_run(runs, before, after, capfd):
    full = runs.full(*before)
    resumed = runs.resumed(full, *after)
    assert "resume: reshaping" in capfd.readouterr().out
    assert_same_losses(resumed, full)


RIGL = {"sparsity": {"method": "rigl", "sparsity": 0.9, "update_interval": 3, "drop_fraction": 0.3}}


def test_rigl_at_90_percent_moves_from_two_workers_to_one_with_identical_masks(runs):
    full = runs.full(2, 2, **RIGL)
    resumed = runs.resumed(full, 1, 2, **RIGL)
    assert_same_losses(resumed, full)
    hashes = {r["step"]: r["mask_hash"] for r in read_metrics(full) if "mask_hash" in r}
    again = {r["step"]: r["mask_hash"] for r in read_metrics(resumed) if "mask_hash" in r}
    updates_after = {s: h for s, h in hashes.items() if s > AT}
    assert updates_after and {s: again[s] for s in updates_after} == updates_after  # the same mask decisions
    from safetensors.torch import load_file

    end = f"checkpoints/{ckpt.tag_for(STEPS)}/sparsity.safetensors"
    a, b = load_file(str(full / end)), load_file(str(resumed / end))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


MOE_EP = {"model": {"mlp": "moe"}, "moe": {"num_experts": 4, "top_k": 2, "expert_parallel": 2}}
MOE_ONE = {"model": {"mlp": "moe"}, "moe": {"num_experts": 4, "top_k": 2}}


def test_expert_parallel_two_workers_continue_on_one_holding_all_experts(runs):
    full = runs.full(2, 2, **MOE_EP)
    resumed = runs.resumed(full, 1, 2, **MOE_ONE)
    assert_same_losses(resumed, full)


def test_one_worker_holding_all_experts_continues_on_two_expert_parallel_workers(runs):
    full = runs.full(1, 0, **MOE_ONE)
    resumed = runs.resumed(full, 2, 0, **MOE_EP)  # each rank takes its 2 experts, moments and step
    assert_same_losses(resumed, full)


def test_an_old_layout_only_checkpoint_is_refused_with_the_old_advice(runs, tmp_path, small_data):
    """Checkpoints from before elastic shards (no state_rank files) still resume only where they were written."""
    import shutil

    from scalesparse.errors import CheckpointError
    from scalesparse.train.driver import resolve_resume

    source = runs.full(2, 3)
    old = tmp_path / "old" / "checkpoints"
    shutil.copytree(source / "checkpoints" / ckpt.tag_for(AT), old / ckpt.tag_for(AT))
    for f in old.glob("*/state_rank*.safetensors"):
        f.unlink()
    folder = old / ckpt.tag_for(AT)
    state = json.loads((folder / ckpt.STATE).read_text())
    del state["elastic"]
    (folder / ckpt.STATE).write_text(json.dumps(state))
    ckpt.write_manifest(folder, AT)
    one = runs.config(tmp_path / "new", 1, 3)
    with pytest.raises(CheckpointError, match="by an older scalesparse; resume with parallel.workers=2 "
                                              "parallel.zero_stage=3"):  # fmt: skip
        resolve_resume(one, str(folder), tmp_path / "new", 512)
    assert resolve_resume(runs.config(tmp_path / "same", 2, 3), str(folder), tmp_path / "same", 512) == folder
