"""Each supported transformers family, as a tiny random model built from a config (no download),
gives the same logits in scalesparse as in transformers (fp32, CPU, eager attention)."""

from __future__ import annotations

import pytest
import torch

from scalesparse.config import config_from_dict
from scalesparse.model import GPT
from scalesparse.model.pretrained import load_pretrained, resolve_pretrained

transformers = pytest.importorskip("transformers")

VOCAB, T = 300, 32
COMMON = {"vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "intermediate_size": 96, "max_position_embeddings": 64,
          "rms_norm_eps": 1e-5, "tie_word_embeddings": False}  # fmt: skip
FAMILIES = {
    # Llama-3.1-style rope scaling whose original context (16) is shorter than T, so it matters
    "llama": (
        "LlamaConfig",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            }
        },
    ),
    "llama-tied": ("LlamaConfig", {"tie_word_embeddings": True, "num_key_value_heads": 4}),  # SmolLM2's shape
    # a window shorter than the sequence, and a head_dim that is not hidden / heads
    "mistral": ("MistralConfig", {"sliding_window": 8, "head_dim": 24}),
    "qwen2": ("Qwen2Config", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
}


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights large enough that a layout mistake moves logits far beyond the tolerance; biases and
    norm gains non-trivial (transformers initialises them to 0 and 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if "norm" in name else 0.15 * noise)


def hf_model(family: str):
    cls_name, extra = FAMILIES[family]
    hf_cfg = getattr(transformers, cls_name)(**{**COMMON, **extra})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager", dtype=torch.float32)
    randomize(model)
    return model.eval()


def save_hf(family: str, folder) -> torch.nn.Module:
    model = hf_model(family)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def ours_from(folder, **model) -> torch.nn.Module:
    cfg = resolve_pretrained(config_from_dict({"model": {"from_pretrained": str(folder), "seq_len": T, **model},
                                               "moe": {"backend": "loop"}}))  # fmt: skip
    ours = GPT(cfg.model, cfg.model.vocab_size, cfg.moe)
    load_pretrained(ours, folder)
    return ours.eval()


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_same_logits_as_transformers(family, tmp_path):
    ref = save_hf(family, tmp_path)
    ours = ours_from(tmp_path)
    idx = tokens()
    with torch.no_grad():
        expected = ref(idx).logits
        got, _ = ours(idx)
    assert expected.std() > 0.5  # logits of a real scale: a wrong layout could not hide under 1e-4
    diff = (got - expected).abs().max().item()
    print(f"{family}: max abs logit diff {diff:.2e}")
    assert diff <= 1e-4


def test_first_loss_equals_transformers_loss(tmp_path):
    ref = save_hf("llama", tmp_path)
    ours = ours_from(tmp_path)
    idx = tokens(2)
    with torch.no_grad():
        # transformers shifts labels itself; ours takes next-token targets
        expected = ref(idx, labels=idx).loss
        _, loss = ours(idx[:, :-1], idx[:, 1:])
    assert abs(loss.item() - expected.item()) < 1e-5


@pytest.mark.parametrize("family,drop", [("llama", "rope_scaling"), ("mistral", "sliding_window"),
                                         ("qwen2", "qkv_bias")])  # fmt: skip
def test_each_family_feature_changes_the_logits(family, drop, tmp_path):
    """The features the families need are exercised by the tests above: without each one the logits
    differ by far more than the tolerance."""
    save_hf(family, tmp_path)
    ours = ours_from(tmp_path)
    cfg = ours.cfg
    off = {"rope_scaling": "none", "sliding_window": None, "qkv_bias": False}[drop]
    import dataclasses

    other = GPT(dataclasses.replace(cfg, **{drop: off}), cfg.vocab_size).eval()
    other.load_state_dict(ours.state_dict(), strict=False)
    idx = tokens()
    with torch.no_grad():
        assert (other(idx)[0] - ours(idx)[0]).abs().max() > 1e-2


def test_mixtral_experts_map_into_the_moe_layer(tmp_path):
    ref = save_hf("mixtral", tmp_path)
    ours = ours_from(tmp_path)
    moe = ours.layers[0].mlp
    hf_moe = ref.model.layers[0].mlp
    assert moe.experts.gate_up_proj.shape == (4, 2 * 96, 64) and moe.moe.top_k == 2 and moe.moe.renormalize
    x = torch.randn(10, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        routing = moe.router(x)
        _, hf_weights, hf_experts = hf_moe.gate(x)
    torch.testing.assert_close(routing.experts, hf_experts)
    torch.testing.assert_close(routing.weights, hf_weights)
