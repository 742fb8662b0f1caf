"""Masks taken from loaded zeros (sparsity.mask_from: weights) agree across real ranks (2 gloo
processes) and equal the whole weights' nonzeros, whether each rank holds an uneven slice of every
weight (ZeRO-1/2/3 partitions) or a replica (ZeRO-0, and the model before DeepSpeed partitions it:
where the trainer makes them)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from scalesparse.config import ModelConfig, config_from_dict
from scalesparse.model import GPT
from scalesparse.sparsity import LayerView
from scalesparse.sparsity.masks import mask_hash
from tests.distributed.test_sparse_sync import bounds, free_port, rank_range
from tests.test_pretrained_masks import prune, sparsifier

pytestmark = pytest.mark.distributed
SPARSITY = {"method": "static", "mask_from": "weights", "granularity": "nm", "n": 2, "m": 4}


def pruned_model() -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig(d_model=64, n_layers=2, n_heads=2, seq_len=16), 60)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_proj.weight"):
                prune(p, "2:4")
    return model


def masks_of(model: GPT, rank: int, world: int, layout: str) -> dict[str, torch.Tensor]:
    from scalesparse.config import SparsityConfig
    from scalesparse.sparsity.masks import select_layers

    cfg = SparsityConfig(**SPARSITY)
    views = []
    for name, layer in sorted(select_layers(model, cfg.include, cfg.exclude).items()):
        w = layer.weight.detach().reshape(-1)
        lo, hi = rank_range(bounds(name, w.numel(), world, layout), rank)
        views.append(LayerView(name, tuple(layer.weight.shape), lo, w[lo:hi].clone()))
    sp = sparsifier({v.name: torch.empty(v.shape) for v in views}, granularity="nm", n=2, m=4)
    sp.init_masks(views)
    return sp.masks


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from scalesparse.train.loop import DST

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = pruned_model()
        res = {layout: masks_of(model, rank, world, layout) for layout in ("sliced", "replicated")}
        dst = DST(config_from_dict({"sparsity": SPARSITY}), model)  # the trainer's path: hashes compared inside
        dst.init_masks(model, [])
        res["trainer"] = dst.sparsifier.masks
        res["trainer_hash"] = dst.pending["mask_hash"]
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_masks_from_weights_agree_across_two_ranks(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    model = pruned_model()
    expected = {n: m.weight != 0 for n, m in model.named_modules() if n.endswith("_proj") and hasattr(m, "weight")}
    for key in ("sliced", "replicated", "trainer"):
        for r in ranks:
            assert r[key].keys() == expected.keys()
            assert all(torch.equal(r[key][n], expected[n]) for n in expected), key
        assert mask_hash(ranks[0][key]) == mask_hash(ranks[1][key]) == mask_hash(expected)
    assert ranks[0]["trainer_hash"] == ranks[1]["trainer_hash"]
