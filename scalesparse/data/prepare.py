"""Driver side: documents → tokenizer → token files, once, before any worker starts.

The result is cached under a key of everything that changes its bytes (sources, tokenizer, split,
settings), built in a temporary folder and renamed into place (readers see all or nothing), and
verified on every use: sizes, headers and a sampled digest against meta.json (the full sha256 is
recorded at write time and checked on request). A cache that fails verification is rebuilt with a
one-line notice, never read. The corpus is never whole in memory: documents stream from `datasets`
in pieces that the tokenizer's threads or a pool of `data.num_proc` processes encode (encode.py); the
driver appends the pieces' token files in order.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scalesparse.config import DataConfig
from scalesparse.data.encode import TokenizerSpec, encode_pieces, held_out, layout, pieces
from scalesparse.data.progress import PrepProgress
from scalesparse.data.sources import (
    check_val_names,
    document_names,
    documents,
    fetch_corpus,
    input_bytes,
    read_rows,
    source_key,
)
from scalesparse.data.tokenizers import TOKENIZERS, load_hf_tokenizer, tokenizer_identity
from scalesparse.data.tokens import Level, TokenWriter, file_record, token_dtype, verify
from scalesparse.errors import DataError

PREP_VERSION = 2  # bump when the preparation changes, to invalidate caches (2: verified, dtype by vocabulary)


@dataclass(frozen=True)
class PreparedData:
    dir: Path
    vocab_size: int
    eos_id: int
    train_tokens: int
    val_tokens: int
    bos_id: int | None = None
    dtype: str = "uint16"

    @property
    def train_path(self) -> Path:
        return self.dir / "train.npy"

    @property
    def val_path(self) -> Path:
        return self.dir / "val.npy"

    @property
    def tokenizer_path(self) -> Path:
        return self.dir / "tokenizer.json"

    def to_dict(self) -> dict:
        return {"dir": str(self.dir), "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "train_tokens": self.train_tokens, "val_tokens": self.val_tokens, "bos_id": self.bos_id,
                "dtype": self.dtype}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> PreparedData:
        return cls(Path(d["dir"]), d["vocab_size"], d["eos_id"], d["train_tokens"], d["val_tokens"],
                   d.get("bos_id"), d.get("dtype", "uint16"))  # fmt: skip


# ----------------------------------------------------------------------------- checks before any work
def tokenizer_vocab_bound(cfg: DataConfig) -> int:
    """The largest vocabulary the configured tokenizer can have, known without preparing anything."""
    if cfg.tokenizer == "byte":
        return 257
    if cfg.tokenizer == "bpe":
        return cfg.vocab_size
    return load_hf_tokenizer(cfg.tokenizer_path or "").vocab_size


def check_model_vocab(cfg: DataConfig, model_vocab: int | None) -> None:
    if model_vocab is None:
        return
    need = tokenizer_vocab_bound(cfg)
    if need > model_vocab:
        raise DataError(f"model.vocab_size: {model_vocab} embedding rows cannot hold the tokenizer's {need} "
                        f"tokens (data.tokenizer {cfg.tokenizer}); raise it to >= {need} or leave it null")  # fmt: skip


def cache_key(cfg: DataConfig) -> tuple[str, dict]:
    if cfg.sources:
        label = "own"
        what: dict = {"sources": [source_key(s, f"data.sources[{i}]") for i, s in enumerate(cfg.sources)]}
    else:
        label = cfg.corpus
        what = {"corpus": cfg.corpus, "docs": [(d.name, d.stat().st_size) for d in fetch_corpus(cfg)]}
    split = {"val_fraction": cfg.val_fraction} if cfg.val_fraction > 0 else {"val": sorted(cfg.val_docs)}
    src = {"v": PREP_VERSION, **what, "tokenizer": tokenizer_identity(cfg), **split,
           "encoding_errors": cfg.encoding_errors}  # fmt: skip
    return f"{label}-{hashlib.sha256(json.dumps(src, sort_keys=True).encode()).hexdigest()[:16]}", src


# ----------------------------------------------------------------------------- preparation
def prepare_data(cfg: DataConfig, model_vocab: int | None = None, *, verify_level: Level = "sampled") -> PreparedData:
    """Token files for `cfg`, from the verified cache or built now; `model_vocab` (model.vocab_size) is
    checked against the tokenizer first, so a mismatch costs nothing. `verify_level` "full" checks a
    cached folder's sha256s (reading every byte) instead of sizes, headers and the sampled digest."""
    if cfg.tokenizer == "hf":
        load_hf_tokenizer(cfg.tokenizer_path or "")  # a bad tokenizer fails before the sources are read
    check_model_vocab(cfg, model_vocab)
    if cfg.val_fraction == 0:
        check_val_names(document_names(cfg), cfg.val_docs)
    name, key_source = cache_key(cfg)
    out = Path(cfg.cache_dir).expanduser() / "prepared" / name
    cached = _read_verified(out, verify_level)
    if cached is not None:
        return cached
    found_bad = out.exists()  # there but not verified: replace it once ours is complete
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{name}-"))
    try:
        _build(cfg, tmp, key_source)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, out, found_bad)
    result = _read_verified(out, "sizes")  # just written and hashed; sizes suffice
    assert result is not None, f"{out}: failed verification right after it was written"
    return result


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity: a container's, Slurm's or
    taskset's limit counts). Preparation runs in the driver before Ray starts, so these are also the
    CPUs a local Ray gives it."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _read_verified(out: Path, level: Level = "sampled") -> PreparedData | None:
    if not out.exists():
        return None
    problem = None
    try:
        meta = json.loads((out / "meta.json").read_text())
        problem = verify(out, meta["files"], level)
    except (OSError, ValueError, KeyError) as e:
        problem = f"meta.json is missing or unreadable ({type(e).__name__})"
    if problem:
        print(f"data: cache {out} failed verification ({problem}); rebuilding it", file=sys.stderr, flush=True)
        return None
    return PreparedData(out, meta["vocab_size"], meta["eos_id"], meta["train_tokens"], meta["val_tokens"],
                        meta.get("bos_id"), meta["dtype"])  # fmt: skip


def _publish(tmp: Path, out: Path, found_bad: bool) -> None:
    """Rename into place; the copy that failed verification is moved aside first (a copy that another
    process published meanwhile is kept: it holds the same bytes)."""
    if found_bad and out.exists():
        trash = out.with_name(f".{out.name}-bad-{os.getpid()}")
        os.replace(out, trash)
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.replace(tmp, out)
    except OSError:  # prepared concurrently by another process: theirs holds the same bytes
        shutil.rmtree(tmp, ignore_errors=True)


def _build(cfg: DataConfig, tmp: Path, key_source: dict) -> None:
    def training_texts() -> Iterator[str]:
        return (d.text for d in documents(cfg) if not held_out(d, cfg.val_fraction))

    tokenizer = TOKENIZERS.get(cfg.tokenizer)(cfg, training_texts)
    tokenizer.save(tmp / "tokenizer.json")
    spec = TokenizerSpec(str(tmp / "tokenizer.json"), tokenizer.eos_id, tokenizer.bos_id, tokenizer.vocab_size)
    counts = _encode_all(cfg, spec, tmp)
    files = counts.pop("files")
    if counts["train"] == 0 or files["train.npy"]["tokens"] == 0:
        raise DataError("data: no training documents are left after the validation split; lower data.val_fraction "
                        "or hold out fewer data.val_docs")  # fmt: skip
    if counts["val"] == 0:
        raise DataError(f"data.val_fraction: {cfg.val_fraction} of {counts['train']} documents held out none; "
                        f"raise it (or name data.val_docs)")  # fmt: skip
    files["tokenizer.json"] = file_record(tmp / "tokenizer.json")
    meta = {"version": PREP_VERSION, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
            "bos_id": tokenizer.bos_id, "dtype": token_dtype(tokenizer.vocab_size).name,
            "train_tokens": files["train.npy"]["tokens"], "val_tokens": files["val.npy"]["tokens"],
            "train_docs": counts["train"], "val_docs": counts["val"], "val_names": counts["val_names"],
            "files": files, "key": key_source}  # fmt: skip
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # written last: its presence means complete


def _encode_all(cfg: DataConfig, spec: TokenizerSpec, tmp: Path) -> dict:
    """Every document through the tokenizer (the driver's threads or a pool of processes) into train.npy
    and val.npy, pieces appended in order."""
    work = tmp / "pieces"
    work.mkdir()
    writers = {split: TokenWriter(tmp / f"{split}.npy", spec.vocab_size) for split in ("train", "val")}
    counts: dict = {"train": 0, "val": 0, "val_names": []}
    progress = PrepProgress(input_bytes(cfg))
    processes, threads = layout(cfg.num_proc, available_cpus())
    try:
        for result in encode_pieces(pieces(read_rows(cfg)), spec, work, cfg.val_fraction, processes, threads):
            for split, path in result.files.items():
                writers[split].write(np.fromfile(path, dtype=writers[split].dtype))
                path.unlink()
            for split in ("train", "val"):
                counts[split] += result.docs[split]
            counts["val_names"] += result.val_names[: 100 - len(counts["val_names"])]
            progress.update(sum(result.docs.values()), result.chars, sum(result.tokens.values()), result.done)
    except BaseException:
        progress.close(complete=False)  # the bar's line ends before the error is printed
        raise
    progress.close()
    work.rmdir()
    counts["files"] = {f"{split}.npy": w.close() for split, w in writers.items()}
    return counts
