"""Sharded DST with real processes: 2 or 4 gloo ranks, each owning an uneven slice of every masked
weight, must reach the same masks and weights as a single process holding whole tensors."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from scalesparse import comm
from scalesparse.config import ModelConfig, SparsityConfig
from scalesparse.model import GPT
from scalesparse.sparsity import SPARSIFIERS, LayerView
from scalesparse.sparsity.masks import mask_hash, select_layers

pytestmark = pytest.mark.distributed
UPDATES = (10, 20)


def build(method: str):
    method, _, granularity = method.partition("-")
    torch.manual_seed(0)
    # wide enough that the fixed cost of the threshold search (~32 rounds × one count per layer)
    # is small next to the changes, as it is at real model sizes
    model = GPT(ModelConfig(d_model=64, n_layers=2, n_heads=2, seq_len=16), 60)
    x = torch.randint(0, 60, (4, 16))
    model(x, x.roll(1, 1))[1].backward()  # the same dense gradient everywhere
    cfg = SparsityConfig(method=method, sparsity=0.9, update_interval=10, drop_fraction=0.3,
                         granularity=granularity or "unstructured", block_size=16)
    layers = select_layers(model, cfg.include, cfg.exclude)
    sp = SPARSIFIERS.get(cfg.method)(cfg, {n: tuple(m.weight.shape) for n, m in layers.items()}, 100, seed=3)
    return layers, sp


def bounds(name: str, numel: int, world: int) -> list[int]:
    """Uneven slice boundaries, different per layer: [0, c1, ..., numel]."""
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    cuts = sorted(torch.randint(1, numel, (world - 1,), generator=g).tolist())
    return [0, *cuts, numel]


def views_for(layers, rank: int | None, world: int, weights, grads, states) -> list[LayerView]:
    out = []
    for name, layer in sorted(layers.items()):
        numel = layer.weight.numel()
        b = bounds(name, numel, world)
        lo, hi = (0, numel) if rank is None else (b[rank], b[rank + 1])
        out.append(LayerView(name, tuple(layer.weight.shape), lo, weights[name][lo:hi], grads[name][lo:hi],
                             [states[name][lo:hi]]))  # fmt: skip
    return out


def run(method: str, rank: int | None, world: int = 1) -> dict:
    layers, sp = build(method)
    weights = {n: m.weight.detach().clone().view(-1) for n, m in layers.items()}
    grads = {n: m.weight.grad.clone().view(-1) for n, m in layers.items()}
    states = {n: torch.ones_like(w) for n, w in weights.items()}  # stands in for Adam moments
    views = views_for(layers, rank, world, weights, grads, states)
    sp.init_masks(views)
    hashes = [mask_hash(sp.masks)]
    for step in UPDATES:
        for v in views:  # pretend training moved the weights and produced new gradients
            g = torch.Generator().manual_seed(step)
            full = torch.randn(v.shape[0] * v.shape[1], generator=g)
            v.weight.add_(0.01 * full[v.start : v.stop] * sp.local_mask(v))
            v.grad.copy_(torch.randn(full.numel(), generator=g)[v.start : v.stop])
        sp.update(step, views)
        hashes.append(mask_hash(sp.masks))
    return {"hashes": hashes, "weights": weights, "states": states, "bytes": sp.wire.total,
            "masks": sp.masks}  # fmt: skip


def _worker(rank: int, method: str, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = run(method, rank, world)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("method, world", [("set", 2), ("rigl", 2), ("gmp", 2), ("rigl", 4), ("rigl-block", 2)])
def test_ranks_on_slices_equal_one_process_on_whole_tensors(method, world, tmp_path):
    mp.spawn(_worker, args=(method, world, free_port(), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    single = run(method, None)
    for r in ranks:  # after init and after every update
        assert r["hashes"] == single["hashes"]
    assert len(set(single["hashes"])) == len(UPDATES) + 1  # the masks really changed each time
    for name in single["weights"]:
        b = bounds(name, single["weights"][name].numel(), world)
        for key in ("weights", "states"):
            stitched = torch.cat([ranks[r][key][name][b[r] : b[r + 1]] for r in range(world)])
            torch.testing.assert_close(stitched, single[key][name], rtol=0, atol=0)
    # only mask changes and small counts travel: far below a dense all-gather of drop + grow scores
    numel = sum(w.numel() for w in single["weights"].values())
    naive = len(UPDATES) * 2 * 4 * numel
    assert len({r["bytes"] for r in ranks}) == 1 and 0 < ranks[0]["bytes"] < naive / 10
    assert comm.world_size() == 1 and single["bytes"] > 0
