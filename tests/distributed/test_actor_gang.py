"""launch.run_on_actors: the light gang of Ray actors that one-shot jobs (pruning) run on."""

import time

import pytest
import torch

from scalesparse import comm, launch
from scalesparse.errors import ScalesparseError

pytestmark = [pytest.mark.distributed]


def sum_of_ranks(args):
    t = torch.tensor([float(comm.rank() + args["offset"])])
    comm.all_reduce_sum(t)
    return comm.rank(), comm.world_size(), float(t), torch.get_num_threads()


def rank1_fails(args):
    if comm.rank() == 1:
        raise ValueError("rank 1 found a bad shard")
    comm.barrier()  # rank 0 would wait here forever if the failure were not noticed


def test_gang_shares_a_process_group_and_returns_every_rank_result(ray_session):
    out = launch.run_on_actors(sum_of_ranks, {"offset": 10}, workers=2, name="probe")
    assert out == [(0, 2, 21.0, 1), (1, 2, 21.0, 1)]


def test_a_failing_rank_stops_the_gang_with_its_own_message(ray_session):
    t = time.perf_counter()
    with pytest.raises(ScalesparseError, match=r"probe failed on the workers: ValueError: rank 1 found a bad shard"):
        launch.run_on_actors(rank1_fails, {}, workers=2, name="probe")
    assert time.perf_counter() - t < 60
    out = launch.run_on_actors(sum_of_ranks, {"offset": 0}, workers=2, name="probe")  # resources were given back
    assert [o[2] for o in out] == [1.0, 1.0]
