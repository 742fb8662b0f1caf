"""Tokenizers, picked by name (`data.tokenizer`): byte, bpe (trained here), hf (any Hugging Face tokenizer).

Each one has `vocab_size`, `eos_id`, `bos_id` (None when it defines none), `encode_arrays` (the hot path:
one numpy array per document) and `save`. The saved tokenizer.json is what checkpoints and exports copy.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from scalesparse.config import DataConfig
from scalesparse.errors import DataError
from scalesparse.registry import Registry

# Files a transformers tokenizer folder may hold; one is needed. Checked before anything is read.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model")  # fmt: skip
EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "<|im_end|>")
BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>")
IDS = np.dtype(np.int64)  # encode_arrays' default dtype; preparation asks for the token files' own


class ByteTokenizer:
    """Raw UTF-8 bytes; id 256 is the end-of-document token."""

    eos_id = 256
    bos_id = None
    vocab_size = 257

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def encode_arrays(self, texts: list[str], dtype: np.dtype = IDS) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8", "surrogatepass"), dtype=np.uint8).astype(dtype) for t in texts]

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if i < 256).decode("utf-8", errors="replace")

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"type": "byte"}))


class HFTokenizer:
    """A `tokenizers.Tokenizer` (the fast half of every transformers tokenizer), with its EOS and BOS.

    Special tokens are added here, not by the tokenizer's post-processor, so every tokenizer packs the
    same way: [BOS] doc EOS [BOS] doc EOS …"""

    def __init__(self, tok, eos: str | None = None, bos: str | None = None, where: str = "tokenizer") -> None:
        tok.no_truncation()
        tok.no_padding()
        self.tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = _token_id(tok, eos, EOS_NAMES)
        self.bos_id = _token_id(tok, bos, BOS_NAMES)
        if self.eos_id is None:
            raise DataError(f"{where}: the tokenizer has no end-of-document token (looked for "
                            f"{', '.join(EOS_NAMES)} and tokenizer_config.json's eos_token)")  # fmt: skip
        self.eos_token = tok.id_to_token(self.eos_id)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def encode_arrays(self, texts: list[str], dtype: np.dtype = IDS) -> list[np.ndarray]:
        # encode_batch runs in Rust threads (the GIL released; serially where TOKENIZERS_PARALLELISM is
        # false, as in a single-threaded preparation worker); encode_batch_fast skips the character offsets
        encode = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)
        return [np.array(e.ids, dtype=dtype) for e in encode(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])

    def save(self, path: Path) -> None:
        self.tok.save(str(path))


class BPETokenizer(HFTokenizer):
    """A byte-level BPE (HF `tokenizers`), trained on the training split only."""

    EOS = "<|endoftext|>"

    def __init__(self, tok) -> None:  # tok: tokenizers.Tokenizer
        super().__init__(tok, self.EOS, None)
        self.bos_id = None  # none was trained: "<s>" in the text must stay text

    @classmethod
    def train(cls, texts: Iterator[str], vocab_size: int) -> BPETokenizer:
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


def _token_id(tok, preferred: str | None, names: tuple[str, ...]) -> int | None:
    for name in ((preferred,) if preferred else ()) + names:
        i = tok.token_to_id(name)
        if i is not None:
            return i
    return None


def _special(config: dict, key: str) -> str | None:
    value = config.get(key)
    return value.get("content") if isinstance(value, dict) else value


def load_hf_tokenizer(path: str, where: str = "data.tokenizer_path") -> HFTokenizer:
    """A tokenizer.json, or a folder with one (or with files transformers can turn into one)."""
    from tokenizers import Tokenizer

    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{where}: {p} does not exist")
    folder = p if p.is_dir() else p.parent
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    eos, bos = _special(config, "eos_token"), _special(config, "bos_token")
    if p.is_file():
        return HFTokenizer(_from_file(Tokenizer, p, where), eos, bos, where)
    if (p / "tokenizer.json").is_file():
        return HFTokenizer(_from_file(Tokenizer, p / "tokenizer.json", where), eos, bos, where)
    if not any((p / name).is_file() for name in TOKENIZER_FILES):
        raise DataError(f"{where}: {p} has no tokenizer files (looked for {', '.join(TOKENIZER_FILES)})")
    from transformers import AutoTokenizer

    fast = AutoTokenizer.from_pretrained(str(p), use_fast=True)
    if not getattr(fast, "is_fast", False):
        raise DataError(f"{where}: {p} holds only a slow tokenizer; save a tokenizer.json with transformers")
    return HFTokenizer(fast.backend_tokenizer, eos or fast.eos_token, bos or fast.bos_token, where)


def _from_file(cls, path: Path, where: str):
    try:
        return cls.from_file(str(path))
    except Exception as e:
        raise DataError(f"{where}: {path} is not a tokenizer.json the tokenizers library can read ({e})") from None


def load_tokenizer(path: Path, eos_id: int | None = None) -> ByteTokenizer | HFTokenizer:
    """The tokenizer saved beside prepared token files."""
    if json.loads(path.read_text()).get("type") == "byte":
        return ByteTokenizer()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    eos = tok.id_to_token(eos_id) if eos_id is not None else None
    return HFTokenizer(tok, eos, None, str(path))


# ----------------------------------------------------------------------------- registry
# name → how to make it: (config, training texts) → tokenizer. Only bpe reads the texts.
Builder = Callable[[DataConfig, Callable[[], Iterator[str]]], "ByteTokenizer | HFTokenizer"]
TOKENIZERS: Registry[Builder] = Registry("tokenizer")
TOKENIZERS.register("byte")(lambda cfg, texts: ByteTokenizer())
TOKENIZERS.register("bpe")(lambda cfg, texts: BPETokenizer.train(texts(), cfg.vocab_size))
TOKENIZERS.register("hf")(lambda cfg, texts: load_hf_tokenizer(cfg.tokenizer_path or ""))


def tokenizer_identity(cfg: DataConfig) -> dict:
    """What changes the tokenizer's output, for the cache key (a hf tokenizer by its files' bytes)."""
    if cfg.tokenizer == "byte":
        return {"kind": "byte"}
    if cfg.tokenizer == "bpe":
        return {"kind": "bpe", "vocab": cfg.vocab_size}
    import hashlib

    p = Path(cfg.tokenizer_path or "").expanduser()
    files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p] if p.is_file() else []
    h = hashlib.sha256()
    for f in files:
        if f.suffix in (".json", ".model", ".txt") and f.stat().st_size < 64 << 20:
            h.update(f.name.encode() + f.read_bytes())
    return {"kind": "hf", "files": h.hexdigest()}
