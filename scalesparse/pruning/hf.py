"""Loading a pretrained causal LM safely, and finding its decoder blocks by walking the model."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from scalesparse.errors import ConfigError, ScalesparseError


def check_model_folder(folder: str, gguf_file: str | None = None, allow_pickle: bool = False) -> dict:
    """Cheap checks of a model folder before anything is loaded; returns from_pretrained's kwargs."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ConfigError(f"model: {path} is not a folder")
    kwargs: dict = {"dtype": torch.float32}
    if gguf_file is not None:
        if not (path / gguf_file).is_file():
            raise ConfigError(f"gguf_file: {path / gguf_file} not found")
        kwargs["gguf_file"] = gguf_file
    else:
        if not (path / "config.json").is_file():
            raise ConfigError(f"model: {path} has no config.json (not a transformers model folder)")
        safetensors = list(path.glob("*.safetensors"))
        pickles = list(path.glob("pytorch_model*.bin"))
        if not safetensors and not pickles:
            raise ConfigError(f"model: {path} has no weights (*.safetensors)")
        if not safetensors and not allow_pickle:
            raise ConfigError(f"model: {pickles[0]} is a pickle, which can run code when loaded; convert it to "
                              f"safetensors or pass --allow-pickle if you trust it")  # fmt: skip
        kwargs["use_safetensors"] = bool(safetensors)
    return kwargs


def load_causal_lm(folder: str, gguf_file: str | None = None, allow_pickle: bool = False):
    """(model in fp32 eval mode, tokenizer). Refuses pickled weights unless allowed; never reaches a hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    kwargs = check_model_folder(folder, gguf_file, allow_pickle)
    path = Path(folder).expanduser()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except ValueError as e:  # an architecture transformers has no causal-LM class for
        raise ConfigError(f"model: {path}: not a supported causal LM ({str(e).splitlines()[0][:200]})") from None
    tokenizer = AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf_file} if gguf_file else {}))
    if getattr(model, "hf_quantizer", None) is not None:  # GGUF: weights are dequantised already
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model.eval(), tokenizer


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder's list of transformer blocks: the ModuleList whose length is the layer count."""
    cfg = model.config
    n = next((getattr(cfg, k) for k in ("num_hidden_layers", "n_layer", "num_layers") if hasattr(cfg, k)), None)
    candidates = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if not candidates:
        raise ScalesparseError(f"unsupported architecture {type(model).__name__}: no list of {n} decoder blocks found")
    return min(candidates, key=lambda c: c[0].count("."))  # the outermost such list


def linear_layers(block: nn.Module) -> dict[str, nn.Module]:
    """Prunable matrices inside a block: nn.Linear and GPT-2's Conv1D."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}
