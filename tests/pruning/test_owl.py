"""OWL's non-uniform block sparsity (pruning/owl.py): the rule on numbers, then on a constructed
model whose second block carries outlier weights."""

import pytest
import torch

from scalesparse.config import load_prune_config
from scalesparse.errors import ConfigError
from scalesparse.pruning.base import weight_matrix
from scalesparse.pruning.calibrate import prune_model
from scalesparse.pruning.hf import find_blocks, linear_layers
from scalesparse.pruning.owl import outlier_ratio, owl_sparsities
from tests.pruning.test_calibrate import batches, family


def test_the_rule_averages_to_the_target_and_prunes_outlier_blocks_less():
    s = owl_sparsities([0.01, 0.03, 0.02, 0.05], target=0.7, lam=0.08)
    assert sum(s) / 4 == pytest.approx(0.7, abs=1e-12)
    assert max(s) - min(s) == pytest.approx(0.16)  # densities span 2λ
    assert s[3] == min(s) and s[0] == max(s)  # the most outliers: the least pruned
    assert owl_sparsities([0.02, 0.02], 0.5, 0.08) == pytest.approx([0.5, 0.5])  # no spread: uniform
    assert outlier_ratio([torch.tensor([1.0, 1.0, 1.0, 100.0])], m=2.0) == 0.25


def with_outliers(model):
    """A few weights of block 1 a hundred times larger: its Wanda scores hold outliers, block 0's do not."""
    _, blocks = find_blocks(model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in linear_layers(blocks[1]).values():
            w = weight_matrix(layer)
            hit = torch.rand(w.shape, generator=g) < 0.01
            w[hit] *= 100.0
    return model


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_owl_prunes_the_outlier_block_less_and_hits_the_target_overall(method):
    model = with_outliers(family("llama").eval())
    report = prune_model(model, batches(), method, 0.6, progress=False, owl=(5.0, 0.08))
    low, high = report.block_sparsity
    assert report.block_outlier_ratio[1] > report.block_outlier_ratio[0]
    assert low == pytest.approx(0.68) and high == pytest.approx(0.52)  # ±λ around 0.6, outliers pruned less
    _, blocks = find_blocks(model)
    zeros = total = 0
    for i, block in enumerate(blocks):
        for layer in linear_layers(block).values():
            w = weight_matrix(layer)
            # (Wanda compares within a row: its count is rounded per row)
            assert abs(float((w == 0).float().mean()) - report.block_sparsity[i]) <= 0.5 / w.shape[1] + 1e-9
            zeros, total = zeros + int((w == 0).sum()), total + w.numel()
    assert zeros / total == pytest.approx(0.6, abs=0.01)  # blocks of one model are the same size


def test_owl_is_refused_with_an_nm_pattern_or_a_spread_past_the_bounds():
    with pytest.raises(ConfigError, match="layer_sparsity: .*owl sets a sparsity per block"):
        load_prune_config(None, ["model=m", "layer_sparsity=owl", "pattern=2:4", "sparsity=0.5"])
    with pytest.raises(ConfigError, match=r"owl.lam: .*0.08 would take some block beyond \[0, 1\]"):
        load_prune_config(None, ["model=m", "layer_sparsity=owl", "sparsity=0.05"])
    assert load_prune_config(None, ["model=m", "layer_sparsity=owl", "owl.m=7"]).owl.m == 7
