import math

import pytest
import torch
from torch import nn

from scalesparse.config import ModelConfig
from scalesparse.export import load_exported, write_model
from scalesparse.model import GPT, count_flops_per_token
from scalesparse.model.layers import MaskedLinear


def small(**kw) -> ModelConfig:
    base = {"d_model": 32, "n_layers": 2, "n_heads": 4, "seq_len": 16}
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("position", ["rotary", "learned"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_forward_shapes_and_initial_loss(position, activation):
    torch.manual_seed(0)
    m = GPT(small(position=position, activation=activation), 100)
    idx = torch.randint(0, 100, (3, 16))
    tgt = torch.randint(0, 100, (3, 16))
    logits, loss = m(idx, tgt)
    assert logits.shape == (3, 16, 100)
    assert abs(loss.item() - math.log(100)) < 0.3  # small init ≈ uniform prediction


def test_causal_future_tokens_do_not_change_past_logits():
    torch.manual_seed(0)
    m = GPT(small(), 50).eval()
    a = torch.randint(0, 50, (1, 16))
    b = a.clone()
    b[0, 10:] = (b[0, 10:] + 7) % 50
    la, _ = m(a)
    lb, _ = m(b)
    torch.testing.assert_close(la[0, :10], lb[0, :10])
    assert not torch.allclose(la[0, 10:], lb[0, 10:])


def test_weight_tying_and_parameter_count():
    cfg = small(activation="gelu")
    m = GPT(cfg, 100)
    assert m.lm_head.weight is m.embed_tokens.weight
    d, L, f = 32, 2, 4 * 32
    per_block = 4 * d * d + 2 * d * f + 2 * d  # attention, mlp, two RMSNorm weights
    assert m.num_params() == 100 * d + L * per_block + d
    assert m.num_params(non_embedding=True) == L * per_block + d
    untied = GPT(small(activation="gelu", tie_embeddings=False), 100)
    assert untied.num_params() == m.num_params() + 100 * d


def test_flops_count_matches_closed_form():
    cfg = small(activation="gelu")
    f = count_flops_per_token(cfg, 100)
    d, L, T, ff = 32, 2, 16, 128
    matmul = 2 * (L * (4 * d * d + 2 * d * ff) + d * 100)
    assert f["forward"] == matmul + L * 4 * T * d
    assert f["train"] == 3 * f["forward"]


def test_masked_linear_equals_linear_on_masked_weights_and_blocks_gradient():
    torch.manual_seed(0)
    ml = MaskedLinear(8, 6)
    mask = (torch.rand(6, 8) > 0.5).float()
    ml.set_mask(mask)
    ref = nn.Linear(8, 6, bias=False)
    ref.weight.data = ml.weight.data * mask
    x = torch.randn(4, 8)
    torch.testing.assert_close(ml(x), ref(x))
    ml(x).sum().backward()
    assert torch.all(ml.weight.grad[mask == 0] == 0)
    assert torch.any(ml.weight.grad[mask == 1] != 0)
    with pytest.raises(ValueError, match="mask shape"):
        ml.set_mask(torch.ones(3, 3))


def test_sequence_longer_than_context_is_refused():
    m = GPT(small(), 10)
    with pytest.raises(ValueError, match="longer than model.seq_len=16"):
        m(torch.zeros(1, 17, dtype=torch.long))


def test_export_loads_back_and_in_transformers_as_llama(tmp_path):
    """Independent reference: transformers' own Llama implementation on the exported weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = small()
    model = GPT(cfg, 120).eval()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    write_model(weights, cfg, 120, tmp_path / "out")
    idx = torch.randint(0, 120, (2, 16))
    ours, _ = model(idx)
    again, _ = load_exported(tmp_path / "out").eval()(idx)
    torch.testing.assert_close(again, ours, rtol=0, atol=0)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        theirs = hf(idx).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
