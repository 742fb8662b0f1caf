"""Token files on disk: memory-mappable .npy arrays, uint16 when the vocabulary fits, uint32 otherwise,
written incrementally (a piece of documents at a time) and verified before use.

A silent uint16 cast of ids ≥ 65,536 has corrupted other projects' data; here the dtype follows the
vocabulary, the writer refuses an id the dtype cannot hold, and the metadata records dtype, size, the
sha256 of every file and a sampled digest (SAMPLE_BLOCKS blocks of SAMPLE_BYTES spread over the file),
so a truncated or altered cache is found before training reads it. Loading checks sizes, headers and
the sampled digest (a few MiB read, whatever the corpus size); the full sha256 is computed when the
file is written and checked on request (`verify(..., level="full")`, `python -m scalesparse.data verify`).
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path
from typing import Literal

import numpy as np

HEADER_BYTES = 128  # fixed so the header can be rewritten in place once the token count is known
SAMPLE_BLOCKS = 64  # blocks hashed on every load: the first (the header), the last, evenly between
SAMPLE_BYTES = 64 << 10
Level = Literal["sizes", "sampled", "full"]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _header(dtype: np.dtype, n: int) -> bytes:
    body = repr({"descr": dtype.str, "fortran_order": False, "shape": (n,)}).encode("latin1")
    pad = HEADER_BYTES - 10 - len(body) - 1
    assert pad >= 0, "the header outgrew its reserved space"
    return b"\x93NUMPY\x01\x00" + (HEADER_BYTES - 10).to_bytes(2, "little") + body + b" " * pad + b"\n"


class TokenWriter:
    """Append token arrays to a .npy file; `close()` writes the final length and returns the file's record."""

    def __init__(self, path: Path, vocab_size: int) -> None:
        self.path = path
        self.dtype = token_dtype(vocab_size)
        self.vocab_size = vocab_size
        self.count = 0
        self.f = open(path, "wb")
        self.f.write(_header(self.dtype, 0))

    def write(self, ids: np.ndarray) -> None:
        if ids.size and (int(ids.max()) >= self.vocab_size or int(ids.min()) < 0):
            raise AssertionError(f"token id outside [0, {self.vocab_size}) from the tokenizer")
        self.f.write(np.ascontiguousarray(ids, dtype=self.dtype).tobytes())
        self.count += int(ids.size)

    def close(self) -> dict:
        self.f.seek(0)
        self.f.write(_header(self.dtype, self.count))
        self.f.flush()
        self.f.close()
        return {"dtype": self.dtype.name, "tokens": self.count, **file_record(self.path)}


def file_record(path: Path) -> dict:
    """What verification compares: the size, the sha256 of the whole file and the sampled digest."""
    return {"bytes": path.stat().st_size, "sha256": file_digest(path), "sampled": sampled_digest(path)}


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def sample_offsets(size: int, blocks: int = SAMPLE_BLOCKS, block: int = SAMPLE_BYTES) -> list[int]:
    """Where the sampled blocks start: the whole file when it is small, else `blocks` evenly spread
    from the first byte to the last block."""
    if size <= blocks * block:
        return list(range(0, size, block))
    return [i * (size - block) // (blocks - 1) for i in range(blocks)]


def sampled_digest(path: Path, blocks: int = SAMPLE_BLOCKS, block: int = SAMPLE_BYTES) -> dict:
    size = path.stat().st_size
    h = hashlib.sha256(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        for offset in sample_offsets(size, blocks, block):
            f.seek(offset)
            h.update(f.read(block))
    return {"blocks": blocks, "block_bytes": block, "sha256": h.hexdigest()}


def open_tokens(path: Path) -> np.ndarray:
    """The token array, memory-mapped (read-only); the dtype comes from the file."""
    return np.load(path, mmap_mode="r")


def verify(folder: Path, files: dict[str, dict], level: Level = "sampled") -> str | None:
    """None when every recorded file is there with its size, .npy header and (by `level`) sampled digest
    or full sha256; else what is wrong, in words. A record without a sampled digest (written by an
    older scalesparse) is checked in full."""
    for name, rec in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != rec["bytes"]:
            return f"{name} has {size} bytes, its record says {rec['bytes']}"
        if name.endswith(".npy"):
            problem = _check_header(path, name, rec["tokens"])
            if problem:
                return problem
        sampled = rec.get("sampled")
        if level == "sampled" and sampled is not None:
            if sampled_digest(path, sampled["blocks"], sampled["block_bytes"])["sha256"] != sampled["sha256"]:
                return f"{name} does not match its sampled digest"
        elif level != "sizes" and file_digest(path) != rec["sha256"]:
            return f"{name} does not match its sha256"
    return None


def _check_header(path: Path, name: str, tokens: int) -> str | None:
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    try:
        shape = ast.literal_eval(head[10:].decode("latin1").strip())["shape"]
    except (ValueError, SyntaxError, KeyError, TypeError):
        return f"{name} has no readable .npy header"
    if shape != (tokens,):
        return f"{name} holds {shape} tokens, its record says {tokens}"
    return None
