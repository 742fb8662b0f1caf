"""model.from_pretrained's bad inputs: each refused in one line, naming what is wrong, before any
worker starts (resolve_pretrained is what the driver calls before preparing data)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from scalesparse.config import config_from_dict
from scalesparse.errors import ScalesparseError
from scalesparse.model.pretrained import resolve_pretrained
from tests.model.test_families import T, save_hf

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    save_hf("llama", folder)
    return folder


def resolve(folder, model=None, tokenizer_vocab=None, **sections):
    cfg = config_from_dict({"model": {"from_pretrained": str(folder), "seq_len": T, **(model or {})}, **sections})
    return resolve_pretrained(cfg, tokenizer_vocab)


def refused(match: str, *args, **kw) -> str:
    with pytest.raises(ScalesparseError, match=match) as e:
        resolve(*args, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def copy_of(src, dst, edit_config=None, edit_weights=None):
    dst.mkdir()
    hf = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(edit_config(hf) if edit_config else hf))
    weights = load_file(str(src / "model.safetensors"))
    save_file(edit_weights(weights) if edit_weights else weights, str(dst / "model.safetensors"))
    return dst


def test_resolves_architecture_and_shapes(llama_dir):
    cfg = resolve(llama_dir)
    m = cfg.model
    assert (m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff, m.vocab_size) == (64, 2, 4, 2, 96, 300)
    assert (m.rope_theta, m.rope_scaling, m.rope_factor, m.tie_embeddings) == (500000.0, "llama3", 8.0, False)
    assert resolve(llama_dir, {"d_model": 64}).model == m  # a setting equal to the checkpoint's is fine


def test_no_config_json(tmp_path):
    refused("has no config.json", tmp_path)


def test_unsupported_model_type_names_the_supported(llama_dir, tmp_path):
    folder = copy_of(llama_dir, tmp_path / "x", edit_config=lambda hf: {**hf, "model_type": "gpt2"})
    msg = refused("model_type 'gpt2' is not supported", folder)
    assert "llama, mistral, mixtral, qwen2" in msg


def test_missing_tensor_is_named(llama_dir, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    folder = copy_of(llama_dir, tmp_path / "x", edit_weights=lambda w: {k: v for k, v in w.items() if k != name})
    refused(f"tensor {name} is missing", folder)


def test_wrong_shape_is_named(llama_dir, tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"
    folder = copy_of(llama_dir, tmp_path / "x", edit_weights=lambda w: {**w, name: torch.zeros(64, 64)})
    refused(rf"tensor {name} has shape \[64, 64\], the config implies \[32, 64\]", folder)


def test_no_safetensors_pickles_refused(llama_dir, tmp_path):
    folder = tmp_path / "x"
    folder.mkdir()
    (folder / "config.json").write_text((llama_dir / "config.json").read_text())
    (folder / "pytorch_model.bin").write_bytes(b"")
    refused("pytorch_model.bin is a pickle, which can run code when loaded; convert it to safetensors or set "
            "model.allow_pickle: true if you trust it", folder)  # fmt: skip


def test_shape_changing_override_refused(llama_dir):
    refused("model.d_model: 96 differs from the pretrained model's 64", llama_dir, {"d_model": 96})
    refused("model.rope_theta: 10000.5 differs", llama_dir, {"rope_theta": 10000.5})


def test_tokenizer_larger_than_embedding(llama_dir):
    refused("the tokenizer has 301 tokens but the embedding only 300 rows", llama_dir, tokenizer_vocab=301)
    assert resolve(llama_dir, tokenizer_vocab=257).model.vocab_size == 300  # fewer is normal (padded rows)


def test_context_longer_than_positions(llama_dir):
    refused("model.seq_len: 128 is longer than the 64 positions", llama_dir, {"seq_len": 128})


def test_with_init_from(llama_dir, tmp_path):
    refused("model.from_pretrained and train.init_from both", llama_dir, train={"init_from": str(tmp_path)})


def test_moe_on_a_dense_model_upcycles(llama_dir):
    cfg = resolve(llama_dir, {"mlp": "moe"})  # no longer refused: tests/test_pretrained_upcycle.py
    assert cfg.model.mlp == "moe" and cfg.model.d_ff == 96
    refused("moe.renormalize: false while upcycling", llama_dir, {"mlp": "moe"}, moe={"renormalize": False})


def test_tokenizer_comes_from_the_folder(llama_dir, tmp_path):
    folder = copy_of(llama_dir, tmp_path / "x")
    assert resolve(folder).data.tokenizer == "bpe"  # no tokenizer files: the configured one
    (folder / "tokenizer.json").write_text("{}")
    data = resolve(folder).data
    assert (data.tokenizer, data.tokenizer_path) == ("hf", str(folder))
    assert resolve(folder, data={"tokenizer": "byte"}).data.tokenizer == "byte"  # a chosen one stays
