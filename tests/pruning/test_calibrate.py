"""The calibration walk on small random models of each supported family (built from configs, no download)."""

import pytest
import torch
from torch import nn

from scalesparse.errors import ScalesparseError
from scalesparse.pruning import PRUNERS
from scalesparse.pruning.base import weight_matrix
from scalesparse.pruning.calibrate import prune_model
from scalesparse.pruning.hf import find_blocks, linear_layers

V = 96


def family(name: str):
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,  # fmt: skip
        OPTConfig,
        OPTForCausalLM,
    )

    torch.manual_seed(0)
    if name == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=V, n_positions=64,
                                          bos_token_id=0, eos_token_id=0))  # fmt: skip
    if name == "opt":
        return OPTForCausalLM(OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64,
                                        vocab_size=V, max_position_embeddings=64, word_embed_proj_dim=32))  # fmt: skip
    if name == "llama":
        return LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, intermediate_size=64, vocab_size=V))  # fmt: skip
    return GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                            intermediate_size=64, vocab_size=V))  # fmt: skip


def batches(n=3):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, V, (2, 16), generator=g) for _ in range(n)]


@pytest.mark.parametrize("name", ["gpt2", "opt", "llama", "neox"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_every_block_layer_is_exactly_sparse_and_the_rest_untouched(name, method):
    model = family(name).eval()
    head_before = model.get_output_embeddings().weight.detach().clone()
    report = prune_model(model, batches(), method, 0.5, progress=False)
    _, blocks = find_blocks(model)
    layers = [m for b in blocks for m in linear_layers(b).values()]
    assert len(report.layers) == len(layers) >= 8
    for m in layers:
        w = weight_matrix(m)
        assert int((w == 0).sum()) == w.numel() // 2, type(m).__name__
    assert torch.equal(model.get_output_embeddings().weight, head_before)
    with torch.no_grad():
        assert torch.isfinite(model(batches(1)[0]).logits).all()


def test_two_four_pattern_and_include_globs():
    model = family("llama").eval()
    report = prune_model(model, batches(), "sparsegpt", 0.5, nm=(2, 4), include=("*.mlp.*",), progress=False)
    assert {r.name.split(".")[-1] for r in report.layers} == {"gate_proj", "up_proj", "down_proj"}
    for b in find_blocks(model)[1]:
        w = b.mlp.down_proj.weight
        assert torch.all((w != 0).view(w.shape[0], -1, 4).sum(-1) == 2)
        assert int((b.self_attn.q_proj.weight == 0).sum()) == 0


def test_sparsegpt_reconstructs_better_than_magnitude_on_the_same_calibration():
    errs = {}
    for method in ("magnitude", "sparsegpt"):
        report = prune_model(family("opt").eval(), batches(6), method, 0.5, progress=False)
        errs[method] = sum(r.rel_error for r in report.layers) / len(report.layers)
    assert errs["sparsegpt"] < errs["magnitude"]


def test_a_model_without_a_block_list_is_refused():
    class Odd(torch.nn.Module):
        config = type("C", (), {"num_hidden_layers": 3})()

    with pytest.raises(ScalesparseError, match="unsupported architecture Odd"):
        find_blocks(Odd())


def test_block_keyword_arguments_reach_the_device_inside_tuples_and_dicts():
    """Llama calls its blocks with position_embeddings=(cos, sin): a tuple of tensors must move too
    (the meta device stands in for a GPU here)."""
    from collections import namedtuple

    from scalesparse.pruning.calibrate import to_device

    Pair = namedtuple("Pair", "cos sin")
    kw = {"position_embeddings": (torch.ones(2), torch.zeros(2)), "mask": torch.ones(1), "cache": None,
          "nested": {"pair": Pair(torch.ones(1), torch.ones(1)), "ids": [torch.arange(3)]}, "flag": True}  # fmt: skip
    moved = to_device(kw, "meta")
    assert all(t.device.type == "meta" for t in moved["position_embeddings"])
    assert isinstance(moved["position_embeddings"], tuple) and moved["mask"].device.type == "meta"
    assert isinstance(moved["nested"]["pair"], Pair) and moved["nested"]["pair"].sin.device.type == "meta"
    assert moved["nested"]["ids"][0].device.type == "meta"
    assert moved["cache"] is None and moved["flag"] is True


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_without_the_error_report_each_method_pays_only_for_what_it_uses(method):
    """layer_error=False: the same pruned weights; Σxxᵀ only for SparseGPT (its error stays, free);
    magnitude runs no forward pass through the blocks at all."""
    full, lean = family("llama").eval(), family("llama").eval()
    want = prune_model(full, batches(), method, 0.5, progress=False)
    _, blocks = find_blocks(lean)
    forwards = []
    handles = [b.register_forward_hook(lambda *_: forwards.append(1)) for b in blocks]
    got = prune_model(lean, batches(), method, 0.5, progress=False, layer_error=False)
    for h in handles:
        h.remove()
    for a, b in zip(full.parameters(), lean.parameters()):
        assert torch.equal(a, b)
    if method == "sparsegpt":
        assert [r.rel_error for r in got.layers] == [r.rel_error for r in want.layers]
    else:
        assert all(r.rel_error is None for r in got.layers) and all(r.rel_error > 0 for r in want.layers)
    assert (len(forwards) == 0) == (method == "magnitude")


def reference_walk(model, method: str, sparsity: float) -> None:
    """The walk without its economies: every layer gathers its own statistics (SparseGPT its own
    Σxxᵀ) on whole-block forwards, and every block's pruned outputs are propagated."""
    from scalesparse.pruning import PRUNERS
    from scalesparse.pruning.calibrate import _run_block, capture_block_inputs

    _, blocks = find_blocks(model)
    with torch.no_grad():
        hidden, kwargs = capture_block_inputs(model, blocks, batches())
        for block in blocks:
            layers = linear_layers(block)
            pruners = {n: PRUNERS.get(method)(m) for n, m in layers.items()}
            handles = [m.register_forward_hook(lambda _m, args, _o, p=pruners[n]: p.add_batch(args[0]))
                       for n, m in layers.items()]  # fmt: skip
            for h in hidden:
                _run_block(block, h, kwargs)
            for handle in handles:
                handle.remove()
            for n, p in pruners.items():
                weight_matrix(layers[n]).copy_(p.prune(sparsity)[1])
            hidden = [_run_block(block, h, kwargs) for h in hidden]


@pytest.mark.parametrize("name", ["gpt2", "llama", "neox"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("layer_error", [True, False])
def test_the_walk_prunes_exactly_as_each_layer_on_its_own(name, method, layer_error):
    """Statistics gathered once per distinct input and shared, calibration passes that stop after the
    last layer's input, no propagation past the last block: the same weights, bit for bit."""
    want, got = family(name).eval(), family(name).eval()
    reference_walk(want, method, 0.5)
    prune_model(got, batches(), method, 0.5, progress=False, layer_error=layer_error)
    for (n, a), b in zip(want.named_parameters(), got.parameters()):
        assert torch.equal(a, b), n


def test_a_calibration_pass_reads_each_input_once_and_stops_after_the_last_layer(monkeypatch):
    """Llama, 3 batches, 2 blocks: Wanda sums x² for 4 distinct inputs per batch (q/k/v share one, gate/up
    another), not 7; down_proj (the last layer) runs in a calibration pass on the first batch only
    (its input is all that pass needs), and in no propagation after the last block."""
    from scalesparse.pruning.wanda import Wanda

    model = family("llama").eval()
    _, blocks = find_blocks(model)
    gathered, runs = [], {}
    add_batch = Wanda.add_batch
    monkeypatch.setattr(Wanda, "add_batch", lambda self, x: (gathered.append(self.layer), add_batch(self, x)))
    for i, b in enumerate(blocks):
        for n, m in linear_layers(b).items():
            m.register_forward_hook(lambda *_, key=(i, n): runs.__setitem__(key, runs.get(key, 0) + 1))
    prune_model(model, batches(3), "wanda", 0.5, progress=False, layer_error=False)
    assert len(gathered) == 2 * 4 * 3
    # block 0: 3 calibration batches + 3 propagated; block 1: 3 calibration batches, nothing propagated
    assert runs[(0, "self_attn.k_proj")] == 6 and runs[(1, "self_attn.k_proj")] == 3
    assert runs[(0, "mlp.down_proj")] == 1 + 3 and runs[(1, "mlp.down_proj")] == 1


class RoutedExperts(nn.Module):
    """Experts called in index order, only those a batch is routed to (as transformers 4.x's MoE blocks
    do): a batch whose first value is k reaches experts 0 … k-1."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(4, 4, bias=False) for _ in range(3))

    def forward(self, x):  # each expert reads its own tensor (its routed tokens), as in Mixtral
        return sum(e(x[:, 1:]) for e in list(self.experts)[: int(x[0, 0, 0])])


def test_an_expert_first_reached_in_a_later_batch_keeps_its_statistics():
    """Batch 1 reaches experts 0 and 1 (expert 1 runs last), batch 2 all three: its pass must not stop at
    expert 1, or expert 2 would have no statistics (and no Hessian) at all."""
    from scalesparse.pruning.calibrate import SharedInputs

    torch.manual_seed(0)
    block = RoutedExperts()
    layers = {f"experts.{i}": e for i, e in enumerate(block.experts)}
    first, second = torch.randn(1, 5, 4), torch.randn(1, 7, 4)
    first[0, 0, 0], second[0, 0, 0] = 2, 3
    pruners = {n: PRUNERS.get("sparsegpt")(m, external_gram=True) for n, m in layers.items()}
    shared = SharedInputs(pruners, gram=True)
    shared.run(block, layers, [first, second], {}, "cpu")
    shared.agree(layers, "cpu")
    shared.share()
    flat = [x[:, 1:].reshape(-1, 4).double() for x in (first, second)]
    for name, seen in (("experts.0", flat), ("experts.1", flat), ("experts.2", flat[1:])):
        want = sum(x.t() @ x for x in seen)
        torch.testing.assert_close(shared.of(name), want, rtol=1e-6, atol=1e-6, msg=name)
        assert int(pruners[name].nsamples) == sum(x.shape[0] for x in seen), name
