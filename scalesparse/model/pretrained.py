"""Start training from a transformers folder: resolve the config from it, check every tensor's name
and shape from the safetensors headers (no weights read), then copy weights into a built model.

Loading reads one tensor at a time from the safetensors shards (model/weight_files.py) and copies it
into the parameter it belongs to, so the host never holds a second full copy of the model; a ZeRO-3
worker whose model was born partitioned reads only the bytes of its partitions; nothing is unpickled
(pytorch_model*.bin only with model.allow_pickle, and then through torch.load's weights_only reader;
a .gguf is converted once, in the driver, to a cached safetensors folder: model.gguf_file).
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import torch

from scalesparse.config import Config, DataConfig, ModelConfig, MoEConfig, config_from_dict
from scalesparse.errors import CheckpointError, ConfigError
from scalesparse.model.families import Family, family_named, supported
from scalesparse.model.families.upcycle import Upcycled, router_init
from scalesparse.model.weight_files import WeightFiles, where_of

# Shape-defining fields: the folder sets them; a user's different value is refused, never silently used
MODEL_DEFAULTS = ModelConfig()
MOE_DEFAULTS = MoEConfig()
DATA_DEFAULTS = DataConfig()
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def read_hf_config(folder: Path) -> dict[str, Any]:
    where = where_of(folder)
    if not folder.is_dir():
        raise ConfigError(f"{where} is not a folder")
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"{where} has no config.json (expected a transformers model folder)")
    try:
        hf = json.loads(path.read_text())
    except ValueError:
        raise ConfigError(f"{where}/config.json is not valid JSON") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{where}/config.json is not a JSON object")
    return hf


def family_of(hf: dict[str, Any], where: str) -> Family:
    model_type = hf.get("model_type")
    if model_type not in supported():
        raise ConfigError(f"{where}: model_type {model_type!r} is not supported (supported: {', '.join(supported())})")
    return family_named(model_type)


def gguf_folder(folder: Path, gguf_file: str, cache_dir: str) -> Path:
    """model.gguf_file: the GGUF converted once into a safetensors folder (cached under cache_dir/models,
    keyed by the file's path, size and modification time), which is what the workers read."""
    import hashlib
    import os
    import shutil
    import tempfile

    from scalesparse.assets import check_gguf_support, gguf_to_safetensors

    path = folder / gguf_file
    if not path.is_file():
        raise ConfigError(f"model.gguf_file: {path} not found")
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(cache_dir).expanduser() / "models"
    out = root / f"{path.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    check_gguf_support()
    print(f"model: converting {path.name} to safetensors once (transformers' GGUF reader, fp32) into {out}",
          flush=True)  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:  # whole or not at all: renamed into place when complete
        gguf_to_safetensors(folder, gguf_file, Path(tmp) / "model")
        try:
            os.replace(Path(tmp) / "model", out)
        except OSError:  # converted concurrently by another run
            shutil.rmtree(Path(tmp) / "model", ignore_errors=True)
    return out


def _refuse_overrides(user: Any, defaults: Any, fixed: dict[str, Any], section: str, where: str) -> None:
    for key, value in fixed.items():
        mine = getattr(user, key)
        if mine != getattr(defaults, key) and mine != value:
            raise ConfigError(f"{section}.{key}: {mine!r} differs from the pretrained model's {value!r} ({where}); "
                              f"shapes come from the checkpoint: remove the setting")  # fmt: skip


def resolve_pretrained(cfg: Config, tokenizer_vocab: int | None = None) -> Config:
    """`cfg` with its model (and MoE) section taken from model.from_pretrained, checked against the
    folder's tensors. Every problem raises a one-line ConfigError, before any worker starts."""
    m = cfg.model
    if not m.from_pretrained:
        return cfg
    folder = Path(m.from_pretrained).expanduser().resolve()
    if cfg.train.init_from:
        raise ConfigError("model.from_pretrained and train.init_from both name starting weights; keep one")
    if m.gguf_file:
        folder = gguf_folder(folder, m.gguf_file, cfg.data.cache_dir)
    where = where_of(folder)
    hf = read_hf_config(folder)
    family = family_of(hf, where)
    fields = family.model_fields(hf, where)
    upcycle = fields["mlp"] == "dense" and m.mlp == "moe"
    if upcycle:  # sparse upcycling: every MLP becomes moe.num_experts copies of itself
        check_upcycling(cfg, fields, where)
        fields["mlp"] = "moe"
    _refuse_overrides(m, MODEL_DEFAULTS, fields, "model", where)
    data = cfg.to_dict()
    data["model"].update(fields, from_pretrained=str(folder), gguf_file=None)
    moe = family.moe_fields(hf)
    if moe is not None:
        _refuse_overrides(cfg.moe, MOE_DEFAULTS, moe, "moe", where)
        data["moe"].update(moe)
    if cfg.data.tokenizer == DATA_DEFAULTS.tokenizer and any((folder / f).is_file() for f in TOKENIZER_FILES):
        # the model's own tokenizer unless the user chose another: its ids are what the embedding knows
        data["data"].update(tokenizer="hf", tokenizer_path=str(folder))
    if m.seq_len > (fields["max_positions"] or m.seq_len):
        raise ConfigError(f"model.seq_len: {m.seq_len} is longer than the {fields['max_positions']} positions "
                          f"the pretrained model was trained for ({where})")  # fmt: skip
    resolved = config_from_dict(data)
    if tokenizer_vocab is not None and tokenizer_vocab > resolved.model.vocab_size:
        raise ConfigError(f"{where}: the tokenizer has {tokenizer_vocab} tokens but the embedding only "
                          f"{resolved.model.vocab_size} rows")  # fmt: skip
    if upcycle:
        family = Upcycled(family, resolved.moe.num_experts)
    check_tensors(resolved, family, WeightFiles(folder, m.allow_pickle), where)
    return resolved


def check_upcycling(cfg: Config, fields: dict[str, Any], where: str) -> None:
    """Upcycled experts compute the dense function at step 0 only with renormalised gates, the dense
    MLP's width, no MLP bias (experts have none) and no dropped tokens."""
    moe = cfg.moe
    if not moe.renormalize:
        raise ConfigError(f"moe.renormalize: false while upcycling the dense model in {where}: the top-k gates must "
                          f"sum to 1 for copies of the MLP to compute the dense function; set it true")  # fmt: skip
    if moe.d_ff is not None and moe.d_ff != fields["d_ff"]:
        raise ConfigError(f"moe.d_ff: {moe.d_ff} differs from the dense MLP's {fields['d_ff']} ({where}): upcycled "
                          f"experts are copies of it; remove the setting")  # fmt: skip
    if fields["bias"]:
        raise ConfigError(f"{where}: the dense MLP has biases, which experts do not: upcycling is not supported")
    if moe.capacity_factor is not None:
        raise ConfigError(f"moe.capacity_factor: {moe.capacity_factor} while upcycling ({where}): dropped tokens "
                          f"would leave the dense function at step 0; use null (dropless)")  # fmt: skip


def adapter(family: Family, model: torch.nn.Module) -> Family:
    """The family as `model` reads it: upcycled when a dense family's model was built with experts."""
    from scalesparse.model.moe.backends import Experts

    experts = next((m for m in model.modules() if isinstance(m, Experts)), None)
    if experts is None or isinstance(family, Upcycled) or type(family).moe_fields is not Family.moe_fields:
        return family
    return Upcycled(family, experts.num_experts)


def expected_tensors(cfg: Config, family: Family) -> dict[str, tuple[int, ...]]:
    """transformers name → shape, for every tensor this model needs (built on the meta device: no memory)."""
    from scalesparse.model.gpt import GPT

    with torch.device("meta"):
        model = GPT(cfg.model, cfg.model.vocab_size, cfg.moe)
    out = {}
    for name, p in model.named_parameters():
        out.update({k: tuple(v.shape) for k, v in family.to_hf(name, p).items()})
    return out


def check_tensors(cfg: Config, family: Family, files: WeightFiles, where: str) -> None:
    for name, shape in expected_tensors(cfg, family).items():
        if name not in files.shard_of:
            raise ConfigError(f"{where}: tensor {name} is missing from the safetensors files")
        found = files.shape(name)
        if found != shape:
            raise ConfigError(f"{where}: tensor {name} has shape {list(found)}, the config implies {list(shape)}")


@contextlib.contextmanager
def uninitialised():
    """Build modules without drawing their initial weights: every tensor is read from the folder next
    (an upcycled router is drawn by load_pretrained), so the draws would be wasted time. transformers'
    no_init_weights does the same."""
    names = ("kaiming_uniform_", "uniform_", "normal_", "zeros_", "ones_", "trunc_normal_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


@torch.no_grad()
def load_pretrained(model: torch.nn.Module, folder: str | Path, allow_pickle: bool = False, seed: int = 0,
                    partitions: dict[str, Any] | None = None) -> int:  # fmt: skip
    """Copy the folder's weights into `model` (built from the resolved config), one tensor at a time;
    returns the bytes read. `partitions` (train/engine.partitions: name → shape, start, local) names the
    parameters of which this process holds only a ZeRO-3 partition: only those elements are read, from
    exactly their bytes. An upcycled router, not in a dense checkpoint, is drawn (router_init)."""
    folder = Path(folder)
    family = adapter(family_of(read_hf_config(folder), where_of(folder)), model)
    files = WeightFiles(folder, allow_pickle)
    partitions = partitions or {}
    for name, p in model.named_parameters():  # a tied LM head is yielded once, as embed_tokens
        part = partitions.get(name)
        shape = part.shape if part is not None else tuple(p.shape)
        # the elements to fill: this rank's partition, or the whole (contiguous) parameter
        start, local = (part.start, part.local.view(-1)) if part is not None else (0, p.data.view(-1))
        hf_names = family.hf_names(name, shape)
        if not hf_names:  # an upcycled router
            local.copy_(router_init(name, shape, model.cfg.init_std, seed).view(-1)[start : start + local.numel()])
            continue
        missing = [n for n in hf_names if n not in files.shard_of]
        if missing:
            raise CheckpointError(f"{where_of(folder)}: tensor {missing[0]} is missing from the safetensors files")
        flat = family.flat_names(name, shape)
        found = sum(math.prod(files.shape(n)) for n in flat)
        if found != math.prod(shape):
            raise CheckpointError(f"{where_of(folder)}: {hf_names[0]} holds {found} elements for the model's {name} "
                                  f"of shape {list(shape)}")  # fmt: skip
        files.read_flat(flat, start, local)  # straight into the parameter where the dtypes agree
    return files.bytes_read


def check_mask_source(cfg: Config) -> None:
    """sparsity.mask_from: weights needs starting weights, and from a pretrained folder, weights with
    zeros (read one masked tensor at a time): refused in one line before data or workers."""
    if cfg.sparsity.mask_from != "weights":
        return
    if not (cfg.model.from_pretrained or cfg.train.init_from):
        raise ConfigError("sparsity.mask_from: weights needs starting weights: set model.from_pretrained (a pruned "
                          "transformers folder) or train.init_from")  # fmt: skip
    if not cfg.model.from_pretrained:
        return  # an init_from export: the workers check its zeros when they make the masks
    import fnmatch

    from scalesparse.model.gpt import GPT

    folder = Path(cfg.model.from_pretrained)
    family = family_of(read_hf_config(folder), where_of(folder))
    files = WeightFiles(folder, cfg.model.allow_pickle)
    with torch.device("meta"):
        model = GPT(cfg.model, cfg.model.vocab_size, cfg.moe)
    sp = cfg.sparsity
    for name, p in model.named_parameters():
        layer = name.removesuffix(".weight")
        if not (any(fnmatch.fnmatchcase(layer, g) for g in sp.include)
                and not any(fnmatch.fnmatchcase(layer, g) for g in sp.exclude)):  # fmt: skip
            continue
        hf_names = family.hf_names(name, tuple(p.shape))
        if hf_names and all(n in files.shard_of for n in hf_names):
            if bool((family.from_hf(name, [files.get(n) for n in hf_names]) == 0).any()):
                return
    raise ConfigError(
        f"sparsity.mask_from: weights, but no layer sparsity.include names has a zero weight in "
        f"{folder} (a dense model?): prune it first (scalesparse prune) or use mask_from: method"
    )
