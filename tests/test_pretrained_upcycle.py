"""Sparse upcycling: a dense pretrained model loaded with model.mlp: moe has E experts per layer that
are copies of its MLP, and with renormalised top-k gates computes exactly the dense function at step 0
(whatever the random router picks); it then trains with the grouped and loop backends, and the
router's choices move the experts apart."""

from __future__ import annotations

import pytest
import torch

from scalesparse.config import config_from_dict
from scalesparse.data import prepare_data
from scalesparse.errors import ConfigError
from scalesparse.export import consolidate
from scalesparse.model import GPT
from scalesparse.model.pretrained import load_pretrained, resolve_pretrained
from scalesparse.train import checkpoint as ckpt
from tests.model.test_families import T, ours_from, save_hf, tokens
from tests.test_pretrained import run_config

transformers = pytest.importorskip("transformers")

MOE = {"num_experts": 4, "top_k": 2}


def upcycled(folder, backend: str = "loop", **moe) -> GPT:
    cfg = resolve_pretrained(config_from_dict({"model": {"from_pretrained": str(folder), "seq_len": T, "mlp": "moe"},
                                               "moe": {**MOE, "backend": backend, **moe}}))  # fmt: skip
    torch.manual_seed(0)
    model = GPT(cfg.model, cfg.model.vocab_size, cfg.moe)
    load_pretrained(model, folder)
    return model.eval()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("backend", ["loop", "grouped"])
def test_upcycled_logits_equal_the_dense_model(family, backend, tmp_path):
    ref = save_hf(family, tmp_path)
    dense, moe = ours_from(tmp_path), upcycled(tmp_path, backend)
    idx = tokens()
    with torch.no_grad():
        want, got, hf = dense(idx)[0], moe(idx)[0], ref(idx).logits
    layer = moe.layers[0].mlp
    assert torch.equal(layer.experts.gate_up_proj[0], layer.experts.gate_up_proj[3])
    dense_gate_up = torch.cat([dense.layers[0].mlp.gate_proj.weight, dense.layers[0].mlp.up_proj.weight])
    assert torch.equal(layer.experts.gate_up_proj[1], dense_gate_up)
    # the router is random, not degenerate: tokens do go to different experts
    assert int((layer.stats["load"] > 0).sum()) == MOE["num_experts"]
    diff = (got - want).abs().max().item()
    print(f"{family}/{backend}: upcycled vs dense max abs logit diff {diff:.2e}, vs transformers "
          f"{(got - hf).abs().max().item():.2e}")  # fmt: skip
    assert want.std() > 0.5 and diff <= 1e-5
    assert (got - hf).abs().max().item() <= 1e-4


@pytest.mark.parametrize(
    ("moe", "match"),
    [({"renormalize": False}, "moe.renormalize: false while upcycling"),
     ({"d_ff": 32}, "moe.d_ff: 32 differs from the dense MLP's 96"),
     ({"capacity_factor": 1.0}, "moe.capacity_factor: 1.0 while upcycling")],
)  # fmt: skip
def test_upcycling_refusals(moe, match, tmp_path):
    save_hf("llama", tmp_path)
    with pytest.raises(ConfigError, match=match) as e:
        upcycled(tmp_path, **moe)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("backend", ["grouped", "loop"])
def test_upcycled_model_trains(backend, tmp_path, small_data):
    pytest.importorskip("deepspeed")
    from scalesparse.train.single import train_in_process

    save_hf("llama", tmp_path / "src")
    raw = run_config(tmp_path / "src", tmp_path / "run", small_data)
    raw["model"]["mlp"] = "moe"
    raw["moe"] = {**MOE, "backend": backend}
    raw = config_from_dict(raw)
    data = prepare_data(raw.data)
    cfg = resolve_pretrained(raw, data.vocab_size)
    rows = train_in_process(cfg, data)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert any("expert_load" in r for r in rows)
    weights = consolidate(ckpt.latest_checkpoint(cfg.run_path / "checkpoints"))
    experts = weights["layers.0.mlp.experts.gate_up_proj"]
    assert not torch.equal(experts[0], experts[1])  # routed differently, the copies have moved apart


def test_upcycled_llama_exports_as_mixtral(tmp_path):
    from scalesparse.export import write_model

    save_hf("llama", tmp_path / "src")
    model_section = {"from_pretrained": str(tmp_path / "src"), "seq_len": T, "mlp": "moe"}
    cfg = resolve_pretrained(config_from_dict({"model": model_section, "moe": {**MOE, "backend": "loop"}}))
    model = upcycled(tmp_path / "src")
    with torch.no_grad():  # experts no longer copies (as after training): the export must keep each
        model.layers[0].mlp.experts.down_proj[2].mul_(1.5)
    write_model(model.state_dict(), cfg.model, cfg.model.vocab_size, tmp_path / "out", moe=cfg.moe)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32,
                                                           attn_implementation="eager").eval()  # fmt: skip
    assert hf.config.model_type == "mixtral" and hf.config.num_local_experts == MOE["num_experts"]
    idx = tokens()
    with torch.no_grad():
        diff = (hf(idx).logits - model(idx)[0]).abs().max().item()
    print(f"upcycled llama exported as Mixtral: max abs logit diff {diff:.2e}")
    assert diff <= 1e-4
