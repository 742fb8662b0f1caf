"""Documents from local files through `datasets`: formats, compressions, splits, weights, streaming,
encoding errors, reading progress, hub offline."""

from __future__ import annotations

import bz2
import gzip
import importlib.util
import json
import lzma

import numpy as np
import pytest

from scalesparse.config import DataConfig, SourceConfig
from scalesparse.data import load_tokenizer, prepare_data
from scalesparse.data.sources import input_bytes, read_rows
from scalesparse.errors import DataError
from tests.data.helpers import DOCS, write_jsonl


def decoded_documents(p) -> list[str]:
    """Decode the token files back into documents: byte tokens, split at EOS."""
    out = []
    for path in (p.train_path, p.val_path):
        ids = np.load(path)
        ends = np.flatnonzero(ids == p.eos_id)
        starts = np.concatenate([[0], ends[:-1] + 1])
        out += [bytes(ids[s:e].astype(np.uint8)).decode("utf-8") for s, e in zip(starts, ends, strict=True)]
    return out


def cfg_for(tmp_path, *sources, **data) -> DataConfig:
    defaults = {"tokenizer": "byte", "val_fraction": 0.5, "cache_dir": str(tmp_path / "cache")}
    return DataConfig(sources=tuple(SourceConfig(**s) for s in sources), **{**defaults, **data})


def make_txt(d):
    d.mkdir()
    for i, t in enumerate(DOCS):
        (d / f"doc{i}.txt").write_text(t, encoding="utf-8")
    return d


def make_parquet(path, field="text"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({field: DOCS, "n": list(range(len(DOCS)))}), path)
    return path


def make_csv(path):
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "n"])
        w.writerows([t, i] for i, t in enumerate(DOCS))
    return path


def jsonl_bytes(texts=DOCS) -> bytes:
    return "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()


def make_gz(path):
    with gzip.open(path, "wb") as f:
        f.write(jsonl_bytes())
    return path


def make_compressed(path, compress):
    path.write_bytes(compress(jsonl_bytes()))
    return path


def make_arrow(folder):
    """What `datasets` users hold: the Arrow file of Dataset.save_to_disk (beside its JSON metadata)."""
    import datasets

    datasets.Dataset.from_dict({"text": DOCS, "n": list(range(len(DOCS)))}).save_to_disk(str(folder))
    return folder


MAKERS = {
    "txt folder": lambda tmp: str(make_txt(tmp / "txt")),
    "txt glob": lambda tmp: str(make_txt(tmp / "txt")) + "/doc*.txt",
    "jsonl": lambda tmp: str(write_jsonl(tmp / "d.jsonl", DOCS)),
    "parquet": lambda tmp: str(make_parquet(tmp / "d.parquet")),
    "csv": lambda tmp: str(make_csv(tmp / "d.csv")),
    "jsonl.gz": lambda tmp: str(make_gz(tmp / "d.jsonl.gz")),
    "jsonl.bz2": lambda tmp: str(make_compressed(tmp / "d.jsonl.bz2", bz2.compress)),
    "jsonl.xz": lambda tmp: str(make_compressed(tmp / "d.jsonl.xz", lzma.compress)),
    "arrow": lambda tmp: str(make_arrow(tmp / "saved")) + "/*.arrow",
}


@pytest.mark.parametrize("kind", list(MAKERS))
@pytest.mark.parametrize("streaming", [False, True])
def test_round_trip_gives_back_every_document_separated_by_eos(kind, streaming, tmp_path):
    p = prepare_data(cfg_for(tmp_path, {"path": MAKERS[kind](tmp_path)}, streaming=streaming))
    assert sorted(decoded_documents(p)) == sorted(DOCS)
    assert p.train_tokens + p.val_tokens == sum(len(t.encode()) + 1 for t in DOCS)


def test_streaming_writes_the_same_bytes(tmp_path):
    path = MAKERS["jsonl"](tmp_path)
    a = prepare_data(cfg_for(tmp_path, {"path": path}))
    b = prepare_data(cfg_for(tmp_path, {"path": path}, streaming=True, cache_dir=str(tmp_path / "other")))
    assert a.train_path.read_bytes() == b.train_path.read_bytes() and a.val_path.read_bytes() == b.val_path.read_bytes()


def test_a_custom_text_field(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", DOCS, field="content")
    p = prepare_data(cfg_for(tmp_path, {"path": str(path), "text_field": "content"}))
    assert sorted(decoded_documents(p)) == sorted(DOCS)


def test_val_fraction_is_by_document_hash_and_stable_when_the_corpus_grows(tmp_path):
    many = [f"document number {i}: " + "words " * (i % 7) for i in range(400)]
    small = prepare_data(cfg_for(tmp_path, {"path": str(write_jsonl(tmp_path / "a/d.jsonl", many))}, val_fraction=0.1))
    grown = prepare_data(cfg_for(tmp_path, {"path": str(write_jsonl(tmp_path / "b/d.jsonl", many + [f"new {i}"
                         for i in range(200)]))}, val_fraction=0.1))  # fmt: skip

    def val_docs(p):
        return set(decoded_documents(p)) - set(_train(p))

    held = val_docs(small)
    assert 20 <= len(held) <= 60  # ~10 % of 400
    assert held <= val_docs(grown) and not held & set(_train(grown))  # once held out, always held out


def _train(p) -> list[str]:
    """The training documents, in file order (repeats included)."""
    ids = np.load(p.train_path)
    pieces = np.split(ids, np.flatnonzero(ids == p.eos_id) + 1)[:-1]  # each ends with its EOS
    return [bytes(c[:-1].astype(np.uint8)).decode("utf-8") for c in pieces]


def test_named_validation_documents_of_txt_sources(tmp_path):
    p = prepare_data(cfg_for(tmp_path, {"path": MAKERS["txt folder"](tmp_path)}, val_fraction=0.0,
                             val_docs=("doc2",)))  # fmt: skip
    assert decoded_documents(p)[-1] == DOCS[2] and DOCS[2] not in _train(p)
    with pytest.raises(DataError, match="data.val_docs: no document starts with 'nope'"):
        prepare_data(cfg_for(tmp_path, {"path": str(tmp_path / "txt")}, val_fraction=0.0, val_docs=("nope",)))


def test_mixing_weights_repeat_documents(tmp_path):
    a = write_jsonl(tmp_path / "a/d.jsonl", [f"alpha {i}" for i in range(40)])
    b = write_jsonl(tmp_path / "b/d.jsonl", [f"beta {i}" for i in range(40)])
    p = prepare_data(cfg_for(tmp_path, {"path": str(a), "weight": 3.0}, {"path": str(b), "weight": 0.5},
                             val_fraction=0.05))  # fmt: skip
    train = _train(p)
    alphas = [t for t in train if t.startswith("alpha")]
    betas = [t for t in train if t.startswith("beta")]
    assert len(alphas) == 3 * len(set(alphas))  # every training document three times
    assert len(betas) == len(set(betas)) and 8 <= len(betas) <= 32  # about half, each once


def test_several_sources_keep_their_order(tmp_path):
    a = write_jsonl(tmp_path / "a/d.jsonl", ["first source"])
    b = write_jsonl(tmp_path / "b/d.jsonl", ["second source", "held out by name? no: by hash"])
    p = prepare_data(cfg_for(tmp_path, {"path": str(a)}, {"path": str(b)}, val_fraction=0.5))
    assert set(decoded_documents(p)) == {"first source", "second source", "held out by name? no: by hash"}


def test_hf_tokenizer_adds_bos_where_defined(tmp_path):
    from tests.data.helpers import word_level_tokenizer

    tok = word_level_tokenizer(tmp_path / "tok/tokenizer.json", 10, eos="</s>", bos="<s>")
    (tmp_path / "tok/tokenizer_config.json").write_text('{"eos_token": "</s>", "bos_token": "<s>"}')
    path = write_jsonl(tmp_path / "d.jsonl", ["w1 w2", "w3", "w4 w5 w6", "w7"])
    p = prepare_data(cfg_for(tmp_path, {"path": str(path)}, tokenizer="hf", tokenizer_path=str(tmp_path / "tok"),
                             val_fraction=0.3))  # fmt: skip
    assert (p.eos_id, p.bos_id, p.vocab_size) == (1, 2, 13)
    ids = np.concatenate([np.load(p.train_path), np.load(p.val_path)]).tolist()
    assert ids.count(2) == ids.count(1) == 4 and ids[0] == 2  # [BOS] doc EOS for each document
    t = load_tokenizer(p.tokenizer_path, p.eos_id)
    assert t.decode(t.encode_batch(["w1 w2"])[0]) == "w1 w2" and str(tok).endswith("tokenizer.json")


def test_a_hub_name_offline_fails_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match=r"data.sources\[0\].hub: cannot load 'someone/corpus' .* point "
                                        r"data.sources\[0\].path at the local files") as e:  # fmt: skip
        prepare_data(cfg_for(tmp_path, {"hub": "someone/corpus"}))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_non_utf8_text_is_refused_or_replaced(kind, streaming, tmp_path):
    """encoding_errors strict (the default) names the file and the byte; replace writes U+FFFD."""
    (tmp_path / "c").mkdir()
    bad = b"caf\xe9 au lait"
    if kind == "txt":
        (tmp_path / "c" / "a.txt").write_bytes(bad)
        (tmp_path / "c" / "b.txt").write_bytes(b"fine")
    else:
        (tmp_path / "c" / "a.jsonl").write_bytes(b'{"text": "' + bad + b'"}\n{"text": "fine"}\n')
    src = {"path": str(tmp_path / "c")}
    with pytest.raises(DataError, match=rf"a\.{kind}: not UTF-8 at byte \d+; fix the file or set data.encoding_errors: "
                                        "replace") as e:  # fmt: skip
        prepare_data(cfg_for(tmp_path, src, streaming=streaming))
    assert "\n" not in str(e.value)
    p = prepare_data(cfg_for(tmp_path, src, streaming=streaming, encoding_errors="replace"))
    assert sorted(decoded_documents(p)) == ["caf\ufffd au lait", "fine"]


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_val_docs_hold_out_whole_files_of_any_source(kind, streaming, tmp_path):
    """A folder of part-*.jsonl and valid.jsonl: val_docs names the file, all its rows are held out."""
    folder = tmp_path / "c"
    folder.mkdir()
    parts = {"part-0": DOCS[:2], "valid": DOCS[2:4], "part-1": DOCS[4:]}
    for name, texts in parts.items():
        if kind == "jsonl":
            write_jsonl(folder / f"{name}.jsonl", texts)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({"text": texts}), folder / f"{name}.parquet")
    p = prepare_data(cfg_for(tmp_path, {"path": str(folder)}, val_fraction=0.0, val_docs=("valid",),
                             streaming=streaming))  # fmt: skip
    assert _train(p) == DOCS[:2] + DOCS[4:]  # in file order: part-0, part-1
    assert set(decoded_documents(p)) - set(_train(p)) == set(DOCS[2:4])
    assert json.loads((p.dir / "meta.json").read_text())["val_docs"] == 2


def test_val_docs_without_named_files_is_refused_naming_val_fraction(tmp_path):
    with pytest.raises(DataError, match=r"data.val_docs: no document starts with 'hamlet' \(names: none: hub rows "
                                        r"are unnamed\); .* or set data.val_fraction"):  # fmt: skip
        prepare_data(cfg_for(tmp_path, {"hub": "someone/corpus"}, val_fraction=0.0, val_docs=("hamlet",)))
    path = MAKERS["jsonl"](tmp_path)
    with pytest.raises(DataError, match=r"no document starts with 'valid' \(names: d\); name local files"):
        prepare_data(cfg_for(tmp_path, {"path": path}, val_fraction=0.0, val_docs=("valid",)))


@pytest.mark.parametrize("kind,streaming,known", [("jsonl", False, True), ("jsonl", True, True),
                                                  ("parquet", False, True), ("jsonl.gz", True, False)])  # fmt: skip
def test_reading_reports_its_progress_in_input_bytes(kind, streaming, known, tmp_path):
    """The progress bar's ETA: bytes read of the local files' total, where that total means something."""
    cfg = cfg_for(tmp_path, {"path": MAKERS[kind](tmp_path)}, {"path": MAKERS["txt folder"](tmp_path)},
                  streaming=streaming)  # fmt: skip
    total = input_bytes(cfg)
    done = [r.done for r in read_rows(cfg)]
    assert done == sorted(done)
    if known:
        files = [*tmp_path.glob("d.*"), *(tmp_path / "txt").iterdir()]
        assert total == sum(f.stat().st_size for f in files) and done[-1] == total
    else:
        assert total is None


@pytest.mark.skipif(importlib.util.find_spec("zstandard") is not None, reason="zstandard is installed")
def test_zstd_files_without_zstandard_fail_in_one_line(tmp_path):
    path = tmp_path / "d.jsonl.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd" + jsonl_bytes())
    with pytest.raises(DataError, match=r"data.sources\[0\].path: .*d.jsonl.zst is .zst-compressed, which needs "
                                        r"the zstandard package; pip install zstandard, or decompress the files"):
        prepare_data(cfg_for(tmp_path, {"path": str(path)}))
