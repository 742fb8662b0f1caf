"""Cheap checks of a pretrained model folder, without importing torch or transformers: the `prune`
command runs them first, so a bad path fails in a fraction of a second, and a driver that hands the
work to Ray workers never pays for those imports (~1.3 s)."""

from __future__ import annotations

from pathlib import Path

from scalesparse.errors import ConfigError


def check_model_folder(folder: str, gguf_file: str | None = None, allow_pickle: bool = False) -> dict:
    """Raise a ConfigError naming the problem; return from_pretrained's keyword arguments for the weights."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ConfigError(f"model: {path} is not a folder")
    if gguf_file is not None:
        if not (path / gguf_file).is_file():
            raise ConfigError(f"gguf_file: {path / gguf_file} not found")
        return {"gguf_file": gguf_file}
    if not (path / "config.json").is_file():
        raise ConfigError(f"model: {path} has no config.json (not a transformers model folder)")
    safetensors = list(path.glob("*.safetensors"))
    pickles = list(path.glob("pytorch_model*.bin"))
    if not safetensors and not pickles:
        raise ConfigError(f"model: {path} has no weights (*.safetensors)")
    if not safetensors and not allow_pickle:
        raise ConfigError(f"model: {pickles[0]} is a pickle, which can run code when loaded; convert it to "
                          f"safetensors or pass --allow-pickle if you trust it")  # fmt: skip
    return {"use_safetensors": bool(safetensors)}
