"""Token files on disk: memory-mappable .npy arrays, uint16 when the vocabulary fits, uint32 otherwise,
written incrementally (a shard of documents at a time) and verified before use.

A silent uint16 cast of ids ≥ 65,536 has corrupted other projects' data; here the dtype follows the
vocabulary, the writer refuses an id the dtype cannot hold, and the metadata records dtype, size and
sha256 of every file so a truncated or altered cache is found before training reads it.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import numpy as np

HEADER_BYTES = 128  # fixed so the header can be rewritten in place once the token count is known


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
        return {"dtype": self.dtype.name, "tokens": self.count, "bytes": self.path.stat().st_size,
                "sha256": file_digest(self.path)}  # fmt: skip


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def open_tokens(path: Path) -> np.ndarray:
    """The token array, memory-mapped (read-only); the dtype comes from the file."""
    return np.load(path, mmap_mode="r")


def verify(folder: Path, files: dict[str, dict], *, checksum: bool = True) -> str | None:
    """None when every recorded file is there with its size (and sha256); else what is wrong, in words."""
    for name, rec in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != rec["bytes"]:
            return f"{name} has {size} bytes, its record says {rec['bytes']}"
        if checksum and file_digest(path) != rec["sha256"]:
            return f"{name} does not match its sha256"
        if name.endswith(".npy"):
            with open(path, "rb") as f:
                head = f.read(HEADER_BYTES)
            try:
                shape = ast.literal_eval(head[10:].decode("latin1").strip())["shape"]
            except (ValueError, SyntaxError, KeyError):
                return f"{name} has no readable .npy header"
            if shape != (rec["tokens"],):
                return f"{name} holds {shape} tokens, its record says {rec['tokens']}"
    return None
