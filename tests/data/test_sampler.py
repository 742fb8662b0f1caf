"""The global order is a function of (seed, sample position) only: 1 and N workers, and a resume onto
another worker count, see the same samples."""

from __future__ import annotations

import pytest

from scalesparse.data import BatchSchedule, rank_slice


def samples_seen_by_workers(n_blocks: int, seed: int, world: int, micro: int, global_batch: int, steps: range,
                            schedule: BatchSchedule | None = None) -> list[list[int]]:  # fmt: skip
    """Per step, the block indices every rank consumed, in (micro step, rank) order."""
    schedule = schedule or BatchSchedule(n_blocks, seed)
    ga = global_batch // (micro * world)
    out = []
    for step in steps:
        batch = schedule.global_batch(step * global_batch, global_batch)
        out.append([int(i) for m in range(ga) for r in range(world) for i in rank_slice(batch, m, r, world, micro)])
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_one_and_n_workers_see_the_same_global_batches(world):
    one = samples_seen_by_workers(37, 5, 1, 2, 8, range(12))
    many = samples_seen_by_workers(37, 5, world, 2, 8, range(12))
    assert one == many
    assert len({i for step in one for i in step}) == 37  # 96 samples over 37 blocks: every block seen


def test_a_resume_onto_another_worker_count_continues_at_the_same_sample():
    straight = samples_seen_by_workers(37, 5, 2, 2, 8, range(10))
    resumed = samples_seen_by_workers(37, 5, 4, 1, 8, range(6, 10), BatchSchedule(37, 5))  # fresh, 4 workers
    assert resumed == straight[6:]
    assert samples_seen_by_workers(37, 6, 2, 2, 8, range(10)) != straight  # the seed does matter
