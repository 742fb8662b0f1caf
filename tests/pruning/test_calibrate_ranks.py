"""The calibration walk on 2 gloo processes where the second has no calibration batch at all (more
workers than samples): every all-reduce lines up, and both end with the weights one process prunes
from all the batches (each method; the error report on, so the Gram sums are all-reduced too)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from tests.distributed.test_sparse_sync import free_port
from tests.pruning.test_calibrate import batches, family

METHODS = ("magnitude", "wanda", "sparsegpt")


def _rank(rank: int, world: int, port: int, out_dir: str) -> None:
    from scalesparse.pruning.calibrate import prune_model

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = {}
        for method in METHODS:
            model = family("llama").eval()
            prune_model(model, batches(3) if rank == 0 else [], method, 0.5, progress=False, layer_error=True)
            out[method] = {n: p.detach().clone() for n, p in model.named_parameters()}
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_a_worker_without_calibration_batches_prunes_like_one_process(tmp_path):
    from scalesparse.pruning.calibrate import prune_model

    mp.spawn(_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for method in METHODS:
        alone = family("llama").eval()
        prune_model(alone, batches(3), method, 0.5, progress=False, layer_error=True)
        for name, want in alone.named_parameters():
            for r in range(2):
                torch.testing.assert_close(ranks[r][method][name], want.detach(), rtol=0, atol=1e-6,
                                           msg=f"{method} rank {r} {name}")  # fmt: skip
