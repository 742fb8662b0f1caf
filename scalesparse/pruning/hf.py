"""Loading a pretrained causal LM safely, and finding its decoder blocks by walking the model."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from scalesparse.errors import ConfigError, ScalesparseError
from scalesparse.pruning.model_folder import check_model_folder


def load_causal_lm(folder: str, gguf_file: str | None = None, allow_pickle: bool = False):
    """(model in fp32 eval mode, tokenizer). Refuses pickled weights unless allowed; never reaches a hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    kwargs = {**check_model_folder(folder, gguf_file, allow_pickle), "dtype": torch.float32}
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
