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
from scalesparse.model.families.base import Family
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
            and not m.qkv_bias and m.sliding_window is None and m.mlp == "dense")  # fmt: skip


# tokenizer files a transformers folder may carry: copied back so the export loads with its tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json")  # fmt: skip


def transformers_family(m: ModelConfig) -> tuple[Family | None, dict | None]:
    """The family an export is written as, and the source's config.json to keep its keys: the
    pretrained folder's family when the model came from one, else Llama when the model fits it."""
    from scalesparse.model.families import family_named

    source = Path(m.from_pretrained) / "config.json" if m.from_pretrained else None
    if source is not None and source.is_file():
        original = json.loads(source.read_text())
        family = family_named(original["model_type"])
        if m.mlp == "moe" and family.moe_fields(original) is None:  # upcycled: the dense family has no experts
            if family.model_type in ("llama", "mistral"):  # Mixtral is Mistral's attention with experts
                return family_named("mixtral"), original
            return None, None  # (Qwen2's MoE has shared experts): scalesparse's own format
        return family, original
    if m.from_pretrained:  # the folder has gone: the family follows from what the model has
        kind = "mixtral" if m.mlp == "moe" else "qwen2" if m.qkv_bias else "mistral" if m.sliding_window else "llama"
        return family_named(kind), None
    return (family_named("llama"), None) if llama_compatible(m) else (None, None)


def export_checkpoint(spec: str | Path, out: Path) -> Path:
    folder = ckpt.resolve(spec)
    ckpt.verify(folder)
    state = ckpt.read_state(folder)
    cfg = config_from_dict(state["config"])
    tokenizer = folder / "tokenizer.json"
    vocab = cfg.model.vocab_size or state["vocab_size"]  # a pretrained embedding may outnumber the tokenizer
    weights = consolidate(folder)
    info = {"step": state["step"], "source": str(folder)}
    if cfg.sparsity.method != "none":  # what the export holds, layer by layer (the masks' zeros, exactly)
        info["sparsity"] = layer_sparsity(weights, cfg.sparsity.include, cfg.sparsity.exclude)
    return write_model(weights, cfg.model, vocab, out, tokenizer if tokenizer.is_file() else None,
                       info=info, moe=cfg.moe)  # fmt: skip


def layer_sparsity(weights: dict[str, torch.Tensor], include, exclude) -> dict:
    """Exact zeros of the weights of the layers sparsity masks (module-name globs, as in training):
    the fraction per layer and over all of them together."""
    import fnmatch

    layers = {name.removesuffix(".weight"): w for name, w in weights.items() if name.endswith(".weight")}
    def masked(n: str) -> bool:
        return any(fnmatch.fnmatchcase(n, p) for p in include) and not any(fnmatch.fnmatchcase(n, p) for p in exclude)

    chosen = {n: w for n, w in sorted(layers.items()) if masked(n)}
    zeros = {n: int((w == 0).sum()) for n, w in chosen.items()}
    total = sum(w.numel() for w in chosen.values())
    return {"global": sum(zeros.values()) / max(1, total),
            "layers": {n: zeros[n] / w.numel() for n, w in chosen.items()}}  # fmt: skip


def write_model(weights: dict[str, torch.Tensor], model_cfg: ModelConfig, vocab: int, out: Path,
                tokenizer: Path | None = None, info: dict | None = None, moe: MoEConfig | None = None) -> Path:
    """Write a consolidated state dict (scalesparse names) as an exported model folder: in a
    transformers family's names and config.json when the model is one (see transformers_family)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"--out: cannot create {out} ({e.strerror})") from None
    family, original = transformers_family(model_cfg)
    if family is not None:
        weights = {k2: v2 for k, v in weights.items() for k2, v2 in family.to_hf(k, v).items()}
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / WEIGHTS), metadata={"format": "pt"})
    meta = {"model": dataclasses.asdict(model_cfg), "vocab_size": vocab, **(info or {})}
    if family is not None:
        meta["family"] = family.model_type
    if model_cfg.mlp == "moe":
        meta["moe"] = dataclasses.asdict(moe or MoEConfig())
    (out / META).write_text(json.dumps(meta, indent=1))
    if family is None:
        if tokenizer is not None:
            shutil.copy(tokenizer, out / "tokenizer.json")
        return out
    hf = family.hf_config(dataclasses.replace(model_cfg, vocab_size=vocab), moe, original)
    (out / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True))
    source = Path(model_cfg.from_pretrained) if model_cfg.from_pretrained else None
    if source is not None and any((source / f).is_file() for f in TOKENIZER_FILES):
        for name in TOKENIZER_FILES:  # the pretrained model's own tokenizer, not the corpus's
            if (source / name).is_file():
                shutil.copy(source / name, out / name)
    elif tokenizer is not None:
        shutil.copy(tokenizer, out / "tokenizer.json")
        _write_tokenizer_files(out, tokenizer)
    return out


def _write_tokenizer_files(out: Path, tokenizer: Path) -> None:
    if json.loads(tokenizer.read_text()).get("type") != "byte":
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
    if read_exported_meta(folder).get("family"):  # transformers names: mapped back through the family
        from scalesparse.model.pretrained import load_pretrained

        return load_pretrained(model, folder)
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
    model = GPT(cfg.model, cfg.model.vocab_size or meta["vocab_size"], cfg.moe)
    load_weights(model, folder)
    return model
