"""Corpus → tokenizer → token files → deterministic, resumable, rank-sharded batches.

* `prepare_data` (prepare.py) runs once in the driver, before any worker starts: documents from
  `sources.py` (the registered corpus or the user's files/hub datasets through `datasets`), a tokenizer
  from `tokenizers.py`, token files written by `tokens.py` into a verified, atomically written cache.
* `TokenBlocks`, `BatchSchedule`, `rank_slice` (sampler.py) run in the workers.
"""

from scalesparse.data.prepare import PREP_VERSION, PreparedData, prepare_data
from scalesparse.data.sampler import BatchSchedule, TokenBlocks, rank_slice
from scalesparse.data.sources import CORPORA, FORMATS, CorpusSpec, fetch_corpus, split_documents
from scalesparse.data.tokenizers import TOKENIZERS, BPETokenizer, ByteTokenizer, HFTokenizer, load_tokenizer
from scalesparse.data.tokens import token_dtype

__all__ = [
    "CORPORA", "FORMATS", "PREP_VERSION", "TOKENIZERS", "BPETokenizer", "BatchSchedule", "ByteTokenizer",
    "CorpusSpec", "HFTokenizer", "PreparedData", "TokenBlocks", "fetch_corpus", "load_tokenizer",
    "prepare_data", "rank_slice", "split_documents", "token_dtype",
]  # fmt: skip
