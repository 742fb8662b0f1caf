"""Parallel encoding (the driver with the tokenizer's threads, or worker processes): the token files
are the same bytes for every layout."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace

import numpy as np
import pytest

from scalesparse.config import DataConfig, SourceConfig
from scalesparse.data import encode, prepare_data
from scalesparse.data.encode import Piece, pieces
from scalesparse.data.sources import Document, Rows
from tests.data.helpers import word_level_tokenizer, write_jsonl


def test_pieces_are_consecutive_documents_cut_by_text_and_count(monkeypatch):
    monkeypatch.setattr(encode, "PIECE_CHARS", 10)
    monkeypatch.setattr(encode, "PIECE_DOCS", 3)
    rows = [Rows([Document(f"d{i}", "x" * n) for i, n in enumerate([4, 4, 4])], 30),
            Rows([Document("d3", "y"), Document("d4", "z"), Document("d5", "w"), Document("d6", "v")], 60)]  # fmt: skip
    got = list(pieces(iter(rows)))
    assert [[d.name for d in p.docs] for p in got] == [["d0", "d1", "d2"], ["d3", "d4", "d5"], ["d6"]]
    assert [p.index for p in got] == [0, 1, 2] and [p.done for p in got] == [30, 60, 60]
    assert isinstance(got[0], Piece)


@pytest.fixture
def corpus(tmp_path):
    """120 documents of w-words in two sources (one weighted 1.5: repeats by hash), a tokenizer with BOS."""
    tok = word_level_tokenizer(tmp_path / "tok" / "tokenizer.json", 50, eos="</s>", bos="<s>")
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": "<s>"}))
    rng = np.random.default_rng(0)
    texts = [" ".join(f"w{j}" for j in rng.integers(0, 50, rng.integers(1, 40))) for _ in range(120)]
    a = write_jsonl(tmp_path / "a" / "part.jsonl", texts[:70])
    b = write_jsonl(tmp_path / "b" / "part.jsonl", texts[70:])

    def cfg(num_proc: int) -> DataConfig:
        return DataConfig(sources=(SourceConfig(path=str(a)), SourceConfig(path=str(b), weight=1.5)), tokenizer="hf",
                          tokenizer_path=str(tok), val_fraction=0.2, num_proc=num_proc,
                          cache_dir=str(tmp_path / f"cache-{num_proc}"))  # fmt: skip

    return cfg, texts


def test_token_files_are_the_same_bytes_for_every_layout(corpus, monkeypatch):
    """The driver alone (num_proc 1, and the default on 2 CPUs), 2 and 3 single-threaded processes, and
    2 processes of 2 tokenizer threads each (as on 4 CPUs)."""
    from scalesparse.data import prepare

    monkeypatch.setattr(encode, "PIECE_CHARS", 400)  # ~15 pieces: every worker gets several, out of order
    cfg, texts = corpus
    runs = []
    for num_proc, cpus in ((1, 2), (0, 2), (2, 2), (3, 2), (2, 4)):
        monkeypatch.setattr(prepare, "available_cpus", lambda cpus=cpus: cpus)
        c = cfg(num_proc)
        runs.append(prepare_data(replace(c, cache_dir=f"{c.cache_dir}-{cpus}")))
    one = runs[0]
    for other in runs[1:]:
        assert other.train_path.read_bytes() == one.train_path.read_bytes()
        assert other.val_path.read_bytes() == one.val_path.read_bytes()
        meta = [json.loads((p.dir / "meta.json").read_text()) for p in (one, other)]
        assert [{k: m[k] for k in ("train_docs", "val_docs", "val_names", "train_tokens")} for m in meta] == [
            {k: meta[0][k] for k in ("train_docs", "val_docs", "val_names", "train_tokens")}] * 2  # fmt: skip
    assert not list(one.dir.glob("*pieces*")) and sorted(p.name for p in one.dir.iterdir()) == [
        "meta.json", "tokenizer.json", "train.npy", "val.npy"]  # fmt: skip

    ids = np.concatenate([np.load(one.train_path), np.load(one.val_path)])
    docs = np.split(ids, np.flatnonzero(ids == one.eos_id) + 1)[:-1]  # [BOS] doc EOS each
    assert all(d[0] == one.bos_id for d in docs)
    words = {" ".join(f"w{i - 3}" for i in d[1:-1]) for d in docs}  # word wK has id K + 3
    assert words == set(texts)


@pytest.mark.parametrize("how", ["stdin", "unguarded script"])
def test_a_pool_works_from_any_main_program(how, tmp_path):
    """The pool's spawned workers do not run the driver's __main__ again: a program read from stdin (its
    file '<stdin>' does not exist) and a script without an `if __name__ == "__main__":` guard (which
    every worker would otherwise run again, preparing the data once more each) both prepare once."""
    import subprocess
    import sys

    from tests.conftest import REPO

    write_jsonl(tmp_path / "c" / "part.jsonl", [f"document {i}" for i in range(encode.PIECE_DOCS + 10)])  # 2 pieces
    program = (f"from scalesparse.config import DataConfig, SourceConfig\n"
               f"from scalesparse.data import prepare_data\n"
               f"print('main ran', flush=True)\n"
               f"p = prepare_data(DataConfig(sources=(SourceConfig(path={str(tmp_path / 'c')!r}),), tokenizer='byte', "
               f"val_fraction=0.1, num_proc=2, cache_dir={str(tmp_path / 'cache')!r}))\n"
               f"print('tokens', p.train_tokens + p.val_tokens)\n")  # fmt: skip
    if how == "stdin":
        done = subprocess.run([sys.executable, "-"], input=program, cwd=REPO, capture_output=True, text=True,
                              timeout=120)  # fmt: skip
    else:
        (tmp_path / "prep.py").write_text(program)
        done = subprocess.run([sys.executable, str(tmp_path / "prep.py")], cwd=REPO, capture_output=True, text=True,
                              timeout=120, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("main ran") == 1, done.stdout
    want = sum(len(f"document {i}") + 1 for i in range(encode.PIECE_DOCS + 10))  # bytes + EOS each
    assert f"tokens {want}" in done.stdout


def test_a_killed_worker_stops_the_preparation_in_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    """A tokenizing process killed (as the kernel does when memory runs out): the preparation ends within
    seconds with one line saying so, and neither the cache folder nor its temporary folder stays."""
    import threading
    import time

    import psutil

    from scalesparse.errors import DataError

    monkeypatch.setattr(encode, "PIECE_DOCS", 2)  # thousands of pieces: the pool is busy for a while
    write_jsonl(tmp_path / "c" / "part.jsonl", [f"document number {i}" for i in range(20_000)])
    cfg = DataConfig(sources=(SourceConfig(path=str(tmp_path / "c")),), tokenizer="byte", val_fraction=0.1,
                     num_proc=2, cache_dir=str(tmp_path / "cache"))  # fmt: skip
    failure: list[BaseException] = []

    def prepare() -> None:
        try:
            prepare_data(cfg)
        except BaseException as e:  # noqa: BLE001 (handed to the test's thread)
            failure.append(e)

    thread = threading.Thread(target=prepare)
    thread.start()
    me, deadline = psutil.Process(), time.monotonic() + 60
    while not (workers := [p for p in me.children() if "spawn_main" in " ".join(p.cmdline())]):
        assert thread.is_alive() and time.monotonic() < deadline, "no worker process started"
        time.sleep(0.05)
    time.sleep(0.5)
    killed = time.monotonic()
    workers[0].kill()
    thread.join(timeout=60)
    assert not thread.is_alive(), "the preparation hung after its worker was killed"
    assert time.monotonic() - killed < 30
    assert len(failure) == 1 and isinstance(failure[0], DataError), failure
    message = str(failure[0])
    assert "a tokenizing process (of data.num_proc=2) ended abruptly (exit code -9" in message, message
    assert "\n" not in message
    assert not list((tmp_path / "cache" / "prepared").iterdir())


def test_the_default_layout_is_the_driver_alone_on_few_cpus_and_processes_of_threads_on_many():
    assert encode.layout(0, 1) == (1, 1) and encode.layout(0, 2) == (1, 2) and encode.layout(0, 7) == (1, 7)
    assert encode.layout(0, 16) == (4, 4) and encode.layout(0, 18) == (4, 4)
    assert encode.layout(2, 2) == (2, 1) and encode.layout(3, 2) == (3, 1) and encode.layout(2, 8) == (2, 4)


def test_reading_ahead_keeps_the_order_raises_the_readers_error_and_stops_with_its_consumer():
    from scalesparse.errors import DataError

    def failing():
        yield from range(5)
        raise DataError("data: line 7 is not JSON")

    got = []
    with pytest.raises(DataError, match="line 7"):
        for x in encode.read_ahead(failing()):
            got.append(x)
    assert got == [0, 1, 2, 3, 4]

    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    reader = encode.read_ahead(endless(), depth=2)
    assert [next(reader) for _ in range(3)] == [0, 1, 2]
    reader.close()  # the consumer stops (an error or Ctrl-C in the encoding)
    assert not any(t.name == "scalesparse-read-ahead" for t in threading.enumerate())
    assert len(produced) <= 3 + 2 + 1  # at most `depth` ahead, plus the one it held when told to stop

    short = encode.read_ahead(iter(range(5)), depth=2)  # the reader done, its end-of-items blocked: queue full
    assert next(short) == 0
    time.sleep(0.3)
    short.close()
    assert not any(t.name == "scalesparse-read-ahead" for t in threading.enumerate())
