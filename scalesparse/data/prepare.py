"""Driver side: documents → tokenizer → token files, once, before any worker starts.

The result is cached under a key of everything that changes its bytes (sources, tokenizer, split,
settings), built in a temporary folder and renamed into place (readers see all or nothing), and
verified on every use: sizes and sha256 in meta.json. A cache that fails verification is rebuilt
with a one-line notice, never read. The corpus is never whole in memory: documents stream from
`datasets` in batches, are tokenized (Rust threads, overlapped with reading) and appended to disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scalesparse.config import DataConfig
from scalesparse.data.sources import (
    Document,
    check_val_names,
    document_names,
    documents,
    fetch_corpus,
    source_key,
    unit_hash,
)
from scalesparse.data.tokenizers import TOKENIZERS, load_hf_tokenizer, tokenizer_identity
from scalesparse.data.tokens import TokenWriter, token_dtype, verify
from scalesparse.errors import DataError

PREP_VERSION = 2  # bump when the preparation changes, to invalidate caches (2: verified, dtype by vocabulary)
BATCH_CHARS = 4 << 20  # text per tokenizer call: large enough to keep its threads busy, small in memory
BATCH_DOCS = 4096
WEIGHT_SALT = b"scalesparse-weight"
VAL_SALT = b"scalesparse-val"


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


def is_validation(cfg: DataConfig) -> Callable[[Document], bool]:
    if cfg.val_fraction > 0:  # by a hash of the text: a document keeps its side when the corpus grows
        return lambda d: unit_hash(d.text, VAL_SALT) < cfg.val_fraction
    return lambda d: any(d.name.startswith(v) for v in cfg.val_docs)


def repeats(doc: Document) -> int:
    """Copies of a training document in one pass: weight 2.5 → 2, plus a third for half of them (by hash)."""
    whole, part = divmod(doc.weight, 1.0)
    return int(whole) + (part > 0 and unit_hash(doc.text, WEIGHT_SALT) < part)


# ----------------------------------------------------------------------------- preparation
def prepare_data(cfg: DataConfig, model_vocab: int | None = None) -> PreparedData:
    """Token files for `cfg`, from the verified cache or built now; `model_vocab` (model.vocab_size) is
    checked against the tokenizer first, so a mismatch costs nothing."""
    if cfg.tokenizer == "hf":
        load_hf_tokenizer(cfg.tokenizer_path or "")  # a bad tokenizer fails before the sources are read
    check_model_vocab(cfg, model_vocab)
    if cfg.val_fraction == 0:
        check_val_names(document_names(cfg), cfg.val_docs)
    name, key_source = cache_key(cfg)
    out = Path(cfg.cache_dir).expanduser() / "prepared" / name
    cached = _read_verified(out)
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
    result = _read_verified(out, checksum=False)  # just written and hashed; sizes suffice
    assert result is not None, f"{out}: failed verification right after it was written"
    return result


def _read_verified(out: Path, checksum: bool = True) -> PreparedData | None:
    if not out.exists():
        return None
    problem = None
    try:
        meta = json.loads((out / "meta.json").read_text())
        problem = verify(out, meta["files"], checksum=checksum)
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
    if cfg.num_proc > 0:  # the tokenizers' Rust thread pool reads this when it first starts
        os.environ.setdefault("RAYON_NUM_THREADS", str(cfg.num_proc))
    held_out = is_validation(cfg)

    def training_texts() -> Iterator[str]:
        return (d.text for d in documents(cfg) if not held_out(d))

    tokenizer = TOKENIZERS.get(cfg.tokenizer)(cfg, training_texts)
    tokenizer.save(tmp / "tokenizer.json")
    writers = {"train": TokenWriter(tmp / "train.npy", tokenizer.vocab_size),
               "val": TokenWriter(tmp / "val.npy", tokenizer.vocab_size)}  # fmt: skip
    counts = _tokenize_into(documents(cfg), tokenizer, held_out, writers, Progress())
    files = {f"{split}.npy": w.close() for split, w in writers.items()}
    if counts["train"] == 0 or files["train.npy"]["tokens"] == 0:
        raise DataError("data: no training documents are left after the validation split; lower data.val_fraction "
                        "or hold out fewer data.val_docs")  # fmt: skip
    if counts["val"] == 0:
        raise DataError(f"data.val_fraction: {cfg.val_fraction} of {counts['train']} documents held out none; "
                        f"raise it (or name data.val_docs)")  # fmt: skip
    tok_file = tmp / "tokenizer.json"
    files["tokenizer.json"] = {
        "bytes": tok_file.stat().st_size,
        "sha256": hashlib.sha256(tok_file.read_bytes()).hexdigest(),
    }
    meta = {"version": PREP_VERSION, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
            "bos_id": tokenizer.bos_id, "dtype": token_dtype(tokenizer.vocab_size).name,
            "train_tokens": files["train.npy"]["tokens"], "val_tokens": files["val.npy"]["tokens"],
            "train_docs": counts["train"], "val_docs": counts["val"], "val_names": counts["val_names"],
            "files": files, "key": key_source}  # fmt: skip
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # written last: its presence means complete


def _batches(docs: Iterator[Document]) -> Iterator[list[Document]]:
    batch: list[Document] = []
    chars = 0
    for d in docs:
        batch.append(d)
        chars += len(d.text)
        if chars >= BATCH_CHARS or len(batch) >= BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _pack(doc_ids: list[np.ndarray], copies: list[int], bos: int | None, eos: int) -> np.ndarray:
    """[BOS] doc EOS for each document, `copies` times each, back to back."""
    head = np.array([bos] if bos is not None else [], dtype=np.int64)
    tail = np.array([eos], dtype=np.int64)
    pieces = [p for ids, n in zip(doc_ids, copies, strict=True) for _ in range(n) for p in (head, ids, tail)]
    return np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int64)


def _tokenize_into(docs, tokenizer, held_out, writers: dict[str, TokenWriter], progress: Progress) -> dict:
    counts: dict = {"train": 0, "val": 0, "val_names": []}

    def encode(batch: list[Document]) -> tuple[list[Document], list[np.ndarray]]:
        return batch, tokenizer.encode_arrays([d.text for d in batch])

    def write(batch: list[Document], ids: list[np.ndarray]) -> None:
        sides = [held_out(d) for d in batch]
        for split, val in (("train", False), ("val", True)):
            chosen = [i for i, s in enumerate(sides) if s == val]
            copies = [1 if val else repeats(batch[i]) for i in chosen]
            writers[split].write(_pack([ids[i] for i in chosen], copies, tokenizer.bos_id, tokenizer.eos_id))
            counts[split] += len(chosen)
        room = 100 - len(counts["val_names"])  # a sample of names for meta.json, not millions
        counts["val_names"] += [d.name for d, s in zip(batch, sides, strict=True) if s][:room]
        progress.update(len(batch), sum(len(d.text) for d in batch), sum(a.size for a in ids))

    # one batch is tokenized (Rust threads, GIL released) while the next is read: the order stays fixed
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for batch in _batches(docs):
            future = pool.submit(encode, batch)
            if pending is not None:
                write(*pending.result())
            pending = future
        if pending is not None:
            write(*pending.result())
    progress.done()
    return counts


class Progress:
    """Plain progress lines on stdout, beside the driver's other reports (stderr is kept for problems):
    documents, MB, rates, every few seconds; quiet for small corpora."""

    def __init__(self, every_s: float = 5.0) -> None:
        self.t0 = self.last = time.perf_counter()
        self.every_s = every_s
        self.docs = self.chars = self.tokens = 0

    def line(self) -> str:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        mb_s, tok_s = self.chars / 1e6 / dt, self.tokens / dt / 1e6
        rates = f"{self.docs / dt:,.0f} docs/s, {mb_s:,.1f} MB/s, {tok_s:,.2f} M tok/s"
        return f"data: {self.docs:,} documents, {self.chars / 1e6:,.1f} MB of text, {self.tokens:,} tokens ({rates})"

    def update(self, docs: int, chars: int, tokens: int) -> None:
        self.docs, self.chars, self.tokens = self.docs + docs, self.chars + chars, self.tokens + tokens
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            print(self.line(), flush=True)

    def done(self) -> None:
        if time.perf_counter() - self.t0 >= self.every_s:
            print(self.line() + " — done", flush=True)
