"""A transformers folder's weight files, read a tensor or a byte range at a time.

safetensors shards are read with plain positioned reads from their JSON headers' offsets, not
memory-mapped: a worker that loads only its ZeRO-3 partition reads only those bytes, and pages of a
mapped file would count in its resident memory as if it held them. pytorch_model*.bin shards (only
with model.allow_pickle) go through torch.load's weights_only reader, memory-mapped where the format
allows. Nothing here knows model names: see model/families for the mapping.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import torch

from scalesparse.errors import CheckpointError, ConfigError

INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
MAX_HEADER = 100 << 20  # the format's own limit on a header's size


def where_of(folder: str | Path) -> str:
    return f"model.from_pretrained: {folder}"


class SafetensorsShard:
    """One .safetensors file: its header parsed once; `read` copies a flat element range of a tensor."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with path.open("rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > MAX_HEADER:
                    raise ValueError(f"header of {n} bytes")
                header = json.loads(f.read(n))
            size = path.stat().st_size
        except (OSError, ValueError, struct.error) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
        self.data_start = 8 + n
        header.pop("__metadata__", None)
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
        for name, e in header.items():
            try:
                dtype = DTYPES.get(e.get("dtype"))
                shape, (begin, end) = tuple(int(d) for d in e["shape"]), e["data_offsets"]
            except (AttributeError, KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: tensor {name}'s header entry is malformed ({e!r:.80})") from None
            if dtype is None:
                raise CheckpointError(f"{path}: tensor {name} has dtype {e.get('dtype')!r}, which cannot be read")
            if end - begin != math.prod(shape) * dtype.itemsize or self.data_start + end > size:
                raise CheckpointError(f"{path}: tensor {name}'s bytes do not match its shape (a truncated file?)")
            self.entries[name] = (dtype, shape, begin)
        self.bytes_read = 0

    def keys(self):
        return self.entries.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def read(self, name: str, start: int = 0, length: int | None = None, out: torch.Tensor | None = None
             ) -> torch.Tensor:  # fmt: skip
        """Elements [start, start + length) of the flattened tensor (all of it by default), as stored;
        into `out` (contiguous, 1-D, `length` elements) when it has the stored dtype: no second copy."""
        dtype, shape, begin = self.entries[name]
        if length is None:
            length = math.prod(shape) - start
        if out is not None and out.dtype == dtype and out.is_contiguous() and out.device.type == "cpu":
            raw = out.view(torch.uint8)
        else:
            raw = torch.empty(length * dtype.itemsize, dtype=torch.uint8)
        with self.path.open("rb", buffering=0) as f:
            f.seek(self.data_start + begin + start * dtype.itemsize)
            view, got = memoryview(raw.numpy()), 0
            while got < raw.numel():  # a large read may come back in parts
                n = f.readinto(view[got:])
                if not n:
                    raise CheckpointError(f"{self.path}: ends inside tensor {name} (a truncated file?)")
                got += n
        self.bytes_read += raw.numel()
        if out is not None:
            if raw.data_ptr() != out.data_ptr():
                out.copy_(raw.view(dtype))
            return out
        return raw.view(dtype)

    def get_tensor(self, name: str) -> torch.Tensor:
        return self.read(name).view(self.shape(name))


class PickledShard:
    """A pytorch_model*.bin shard: torch.load with weights_only (tensors and plain containers only, no
    code), memory-mapped where the file's format allows."""

    def __init__(self, path: Path) -> None:
        try:
            self.tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (pre-zip) format cannot be memory-mapped
            self.tensors = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable weights file ({type(e).__name__}: {e})") from None
        self.bytes_read = 0

    def keys(self):
        return self.tensors.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def read(self, name: str, start: int = 0, length: int | None = None, out: torch.Tensor | None = None
             ) -> torch.Tensor:  # fmt: skip
        flat = self.tensors[name].reshape(-1)
        part = flat[start:] if length is None else flat[start : start + length]
        self.bytes_read += part.numel() * part.element_size()
        return part if out is None else out.copy_(part)

    def get_tensor(self, name: str) -> torch.Tensor:
        return self.tensors[name]


class WeightFiles:
    """Which shard holds each tensor: from model.safetensors.index.json, else every *.safetensors; with
    `allow_pickle` and no safetensors, pytorch_model*.bin shards."""

    def __init__(self, folder: Path, allow_pickle: bool = False) -> None:
        self.folder = folder
        where = where_of(folder)
        self.pickled = False
        self._open: dict[Path, Any] = {}
        if (folder / INDEX).is_file():
            self.shard_of = self._index(folder / INDEX)
        elif shards := sorted(folder.glob("*.safetensors")):
            self.shard_of = {name: shard for shard in shards for name in self._shard(shard).keys()}
        else:
            pickled = sorted(folder.glob("pytorch_model*.bin"))
            if not pickled:
                other = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
                extra = f" (found {other[0]}: not a transformers weights file)" if other else ""
                raise ConfigError(f"{where} has no *.safetensors weights{extra}")
            if not allow_pickle:
                raise ConfigError(f"{where}: {pickled[0].name} is a pickle, which can run code when loaded; convert "
                                  f"it to safetensors or set model.allow_pickle: true if you trust it")  # fmt: skip
            self.pickled = True
            if (folder / PICKLE_INDEX).is_file():
                self.shard_of = self._index(folder / PICKLE_INDEX)
            else:
                self.shard_of = {name: shard for shard in pickled for name in self._shard(shard).keys()}

    def _index(self, path: Path) -> dict[str, Path]:
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise CheckpointError(f"{path}: not a valid index (expected a JSON object with a weight_map)") from None
        return {name: self.folder / shard for name, shard in weight_map.items()}

    def _shard(self, path: Path):
        if path not in self._open:
            if not path.is_file():
                held = next((n for n, s in self.shard_of.items() if s == path), "?")
                raise CheckpointError(f"{where_of(self.folder)}: shard {path.name} (holding {held}) is missing")
            self._open[path] = PickledShard(path) if self.pickled else SafetensorsShard(path)
        return self._open[path]

    def _file(self, name: str):
        return self._shard(self.shard_of[name])

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).shape(name)

    def get(self, name: str) -> torch.Tensor:
        return self._file(name).get_tensor(name)

    def read_flat(self, names: list[str], start: int, out: torch.Tensor) -> torch.Tensor:
        """Fill `out` (1-D) with elements [start, start + out.numel()) of the named tensors flattened and
        laid end to end, reading only those elements (a ZeRO-3 rank's partition of a parameter made of
        these tensors), straight into `out` where the stored dtype is its own."""
        length, offset = out.numel(), 0
        total = sum(math.prod(self.shape(n)) for n in names)
        if total < start + length:
            raise CheckpointError(f"{where_of(self.folder)}: {names[0]}… hold {total} elements, "
                                  f"fewer than the {start + length} expected")  # fmt: skip
        for name in names:
            numel = math.prod(self.shape(name))
            lo, hi = max(start, offset), min(start + length, offset + numel)
            if lo < hi:
                self._file(name).read(name, lo - offset, hi - lo, out=out[lo - start : hi - start])
            offset += numel
        return out

    @property
    def bytes_read(self) -> int:
        return sum(s.bytes_read for s in self._open.values())
