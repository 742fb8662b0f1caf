"""Checkpoint → one consolidated model: model.safetensors + scalesparse.json (+ transformers files).

Export reads only our own safetensors shards (model_rank{r}.safetensors) and JSON, never
DeepSpeed's pickled files, so exporting an untrusted checkpoint cannot run code.
A swiglu/rotary/rmsnorm/bias-free model uses Llama's tensor names and gets a transformers
`config.json` + tokenizer files, so `AutoModelForCausalLM.from_pretrained(out)` loads it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from scalesparse.config import ModelConfig, MoEConfig, config_from_dict
from scalesparse.errors import CheckpointError
from scalesparse.train import checkpoint as ckpt
from scalesparse.train.experts import consolidate_experts

META = "scalesparse.json"
WEIGHTS = "model.safetensors"


def consolidate(folder: Path) -> dict[str, torch.Tensor]:
    """Full fp32 state dict (a tied weight once) from a checkpoint's model shards."""
    shards = sorted(folder.glob("model_rank*.safetensors"))
    if not shards:
        raise CheckpointError(f"{folder}: no model_rank*.safetensors shards")
    with safe_open(str(shards[0]), "pt") as f:
        meta = f.metadata() or {}
    experts = consolidate_experts(folder)  # expert-parallel runs keep experts out of the model shards
    if meta.get("format") == "full":
        return {**load_file(str(shards[0])), **experts}
    if meta.get("format") != "zero3":
        raise CheckpointError(f"{shards[0]}: unknown shard format {meta.get('format')!r}")
    world = int(meta["world"])
    if len(shards) != world:
        raise CheckpointError(f"{folder}: {len(shards)} of {world} ZeRO-3 model shards present")
    shapes = json.loads(meta["shapes"])
    parts = [load_file(str(folder / f"model_rank{r}.safetensors")) for r in range(world)]
    out = {}
    for name, shape in shapes.items():
        numel = math.prod(shape)
        out[name] = torch.cat([p[name] for p in parts])[:numel].view(shape).clone()
    return {**out, **experts}


def llama_compatible(m: ModelConfig) -> bool:
    return (m.activation == "swiglu" and m.position == "rotary" and m.norm == "rmsnorm" and not m.bias
            and m.mlp == "dense")  # fmt: skip


def export_checkpoint(spec: str | Path, out: Path) -> Path:
    folder = ckpt.resolve(spec)
    ckpt.verify(folder)
    state = ckpt.read_state(folder)
    cfg = config_from_dict(state["config"])
    tokenizer = folder / "tokenizer.json"
    return write_model(consolidate(folder), cfg.model, state["vocab_size"], out,
                       tokenizer if tokenizer.is_file() else None,
                       info={"step": state["step"], "source": str(folder)}, moe=cfg.moe)  # fmt: skip


def write_model(weights: dict[str, torch.Tensor], model_cfg: ModelConfig, vocab: int, out: Path,
                tokenizer: Path | None = None, info: dict | None = None, moe: MoEConfig | None = None) -> Path:
    """Write a consolidated state dict (scalesparse names) as an exported model folder."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"--out: cannot create {out} ({e.strerror})") from None
    hf = llama_compatible(model_cfg)
    if hf:
        weights = {(k if k.startswith("lm_head") else f"model.{k}"): v for k, v in weights.items()}
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / WEIGHTS), metadata={"format": "pt"})
    meta = {"model": dataclasses.asdict(model_cfg), "vocab_size": vocab, **(info or {})}
    if model_cfg.mlp == "moe":
        meta["moe"] = dataclasses.asdict(moe or MoEConfig())
    (out / META).write_text(json.dumps(meta, indent=1))
    if tokenizer is not None:
        shutil.copy(tokenizer, out / "tokenizer.json")
    if hf:
        _write_transformers_files(model_cfg, vocab, out, tokenizer)
    return out


def _write_transformers_files(m: ModelConfig, vocab: int, out: Path, tokenizer: Path | None) -> None:
    from transformers import LlamaConfig

    LlamaConfig(
        vocab_size=vocab, hidden_size=m.d_model, intermediate_size=m.hidden_ff, num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads, num_key_value_heads=m.n_heads, max_position_embeddings=m.seq_len,
        rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta, tie_word_embeddings=m.tie_embeddings,
        attention_bias=False, mlp_bias=False, hidden_act="silu", architectures=["LlamaForCausalLM"],
    ).save_pretrained(out)  # fmt: skip
    if tokenizer is not None and json.loads(tokenizer.read_text()).get("type") != "byte":
        from transformers import PreTrainedTokenizerFast

        PreTrainedTokenizerFast(tokenizer_file=str(tokenizer), eos_token="<|endoftext|>").save_pretrained(out)


def read_exported_meta(folder: Path) -> dict:
    folder = Path(folder)
    if not (folder / META).is_file() or not (folder / WEIGHTS).is_file():
        raise CheckpointError(f"{folder}: not an exported model (needs {META} and {WEIGHTS}; see `scalesparse export`)")
    try:
        return json.loads((folder / META).read_text())
    except ValueError:
        raise CheckpointError(f"{folder / META}: not valid JSON") from None


def load_weights(model, folder: Path) -> None:
    """Copy an exported model's weights into `model` (safetensors only), naming what does not fit."""
    folder = Path(folder)
    sd = {k.removeprefix("model."): v for k, v in load_file(str(folder / WEIGHTS)).items()}
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # a shape mismatch
        why = str(e).splitlines()[-1].strip()
        raise CheckpointError(f"{folder / WEIGHTS}: does not fit this model ({why})") from None
    missing = [k for k in missing if not (k == "lm_head.weight" and model.cfg.tie_embeddings)]
    if missing or unexpected:
        raise CheckpointError(f"{folder / WEIGHTS}: missing {missing[:3]}, unexpected {unexpected[:3]}")


def load_exported(folder: Path):
    """An exported model as a scalesparse GPT (weights loaded with safetensors only)."""
    from scalesparse.model import GPT

    meta = read_exported_meta(folder)
    cfg = config_from_dict({"model": meta["model"], **({"moe": meta["moe"]} if "moe" in meta else {})})
    model = GPT(cfg.model, meta["vocab_size"], cfg.moe)
    load_weights(model, folder)
    return model
