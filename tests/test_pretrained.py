"""A pretrained transformers model through the trainer and back: load → train 2 steps (the worker
loop in this process, no Ray) → export → transformers reloads it with the same logits and weights."""

from __future__ import annotations

import json

import pytest
import torch

from scalesparse.config import config_from_dict
from scalesparse.data import prepare_data
from scalesparse.export import consolidate, export_checkpoint
from scalesparse.model import GPT
from scalesparse.model.pretrained import resolve_pretrained
from scalesparse.train import checkpoint as ckpt
from tests.model.test_families import T, save_hf, tokens

transformers = pytest.importorskip("transformers")
pytest.importorskip("deepspeed")


def run_config(folder, run_dir, small_data) -> dict:
    return {
        "name": "pretrained",
        "run_dir": str(run_dir),
        "model": {"from_pretrained": str(folder), "seq_len": T},
        "moe": {"backend": "grouped"},
        # bytes (257 tokens) fit the tiny models' 300-row embedding
        "data": {**small_data, "tokenizer": "byte", "val_blocks": 4},
        "train": {"steps": 2, "global_batch_size": 4, "micro_batch_size": 2, "warmup_steps": 1, "lr": 1e-3},
        "parallel": {"workers": 1, "zero_stage": 2},
        "resources": {"cpus_per_worker": 2},
        "checkpoint": {"every": 2, "keep": 1},
        "logging": {"log_every": 1, "tensorboard": False, "progress": False},
    }  # fmt: skip


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_load_train_export_reload(family, tmp_path, small_data):
    from scalesparse.train.single import train_in_process

    src = tmp_path / "src"
    ref = save_hf(family, src)
    (src / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))  # travels with the export
    raw = config_from_dict(run_config(src, tmp_path / "run", small_data))
    data = prepare_data(raw.data)
    cfg = resolve_pretrained(raw, data.vocab_size)
    rows = train_in_process(cfg, data)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]

    checkpoint = ckpt.latest_checkpoint(cfg.run_path / "checkpoints")
    trained_weights = consolidate(checkpoint)
    trained = GPT(cfg.model, cfg.model.vocab_size, cfg.moe)
    trained.load_state_dict(trained_weights, strict=False)
    trained.eval()
    # training moved the pretrained weights (the test would pass vacuously on an untouched model)
    before = ref.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(trained.layers[0].self_attn.q_proj.weight, before)

    out = export_checkpoint(checkpoint, tmp_path / "export")
    exported = json.loads((out / "config.json").read_text())
    original = json.loads((src / "config.json").read_text())
    assert exported["architectures"] == original["architectures"]
    assert set(original) - {"transformers_version", "dtype", "torch_dtype"} <= set(exported)
    assert (out / "tokenizer_config.json").is_file()

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    hf.eval()
    idx = tokens()
    with torch.no_grad():
        diff = (hf(idx).logits - trained(idx)[0]).abs().max().item()
    print(f"{family}: trained vs transformers-reloaded export, max abs logit diff {diff:.2e}")
    assert diff <= 1e-4


def test_exact_zeros_survive_export(tmp_path):
    """A pruned model's zeros are zeros in transformers after export, bit for bit."""
    from scalesparse.export import write_model
    from scalesparse.model.pretrained import load_pretrained

    src = tmp_path / "src"
    save_hf("qwen2", src)
    cfg = resolve_pretrained(config_from_dict({"model": {"from_pretrained": str(src), "seq_len": T}}))
    model = GPT(cfg.model, cfg.model.vocab_size)
    load_pretrained(model, src)
    w = model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        w[w.abs() < w.abs().median()] = 0.0  # half the weights pruned
    zeros = w == 0
    write_model(model.state_dict(), cfg.model, cfg.model.vocab_size, tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    got = hf.model.layers[1].mlp.down_proj.weight
    assert torch.equal(got == 0, zeros) and zeros.float().mean() > 0.45
    assert torch.equal(hf.model.layers[1].self_attn.q_proj.bias, model.layers[1].self_attn.q_proj.bias)
