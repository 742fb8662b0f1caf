"""Cheap checks of a pretrained model folder, without importing torch or transformers: the `prune`
command runs them first, so a bad path fails in a fraction of a second, and a driver that hands the
work to Ray workers never pays for those imports (~1.3 s)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from scalesparse.errors import ConfigError

# Files AutoTokenizer builds a tokenizer from (fast tokenizer, sentencepiece models, BPE / WordPiece
# vocabularies). Without any of them transformers 5 quietly builds an empty tokenizer, and the run
# fails later with "0 calibration tokens".
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model")  # fmt: skip
# Where configs state how many positions the model was built for (Llama/OPT/NeoX, GPT-2, old GPT-2).
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx")


def check_model_folder(folder: str, gguf_file: str | None = None, allow_pickle: bool = False) -> dict:
    """Raise a ConfigError naming the problem; return from_pretrained's keyword arguments for the weights."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ConfigError(f"model: {path} is not a folder")
    if gguf_file is not None:
        if not (path / gguf_file).is_file():
            raise ConfigError(f"gguf_file: {path / gguf_file} not found")
        return {"gguf_file": gguf_file}
    read_model_config(path)
    safetensors = list(path.glob("*.safetensors"))
    pickles = list(path.glob("pytorch_model*.bin"))
    if not safetensors and not pickles:
        raise ConfigError(f"model: {path} has no weights (*.safetensors)")
    if not safetensors and not allow_pickle:
        raise ConfigError(f"model: {pickles[0]} is a pickle, which can run code when loaded; convert it to "
                          f"safetensors or pass --allow-pickle if you trust it")  # fmt: skip
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"model: {path} has no tokenizer (looked for {', '.join(TOKENIZER_FILES)}); copy the "
                          f"tokenizer files of the model it came from into it")  # fmt: skip
    return {"use_safetensors": bool(safetensors)}


def read_model_config(path: Path) -> dict[str, Any]:
    """config.json as a dict, or a one-line error saying what is wrong with it."""
    file = path / "config.json"
    if not file.is_file():
        raise ConfigError(f"model: {path} has no config.json (not a transformers model folder)")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"model: {file} is not a text file") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"model: {file} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"model: {file} must hold a JSON object, got {type(config).__name__}")
    return config


def context_length(config: dict[str, Any]) -> tuple[str, int] | None:
    """(key, positions) the model was built for, when its config says; None when it does not."""
    for key in CONTEXT_KEYS:
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return key, value
    return None
