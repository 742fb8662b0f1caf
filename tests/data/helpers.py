"""Corpora and tokenizers made on the spot: no hub, no network."""

from __future__ import annotations

import json
from pathlib import Path

DOCS = [
    "To be, or not to be, that is the question:",
    "Our revels now are ended. These our actors,\nAs I foretold you, were all spirits.",
    "Ünïcödé survives: naïve café — “quotes” and 日本語.",
    "Now is the winter of our discontent\nMade glorious summer by this sun of York.",
    "Friends, Romans, countrymen, lend me your ears;",
]


def word_level_tokenizer(path: Path, n_words: int, eos: str = "<|endoftext|>", bos: str | None = None) -> Path:
    """A WordLevel tokenizer.json with `n_words` words w0 … w{n-1} plus [UNK] and the special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"[UNK]": 0, eos: 1}
    if bos:
        vocab[bos] = 2
    base = len(vocab)
    vocab.update({f"w{i}": base + i for i in range(n_words)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    return path


def own_data_config(case, files: dict[str, bytes], pattern: str = "corpus/*", **data) -> str:
    """A run config (tests/test_bad_input.py's Case) training on files written under its tmp folder."""
    for name, content in files.items():
        path = case.tmp / "corpus" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    section = {"sources": [{"path": str(case.tmp / pattern)}], "tokenizer": "byte", "val_fraction": 0.5, **data}
    return data_config(case, **section)


def data_config(case, **data) -> str:
    """A run config whose data section is the tests' one updated with `data`."""
    import yaml

    from tests.conftest import tiny_config

    return case.config(text=yaml.safe_dump(tiny_config({**case.data, **data}, case.tmp / "run")))
