"""Corpus → tokenizer → token files → deterministic, resumable, rank-sharded batches.

* `prepare_data` (prepare.py) runs once in the driver, before any worker starts: documents from
  `sources.py` (the registered corpus or the user's files/hub datasets through `datasets`), a tokenizer
  from `tokenizers.py`, encoded in parallel by `encode.py`, token files written by `tokens.py` into a
  verified, atomically written cache.
* `TokenBlocks`, `BatchSchedule`, `rank_slice` (sampler.py) run in the workers.

Names are imported on first use: a preparation worker process (encode.py) imports this package and
must not pay for torch (sampler.py) or `datasets`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_HOMES = {
    "PREP_VERSION": "prepare", "PreparedData": "prepare", "prepare_data": "prepare",
    "BatchSchedule": "sampler", "TokenBlocks": "sampler", "rank_slice": "sampler",
    "CORPORA": "sources", "FORMATS": "sources", "CorpusSpec": "sources", "fetch_corpus": "sources",
    "split_documents": "sources",
    "TOKENIZERS": "tokenizers", "BPETokenizer": "tokenizers", "ByteTokenizer": "tokenizers",
    "HFTokenizer": "tokenizers", "load_tokenizer": "tokenizers",
    "token_dtype": "tokens",
}  # fmt: skip
__all__ = [
    "CORPORA", "FORMATS", "PREP_VERSION", "TOKENIZERS", "BPETokenizer", "BatchSchedule", "ByteTokenizer",
    "CorpusSpec", "HFTokenizer", "PreparedData", "TokenBlocks", "fetch_corpus", "load_tokenizer",
    "prepare_data", "rank_slice", "split_documents", "token_dtype",
]  # fmt: skip
assert sorted(__all__) == sorted(_HOMES)

if TYPE_CHECKING:
    from scalesparse.data.prepare import PREP_VERSION, PreparedData, prepare_data
    from scalesparse.data.sampler import BatchSchedule, TokenBlocks, rank_slice
    from scalesparse.data.sources import CORPORA, FORMATS, CorpusSpec, fetch_corpus, split_documents
    from scalesparse.data.tokenizers import TOKENIZERS, BPETokenizer, ByteTokenizer, HFTokenizer, load_tokenizer
    from scalesparse.data.tokens import token_dtype


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'scalesparse.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"scalesparse.data.{home}"), name)
    globals()[name] = value
    return value
