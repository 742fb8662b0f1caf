"""Sharded sparsity with real processes: gloo ranks, each holding either an uneven slice of every
masked weight (ZeRO-1/2/3 partitions) or the whole weight (ZeRO-0 replicas, and the model before
DeepSpeed partitions it), must reach the same masks and weights as a single process holding whole
tensors, for every registered method.

Every case here is deterministic, so the mask hashes must be equal, not merely close: the selection
is exact (order-preserving integer keys, ties to the lowest global index), random draws come from
(seed, step, layer) and are sliced by offset, and every layout is fed the very same weights and
gradients. (End to end, in test_train.py, the gradients of 1 and 2 workers differ in summation
order, so there only what does not read them is bitwise worker-count independent.)
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from scalesparse import comm
from scalesparse.config import ModelConfig, SparsityConfig, config_from_dict
from scalesparse.model import GPT
from scalesparse.sparsity import SPARSIFIERS, LayerView
from scalesparse.sparsity.distribution import keep_counts
from scalesparse.sparsity.masks import mask_hash, select_layers

pytestmark = pytest.mark.distributed
UPDATES = (10, 20)
# every registered method, and the structured granularities (their masks need whole layers' scores)
METHODS = [*SPARSIFIERS.names(), "rigl-block", "snip-nm", "snip-block"]
LAYOUTS = ("sliced", "replicated")
EMPTY_ON_RANK_1 = "layers.0.self_attn.q_proj"  # ZeRO-2's flat partitions leave some ranks no part of a weight


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


def bounds(name: str, numel: int, world: int, layout: str = "sliced") -> list[int]:
    """Where each rank's slice starts and stops: [0, c1, ..., numel], uneven and different per layer;
    replicated: every rank holds [0, numel)."""
    if layout == "replicated":
        return [0, numel]
    if name == EMPTY_ON_RANK_1 and world == 2:
        return [0, numel, numel]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    cuts = sorted(torch.randint(1, numel, (world - 1,), generator=g).tolist())
    return [0, *cuts, numel]


def rank_range(b: list[int], rank: int | None) -> tuple[int, int]:
    if rank is None or len(b) == 2:  # one process, or a replica
        return b[0], b[-1]
    return b[rank], b[rank + 1]


def views_for(layers, rank: int | None, world: int, layout: str, weights, grads, states) -> list[LayerView]:
    out = []
    for name, layer in sorted(layers.items()):
        lo, hi = rank_range(bounds(name, layer.weight.numel(), world, layout), rank)
        out.append(LayerView(name, tuple(layer.weight.shape), lo, weights[name][lo:hi], grads[name][lo:hi],
                             [states[name][lo:hi]]))  # fmt: skip
    return out


# what a method holds after its updates: its target, except GMP (its schedule's sparsity at that step)
SCHEDULED = {"gmp": lambda sp, step: sp.scheduled(step)}


def target_counts(method: str, sp) -> dict[str, int]:
    s = SCHEDULED.get(method, lambda sp, step: sp.cfg.sparsity)(sp, UPDATES[-1])
    return keep_counts(sp.cfg.distribution, sp.shapes, s)


def run(method: str, rank: int | None, world: int = 1, layout: str = "sliced") -> dict:
    layers, sp = build(method)
    weights = {n: m.weight.detach().clone().view(-1) for n, m in layers.items()}
    grads = {n: m.weight.grad.clone().view(-1) for n, m in layers.items()}
    states = {n: torch.ones_like(w) for n, w in weights.items()}  # stands in for Adam moments
    views = views_for(layers, rank, world, layout, weights, grads, states)
    sp.init_masks(views)
    hashes = [mask_hash(sp.masks)]
    for step in UPDATES:
        for v in views:  # pretend training moved the weights and produced new gradients
            g = torch.Generator().manual_seed(step)
            full = torch.randn(v.shape[0] * v.shape[1], generator=g)
            v.weight.add_(0.01 * full[v.start : v.stop] * sp.local_mask(v))
            v.grad.copy_(torch.randn(full.numel(), generator=g)[v.start : v.stop])
        if sp.should_update(step):  # static and SNIP never update
            sp.update(step, views)
        hashes.append(mask_hash(sp.masks))
    return {"hashes": hashes, "weights": weights, "states": states, "bytes": sp.wire.total,
            "kept": {n: int(m.sum()) for n, m in sp.masks.items()},
            "target": target_counts(method.partition("-")[0], sp)}  # fmt: skip


# -- the trainer's side: DST.init_masks on a real model, the dense gradient (SNIP) reduced over ranks
GLOBAL_BATCH, MICRO = 4, 2


def run_trainer_init(method: str, rank: int, world: int) -> dict:
    from scalesparse.data import rank_slice
    from scalesparse.train.loop import DST

    cfg = config_from_dict({"seed": 0, "sparsity": {"method": method, "sparsity": 0.9},
                            "train": {"steps": 100, "global_batch_size": GLOBAL_BATCH, "micro_batch_size": MICRO},
                            "parallel": {"workers": world, "zero_stage": 0}})  # fmt: skip
    torch.manual_seed(0)
    model = GPT(ModelConfig(d_model=64, n_layers=2, n_heads=2, seq_len=16), 60)
    dst = DST(cfg, model)
    blocks = torch.randint(0, 60, (GLOBAL_BATCH, 17), generator=torch.Generator().manual_seed(1))
    # one micro-batch per rank on 2 workers, two on one: (g0 + g1) / 2 == g0 / 2 + g1 / 2 bit for bit
    # (halving is exact), so both reduce to the same dense gradient and SNIP sees the same scores
    mine = [blocks[rank_slice(torch.arange(GLOBAL_BATCH).numpy(), m, rank, world, MICRO)]
            for m in range(cfg.grad_accum)]  # fmt: skip
    dst.init_masks(model, [(b[:, :-1], b[:, 1:]) for b in mine])
    log = dst.take_log()
    return {"log": log, "kept": {n: int(m.sum()) for n, m in dst.sparsifier.masks.items()},
            "target": dict(dst.sparsifier.target),
            "weights": {n: layer.weight.detach().clone() for n, layer in dst.layers.items()}}  # fmt: skip


def recorded(fn, *args) -> dict:
    try:
        return fn(*args)
    except Exception as e:  # the collectives of the cases after it stay matched: every rank raises alike
        return {"error": f"{type(e).__name__}: {e}"}


def _worker(rank: int, world: int, port: int, out_dir: str, cases: list[tuple[str, str]], trainer: bool) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # a case that raises is recorded, not fatal: the other cases still report
        res = {f"{m}/{layout}": recorded(run, m, rank, world, layout) for m, layout in cases}
        if trainer:
            res.update({f"trainer/{m}": recorded(run_trainer_init, m, rank, world) for m in SPARSIFIERS.names()})
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(world: int, out_dir, cases: list[tuple[str, str]], trainer: bool = False) -> list[dict]:
    """All cases in one start of `world` processes (a start costs seconds; a case, a fraction)."""
    mp.spawn(_worker, args=(world, free_port(), str(out_dir), cases, trainer), nprocs=world, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    return spawn(2, tmp_path_factory.mktemp("two"), [(m, layout) for m in METHODS for layout in LAYOUTS], trainer=True)


def check_equal_to_one_process(ranks: list[dict], method: str, layout: str, world: int) -> None:
    key = f"{method}/{layout}"
    single = run(method, None)
    for r in ranks:  # after init and after every update
        assert "error" not in r[key], r[key]
        assert r[key]["hashes"] == single["hashes"]
        assert r[key]["kept"] == single["kept"]
    dynamic = SPARSIFIERS.get(method.partition("-")[0]).dynamic
    assert len(set(single["hashes"])) == (len(UPDATES) + 1 if dynamic else 1)  # the masks really changed
    if "-" not in method:  # unstructured: each layer holds its exact count, so the global sparsity is exact
        assert single["kept"] == single["target"]
    for name in single["weights"]:
        b = bounds(name, single["weights"][name].numel(), world, layout)
        for key2 in ("weights", "states"):
            stitched = torch.cat([ranks[r][key][key2][name][slice(*rank_range(b, r))]
                                  for r in range(world if len(b) > 2 else 1)])  # fmt: skip
            torch.testing.assert_close(stitched, single[key2][name], rtol=0, atol=0)
            for r in ranks:  # replicas stay replicas
                if len(b) == 2:
                    torch.testing.assert_close(r[key][key2][name], single[key2][name], rtol=0, atol=0)
    if dynamic and layout == "sliced" and method == "rigl":
        # only mask changes and small counts travel: far below a dense all-gather of drop + grow scores
        numel = sum(w.numel() for w in single["weights"].values())
        naive = len(UPDATES) * 2 * 4 * numel
        assert len({r[key]["bytes"] for r in ranks}) == 1 and 0 < ranks[0][key]["bytes"] < naive / 10
    assert comm.world_size() == 1


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("method", METHODS)
def test_ranks_on_slices_or_replicas_equal_one_process_on_whole_tensors(two_ranks, method, layout):
    check_equal_to_one_process(two_ranks, method, layout, 2)


def test_four_ranks_on_uneven_slices_equal_one_process(tmp_path):
    check_equal_to_one_process(spawn(4, tmp_path, [("rigl", "sliced")]), "rigl", "sliced", 4)


@pytest.mark.parametrize("method", SPARSIFIERS.names())
def test_trainer_makes_the_masks_of_one_worker_on_two(two_ranks, method):
    """The worker's DST.init_masks, before DeepSpeed partitions anything: every rank holds whole
    weights (and SNIP the whole reduced gradient). Masks, logged sparsity and zeroed weights must be
    one worker's, and the global sparsity exact (90% of the masked weights, to the weight)."""
    single = run_trainer_init(method, 0, 1)
    dense = {n: w.numel() for n, w in single["weights"].items()}
    assert single["kept"] == (dense if method == "gmp" else single["target"])  # GMP starts dense
    total = sum(w.numel() for w in single["weights"].values())
    assert single["log"]["sparsity"] == 1 - sum(single["kept"].values()) / total
    assert single["log"]["masked_zeros"] == total - sum(single["kept"].values())
    assert single["log"]["masked_weights"] == total
    for r in two_ranks:
        got = r[f"trainer/{method}"]
        assert "error" not in got, got
        assert got["log"]["mask_hash"] == single["log"]["mask_hash"]
        assert got["log"]["sparsity"] == single["log"]["sparsity"]
        assert got["log"]["masked_zeros"] == single["log"]["masked_zeros"]
        assert got["kept"] == single["kept"]
        for name, w in single["weights"].items():
            torch.testing.assert_close(got["weights"][name], w, rtol=0, atol=0)
