import pytest
import torch

from scalesparse import comm
from scalesparse.config import ModelConfig
from scalesparse.errors import ConfigError
from scalesparse.model import GPT
from scalesparse.sparsity.distribution import keep_counts
from scalesparse.sparsity.masks import (
    block_mask,
    mask_hash,
    nm_mask,
    pack,
    select_layers,
    smallest,
    topk_mask,
    unpack,
)

SHAPES = {"a": (64, 64), "b": (256, 64), "c": (64, 256), "tiny": (4, 8)}


@pytest.mark.parametrize("kind", ["uniform", "erk"])
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.97])
def test_distributions_hit_the_global_target_exactly(kind, sparsity):
    counts = keep_counts(kind, SHAPES, sparsity)
    total = sum(h * w for h, w in SHAPES.values())
    assert sum(counts.values()) == round((1 - sparsity) * total)
    assert all(0 <= counts[n] <= h * w for n, (h, w) in SHAPES.items())


def test_erk_density_is_proportional_to_fan_sum_over_fan_product():
    counts = keep_counts("erk", SHAPES, 0.9)
    assert counts["tiny"] == 32  # capped: ERK would give it density > 1
    dens = {n: counts[n] / (h * w) for n, (h, w) in SHAPES.items() if n != "tiny"}
    ratio = {n: dens[n] / ((h + w) / (h * w)) for n, (h, w) in SHAPES.items() if n != "tiny"}
    assert max(ratio.values()) / min(ratio.values()) == pytest.approx(1.0, abs=2e-3)
    uni = keep_counts("uniform", SHAPES, 0.9)
    assert abs(uni["a"] / 4096 - uni["b"] / 16384) < 1e-3


def test_granularity_helpers():
    torch.manual_seed(0)
    s = torch.rand(8, 16)
    m = nm_mask(s, 2, 4)
    assert torch.all(m.view(8, 4, 4).sum(-1) == 2)
    kept = torch.where(m, s, torch.zeros_like(s)).view(8, 4, 4).sort(-1, descending=True).values[..., :2]
    assert torch.equal(kept, s.view(8, 4, 4).sort(-1, descending=True).values[..., :2])
    b = block_mask(torch.rand(32, 32), 0.25, 8)
    blocks = b.view(4, 8, 4, 8).permute(0, 2, 1, 3).reshape(16, 64)
    assert torch.all(blocks.all(-1) | ~blocks.any(-1)) and int(blocks.all(-1).sum()) == 4
    t = topk_mask(torch.tensor([[3.0, 1.0], [3.0, 2.0]]), 2)
    assert t.tolist() == [[True, False], [True, False]]  # tie at 3.0 → both, then nothing
    with pytest.raises(ConfigError, match="does not divide"):
        nm_mask(torch.rand(4, 6), 2, 4)


def test_pack_round_trip_and_hash():
    m = torch.rand(7, 13) > 0.6
    assert torch.equal(unpack(pack(m), (7, 13)), m)
    assert pack(m).numel() == (91 + 7) // 8
    m2 = m.clone()
    m2[0, 0] = ~m2[0, 0]
    assert mask_hash({"x": m}) != mask_hash({"x": m2}) and mask_hash({"x": m}) == mask_hash({"x": m.clone()})


def test_default_globs_pick_attention_and_mlp_but_never_embeddings_or_head():
    model = GPT(ModelConfig(d_model=32, n_layers=2, n_heads=2, seq_len=8), 50)
    names = set(select_layers(model, ("layers.*.self_attn.*_proj", "layers.*.mlp.*_proj"), ()))
    assert names == {f"layers.{i}.{p}" for i in range(2) for p in
                     ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}  # fmt: skip
    assert len(select_layers(model, ("*",), ("*.mlp.*",))) == 8
    with pytest.raises(ConfigError, match="matches no maskable layer"):
        select_layers(model, ("embed_tokens", "lm_head"), ())


@pytest.mark.parametrize("seed", range(5))
def test_global_select_equals_a_sort_with_lowest_index_tie_break(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 6, (50,), generator=g).float() / 2 - 1  # many ties, negatives
    valid = torch.rand(50, generator=g) > 0.3
    n = int(valid.sum()) // 2
    got = comm.global_select([comm.float_keys(scores)], [valid], [0], [n])[0]
    cand = [i for i in range(50) if valid[i]]
    ref = sorted(sorted(cand, key=lambda i: (-scores[i].item(), i))[:n])
    assert got.tolist() == ref
    with pytest.raises(ValueError, match="only"):
        comm.global_select([comm.float_keys(scores)], [valid], [0], [int(valid.sum()) + 1])


@pytest.mark.parametrize("seed", range(5))
def test_smallest_selects_what_a_stable_sort_selects_ties_included(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-4, 5, (257,), generator=g).float()  # few distinct values: ties everywhere
    for k in (0, 1, 50, 128, 256, 257):
        want = torch.zeros(257, dtype=torch.bool)
        want[torch.sort(x, stable=True).indices[:k]] = True
        assert torch.equal(smallest(x, k), want), k
