"""Documents → token pieces, in parallel: the corpus is cut into pieces of consecutive documents,
encoded either in the driver by the tokenizer's own threads while a reader thread cuts the next pieces,
or by a pool of worker processes (each reading its piece from a file the driver wrote and writing the
piece's token files, with `threads` tokenizer threads), and the driver appends the pieces in their
order. A document's tokens depend on nothing but the document, so the token files are the same bytes
for any layout.

Each worker process starts fresh (spawn: no copy of the driver's threads or tokenizer pool) and loads
the tokenizer from the file the driver saved. A corpus of one piece is always encoded in the driver,
which keeps small corpora free of process start-up.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import signal
import sys
import threading
import types
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np

from scalesparse.data.sources import Document, Rows, unit_hash
from scalesparse.data.tokenizers import load_tokenizer
from scalesparse.data.tokens import token_dtype
from scalesparse.errors import DataError

PIECE_CHARS = 2 << 20  # text per piece: small next to a worker's memory, large next to its per-piece cost
PIECE_DOCS = 4096
WEIGHT_SALT = b"scalesparse-weight"
VAL_SALT = b"scalesparse-val"
VAL_NAMES_KEPT = 100  # a sample of held-out names for meta.json, not millions
THREADS_PER_PROCESS = 4
"""Tokenizer threads per worker process in the default layout. Measured on 2 cores (0.25 GB of JSONL,
a 32k BPE, 2026-12-07): the driver alone with 2 tokenizer threads prepared 1.25 M tokens/s, 2 worker
processes of one thread each 0.96 (they spent 35% more CPU time on the same documents). On many cores
the driver's own serial work (reading, appending) would cap a single process, hence processes of a
few threads each there; that split is not measured (no machine here has more than 2 cores)."""


def held_out(doc: Document, val_fraction: float) -> bool:
    """Named (val_docs) or, with val_fraction, drawn by a hash of the text: a document keeps its side
    when the corpus grows."""
    if doc.val is not None:
        return doc.val
    return val_fraction > 0 and unit_hash(doc.text, VAL_SALT) < val_fraction


def repeats(doc: Document) -> int:
    """Copies of a training document in one pass: weight 2.5 → 2, plus a third for half of them (by hash)."""
    whole, part = divmod(doc.weight, 1.0)
    return int(whole) + (part > 0 and unit_hash(doc.text, WEIGHT_SALT) < part)


@dataclass(frozen=True)
class TokenizerSpec:
    """What a worker needs to rebuild the driver's tokenizer: its saved file and its special ids."""

    path: str
    eos_id: int
    bos_id: int | None
    vocab_size: int


@dataclass(frozen=True)
class Piece:
    index: int
    docs: list[Document]
    done: int
    """Input bytes read when the piece was cut (for progress)."""


@dataclass
class PieceResult:
    index: int
    done: int
    chars: int = 0
    docs: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})
    tokens: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})
    files: dict[str, Path] = field(default_factory=dict)
    """The token file written for each split that got tokens (raw ids of the final dtype, no header)."""
    val_names: list[str] = field(default_factory=list)


def pieces(rows: Iterator[Rows]) -> Iterator[Piece]:
    """Consecutive documents, PIECE_CHARS of text or PIECE_DOCS documents at most each."""
    docs: list[Document] = []
    chars = done = index = 0
    for batch in rows:
        for d in batch.docs:
            docs.append(d)
            chars += len(d.text)
            if chars >= PIECE_CHARS or len(docs) >= PIECE_DOCS:
                yield Piece(index, docs, batch.done)
                docs, chars, index = [], 0, index + 1
        done = batch.done
    if docs:
        yield Piece(index, docs, done)


class PieceEncoder:
    """Encode a piece: [BOS] doc EOS per document, training documents `repeats` times, into one token
    file per split under `out_dir`."""

    def __init__(self, spec: TokenizerSpec, out_dir: Path, val_fraction: float) -> None:
        self.spec, self.out_dir, self.val_fraction = spec, out_dir, val_fraction
        self.tokenizer = load_tokenizer(Path(spec.path), spec.eos_id)
        self.dtype = token_dtype(spec.vocab_size)

    def __call__(self, piece: Piece) -> PieceResult:
        result = PieceResult(piece.index, piece.done, chars=sum(len(d.text) for d in piece.docs))
        ids = self.tokenizer.encode_arrays([d.text for d in piece.docs], self.dtype)
        chosen: dict[str, list[tuple[np.ndarray, int]]] = {"train": [], "val": []}
        for doc, doc_ids in zip(piece.docs, ids, strict=True):
            split = "val" if held_out(doc, self.val_fraction) else "train"
            chosen[split].append((doc_ids, 1 if split == "val" else repeats(doc)))
            result.docs[split] += 1
            if split == "val" and len(result.val_names) < VAL_NAMES_KEPT:
                result.val_names.append(doc.name)
        for split, parts in chosen.items():
            tokens = self._pack(parts)
            if tokens.size:
                assert int(tokens.max()) < self.spec.vocab_size, "a token id outside the tokenizer's vocabulary"
                path = self.out_dir / f"{piece.index:08d}.{split}"
                tokens.tofile(path)
                result.files[split], result.tokens[split] = path, int(tokens.size)
        return result

    def _pack(self, parts: list[tuple[np.ndarray, int]]) -> np.ndarray:
        """[BOS] ids EOS for each (ids, copies), `copies` times each, back to back."""
        extra = 1 + (self.spec.bos_id is not None)
        out = np.empty(sum((ids.size + extra) * n for ids, n in parts), dtype=self.dtype)
        at = 0
        for ids, copies in parts:
            for _ in range(copies):
                if self.spec.bos_id is not None:
                    out[at] = self.spec.bos_id
                    at += 1
                out[at : at + ids.size] = ids
                out[at + ids.size] = self.spec.eos_id
                at += ids.size + 1
        return out


def layout(num_proc: int, cpus: int) -> tuple[int, int]:
    """(worker processes, tokenizer threads each) for `data.num_proc` on `cpus` CPUs; 1 process means
    the driver itself. num_proc 0: one process per THREADS_PER_PROCESS CPUs (the driver alone on up to
    2 × THREADS_PER_PROCESS − 1); N: N processes sharing the CPUs."""
    processes = max(1, cpus // THREADS_PER_PROCESS) if num_proc == 0 else num_proc
    return processes, max(1, cpus // processes)


def encode_pieces(parts: Iterator[Piece], spec: TokenizerSpec, out_dir: Path, val_fraction: float,
                  processes: int, threads: int = 1) -> Iterator[PieceResult]:  # fmt: skip
    """The pieces' results in piece order. With one process (or one piece), the driver encodes them with
    the tokenizer's own threads while a reader thread cuts the next; else a pool of worker processes
    encodes them, at most 2 × processes pieces in flight (the corpus is never whole in memory)."""
    it = iter(parts)
    head = [p for p in (next(it, None), next(it, None)) if p is not None]
    if processes <= 1 or len(head) < 2:
        encoder = PieceEncoder(spec, out_dir, val_fraction)
        reader = read_ahead(it)
        try:  # closed here, not when a failed piece's traceback is freed: the thread stops at once
            for piece in chain(head, reader):
                yield encoder(piece)
        finally:
            reader.close()
        return
    with _WorkerPool(processes, threads, spec, out_dir, val_fraction) as pool:
        window: deque[Future] = deque()
        for piece in chain(head, it):
            window.append(pool.submit(piece))
            if len(window) >= 2 * processes:
                yield pool.result(window.popleft())
        while window:
            yield pool.result(window.popleft())


_END = object()


def read_ahead(items: Iterator, depth: int = 2) -> Iterator:
    """`items` produced by a thread of its own, at most `depth` ahead of the consumer: the reading
    (Arrow decoding, cutting pieces) overlaps the encoding, whose Rust threads release the GIL. An error
    in the reading is raised here, in order; a consumer that stops early (an error, Ctrl-C) stops the
    thread at its next item."""
    ready: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def put(entry: tuple) -> bool:
        """Hand an entry over unless the consumer has stopped (then False: the thread ends)."""
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((_END, None))
        except BaseException as e:  # noqa: BLE001 (handed to the consumer, raised there)
            put((_END, e))

    thread = threading.Thread(target=produce, name="scalesparse-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item, error = ready.get()
            if error is not None:
                raise error
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


_encoder: PieceEncoder | None = None  # one per worker process, built by _start_worker
_start_error: str | None = None  # why it could not be built (said by the first piece the worker gets)


@contextmanager
def _main_module_hidden() -> Iterator[None]:
    """A spawned process first runs the parent's __main__ again (its file, or its module), as
    multiprocessing does for pickled functions defined there: a user's script without an
    `if __name__ == "__main__":` guard would prepare its data again in every worker, and a program read
    from stdin (`python - <<EOF`) fails, since its file '<stdin>' does not exist. The workers need
    nothing from __main__ (their functions live here), so it is hidden while they start."""
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")  # no __file__, no __spec__: nothing to re-run
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    """While worker processes start: they inherit an ignored SIGINT through exec (Python keeps it so), so
    a Ctrl-C during their imports prints no traceback from each; the driver's own handler comes back at
    once (a Ctrl-C inside these milliseconds is lost). Only the main thread may set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _start_worker(spec: TokenizerSpec, out_dir: Path, val_fraction: float, threads: int) -> None:
    # an exception here would print a traceback from every worker and break the pool with no word of
    # why: it is kept, and the first piece raises it as the piece's error, which the driver reports
    global _encoder, _start_error
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle: it stops the pool
    # the process's share of the CPUs (read when the tokenizer first runs threads, after this)
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    try:
        _encoder = PieceEncoder(spec, out_dir, val_fraction)
    except Exception as e:  # noqa: BLE001 (reported with the first piece)
        _start_error = f"{type(e).__name__}: {e}"


def write_piece(piece: Piece, path: Path) -> None:
    """A piece's documents in a file of the work folder: the pool's messages stay small (a pickled
    piece of megabytes would sit in the pipe to a busy worker, and before Python 3.11.7 / 3.12.1 a pool
    whose workers were stopped hangs on such a write: CPython gh-94777)."""
    rows = [[d.name, d.text, d.weight, d.val] for d in piece.docs]
    path.write_text(json.dumps({"index": piece.index, "done": piece.done, "docs": rows}), encoding="utf-8")


def read_piece(path: Path) -> Piece:
    raw = json.loads(path.read_text(encoding="utf-8"))
    return Piece(raw["index"], [Document(*row) for row in raw["docs"]], raw["done"])


def _encode_in_worker(path: Path) -> PieceResult:
    if _encoder is None:
        raise RuntimeError(f"the tokenizer could not be loaded in a worker process ({_start_error})")
    piece = read_piece(path)
    path.unlink()
    return _encoder(piece)


class _WorkerPool:
    """A process pool that, when left by an exception (a failed piece, Ctrl-C, the consumer gone),
    stops its workers at once instead of letting them finish their pieces."""

    def __init__(self, num_proc: int, threads: int, spec: TokenizerSpec, out_dir: Path, val_fraction: float) -> None:
        spawn = multiprocessing.get_context("spawn")
        self.num_proc, self.out_dir = num_proc, out_dir
        self.processes: dict = {}  # pid → multiprocessing Process
        self.executor = ProcessPoolExecutor(num_proc, mp_context=spawn, initializer=_start_worker,
                                            initargs=(spec, out_dir, val_fraction, threads))  # fmt: skip

    def submit(self, piece: Piece) -> Future:
        path = self.out_dir / f"{piece.index:08d}.docs"
        write_piece(piece, path)
        # (a submit starts a worker process while the pool has fewer than num_proc)
        with _main_module_hidden(), _sigint_ignored():
            try:
                future = self.executor.submit(_encode_in_worker, path)
            except BrokenProcessPool:  # a worker died since the last result
                raise self._broken() from None
        # the workers, kept here: a broken pool forgets its processes, and with them their exit codes
        self.processes.update(getattr(self.executor, "_processes", None) or {})
        return future

    def _broken(self) -> DataError:
        for process in self.processes.values():
            process.join(timeout=1)  # (a process just killed may not have been reaped yet)
        codes = sorted({p.exitcode for p in self.processes.values() if p.exitcode not in (None, 0)})
        if set(codes) - {-15}:  # the pool terminates (SIGTERM) the others once one died: name the cause
            codes = [c for c in codes if c != -15]
        why = ""
        if codes:
            kill = "; -9 is a kill, often for memory" if -9 in codes else ""
            why = f" (exit code {', '.join(map(str, codes))}{kill})"
        return DataError(f"data: a tokenizing process (of data.num_proc={self.num_proc}) ended abruptly{why}; "
                         f"lower data.num_proc if memory is short")  # fmt: skip

    def result(self, future: Future) -> PieceResult:
        """The piece's result, or one line saying why there is none."""
        try:
            return future.result()
        except BrokenProcessPool:
            raise self._broken() from None
        except DataError:
            raise
        except Exception as e:  # raised inside a worker: one line, as the driver's own errors
            raise DataError(f"data: tokenizing failed in a worker process: {type(e).__name__}: {e}") from None

    def __enter__(self) -> _WorkerPool:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.executor.shutdown(wait=True)
            return
        for process in [*self.processes.values(), *(getattr(self.executor, "_processes", None) or {}).values()]:
            process.terminate()
        self.executor.shutdown(wait=True, cancel_futures=True)
