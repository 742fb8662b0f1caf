"""Token files: dtype by vocabulary (no id is ever truncated), exact read-back, a verified cache (sampled on
every load, in full at write time and on request)."""

from __future__ import annotations

import numpy as np
import pytest

from scalesparse.config import DataConfig, SourceConfig
from scalesparse.data import PreparedData, TokenBlocks, prepare_data, token_dtype
from scalesparse.data.__main__ import main as data_cli
from scalesparse.data.tokens import SAMPLE_BYTES, TokenWriter, open_tokens, sample_offsets, verify
from tests.data.helpers import word_level_tokenizer


def test_dtype_follows_the_vocabulary():
    assert token_dtype(257) == np.uint16 and token_dtype(65_536) == np.uint16
    assert token_dtype(65_537) == np.uint32 and token_dtype(262_144) == np.uint32


def test_writer_appends_and_the_file_is_a_plain_npy(tmp_path):
    w = TokenWriter(tmp_path / "t.npy", 70_000)
    parts = [np.array([1, 65_535, 65_536]), np.array([], dtype=np.int64), np.array([69_999, 0])]
    for p in parts:
        w.write(p)
    record = w.close()
    back = np.load(tmp_path / "t.npy")
    assert back.dtype == np.uint32 and back.tolist() == [1, 65_535, 65_536, 69_999, 0]
    assert record["tokens"] == 5 and record["bytes"] == (tmp_path / "t.npy").stat().st_size
    assert open_tokens(tmp_path / "t.npy").tolist() == back.tolist()
    with pytest.raises(AssertionError, match="outside"):
        TokenWriter(tmp_path / "u.npy", 257).write(np.array([257]))


@pytest.fixture
def big_vocab(tmp_path):
    """A 70,000-word corpus over a 70,002-token tokenizer: most ids need more than 16 bits."""
    tok = word_level_tokenizer(tmp_path / "tok" / "tokenizer.json", 70_000)
    rng = np.random.default_rng(0)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = [rng.integers(0, 70_000, 300) for _ in range(6)]
    for i, w in enumerate(words):
        (corpus / f"doc{i}.txt").write_text(" ".join(f"w{j}" for j in w))
    cfg = DataConfig(sources=(SourceConfig(path=str(corpus)),), tokenizer="hf", tokenizer_path=str(tok),
                     val_docs=("doc5",), cache_dir=str(tmp_path / "cache"))  # fmt: skip
    return cfg, words


def test_a_vocabulary_over_65536_is_stored_as_uint32_and_read_back_exactly(big_vocab):
    cfg, words = big_vocab
    p = prepare_data(cfg)
    assert p.vocab_size == 70_002 and p.dtype == "uint32" and p.eos_id == 1
    train = np.load(p.train_path)
    assert train.dtype == np.uint32
    expected = np.concatenate([np.append(w + 2, 1) for w in words[:5]])  # word i has id i+2; EOS after each
    assert train.tolist() == expected.tolist()
    assert int(train.max()) > 65_535  # would have wrapped in uint16
    x, y = TokenBlocks(p.train_path, 16).get(np.array([3]))
    assert x[0].tolist() == expected[48:64].tolist() and y[0].tolist() == expected[49:65].tolist()


def test_a_corrupt_or_half_written_cache_is_rebuilt_with_a_notice(big_vocab, capsys):
    cfg, _ = big_vocab
    p = prepare_data(cfg)
    good = p.train_path.read_bytes()
    capsys.readouterr()

    flip(p.train_path, 200)  # same size, one flipped byte in a sampled block: only a digest sees it
    assert prepare_data(cfg) == p
    err = capsys.readouterr().err
    assert "failed verification (train.npy does not match its sampled digest); rebuilding it" in err
    assert len(err.strip().splitlines()) == 1
    assert p.train_path.read_bytes() == good

    p.val_path.write_bytes(p.val_path.read_bytes()[:-8])  # truncated
    assert prepare_data(cfg) == p
    assert "val.npy has" in capsys.readouterr().err

    (p.dir / "meta.json").unlink()  # half-written: the marker of completeness is missing
    assert prepare_data(cfg) == p
    assert "meta.json is missing" in capsys.readouterr().err
    assert p.train_path.read_bytes() == good

    assert prepare_data(cfg) == p  # verified: nothing said, nothing rebuilt
    assert capsys.readouterr().err == ""


def flip(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 1]))


def test_loading_checks_a_sample_and_the_full_check_reads_every_byte(tmp_path, capsys):
    """A 6 MB token file: a load hashes 64 blocks of 64 KiB (4 MiB) spread over it; a flipped byte between
    them passes the load's check and fails the full one (written at close, checked on request)."""
    folder = tmp_path / "prepared"
    folder.mkdir()
    w = TokenWriter(folder / "train.npy", 50_000)
    w.write(np.arange(3_000_000) % 50_000)
    files = {"train.npy": w.close()}
    (folder / "meta.json").write_text(__import__("json").dumps({"files": files}))
    size = files["train.npy"]["bytes"]
    offsets = sample_offsets(size)
    assert len(offsets) == 64 and offsets[0] == 0 and offsets[-1] == size - SAMPLE_BYTES
    assert verify(folder, files) is None and verify(folder, files, "full") is None

    between = offsets[10] + SAMPLE_BYTES + 100  # in no sampled block
    assert between < offsets[11]
    flip(folder / "train.npy", between)
    assert verify(folder, files) is None  # the load's check does not read it
    assert verify(folder, files, "full") == "train.npy does not match its sha256"
    assert data_cli(["verify", str(folder)]) == 1
    assert capsys.readouterr().err.strip() == f"{folder}: train.npy does not match its sha256"

    flip(folder / "train.npy", between)  # back as written
    flip(folder / "train.npy", offsets[37] + 5)  # inside a sampled block
    assert verify(folder, files) == "train.npy does not match its sampled digest"
    flip(folder / "train.npy", offsets[37] + 5)
    assert data_cli(["verify", str(folder)]) == 0 and capsys.readouterr().out.strip() == f"{folder}: ok"

    older = {"train.npy": {k: v for k, v in files["train.npy"].items() if k != "sampled"}}  # before sampling
    flip(folder / "train.npy", between)
    assert verify(folder, older) == "train.npy does not match its sha256"  # checked in full


def test_a_full_check_on_request_rebuilds_what_the_sample_missed(big_vocab, capsys):
    cfg, _ = big_vocab
    p = prepare_data(cfg)
    good = p.train_path.read_bytes()
    capsys.readouterr()
    flip(p.train_path, len(good) - 1)
    assert prepare_data(cfg, verify_level="full") == p
    assert "train.npy does not match its sha256" in capsys.readouterr().err
    assert p.train_path.read_bytes() == good


def test_prepared_data_round_trips_through_a_dict():
    p = PreparedData(__import__("pathlib").Path("/x"), 70_002, 1, 10, 2, 5, "uint32")
    assert PreparedData.from_dict(p.to_dict()) == p
    old = {"dir": "/x", "vocab_size": 512, "eos_id": 0, "train_tokens": 1, "val_tokens": 1}  # a worker of before
    assert PreparedData.from_dict(old).dtype == "uint16"
