"""Atomic sharded checkpoints: a save either completes or leaves the last good one untouched.

Layout under <run_dir>/checkpoints/:
    step_00000100/            a complete checkpoint
        manifest.json         size + sha256 of every other file; written last, inside the folder
        trainer_state.json    step, data position, config, world size (rank 0)
        rng_rank{r}.safetensors, model_rank{r}.safetensors   (ours, per rank)
        *.pt                  DeepSpeed's ZeRO shards (per rank)
    step_00000200.partial/    a save in progress (or one that died): never read
    latest                    the name of the newest complete checkpoint

The commit protocol: every rank writes into `.partial`; barrier; rank 0 hashes the files, writes the
manifest, renames the folder (atomic on POSIX) and only then replaces `latest` (write + rename).
A crash anywhere before the last rename leaves `latest` on the previous complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scalesparse import comm
from scalesparse.errors import CheckpointError
from scalesparse.files import sha256_file, write_atomic

MANIFEST = "manifest.json"
STATE = "trainer_state.json"
LATEST = "latest"
PARTIAL = ".partial"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(ckpt: Path, step: int) -> None:
    files = {}
    for p in sorted(ckpt.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[str(p.relative_to(ckpt))] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    write_atomic(ckpt / MANIFEST, json.dumps({"format": 1, "step": step, "files": files}, indent=1))


def verify(ckpt: Path) -> dict[str, Any]:
    """Check every file against the manifest; raise CheckpointError naming the first bad file."""
    manifest_path = ckpt / MANIFEST
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: checkpoint folder not found")
    if not manifest_path.is_file():
        raise CheckpointError(f"{manifest_path}: missing; {ckpt} is not a complete checkpoint")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError):
        raise CheckpointError(f"{manifest_path}: unreadable manifest") from None
    for rel, want in files.items():
        p = ckpt / rel
        if not p.is_file():
            raise CheckpointError(f"{p}: listed in the manifest but missing")
        size = p.stat().st_size
        if size != want["size"]:
            raise CheckpointError(f"{p}: truncated or altered ({size} bytes, manifest says {want['size']})")
        if sha256_file(p) != want["sha256"]:
            raise CheckpointError(f"{p}: checksum mismatch (file altered or corrupt)")
    return manifest


def read_state(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / STATE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt / STATE}: missing") from None
    except ValueError:
        raise CheckpointError(f"{ckpt / STATE}: not valid JSON") from None


def latest_checkpoint(root: Path) -> Path | None:
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = root / name
    if not name or not path.is_dir():
        raise CheckpointError(f"{pointer}: points at {name!r}, which does not exist")
    return path


def complete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(PARTIAL)
                  and (p / MANIFEST).is_file())  # fmt: skip


def resolve(spec: str | Path) -> Path:
    """A checkpoint folder, a checkpoints root or a run directory → a checkpoint folder."""
    p = Path(spec).expanduser()
    if (p / MANIFEST).is_file() or p.name.startswith("step_"):
        return p
    for root in (p, p / "checkpoints"):
        if (root / LATEST).is_file():
            found = latest_checkpoint(root)
            assert found is not None
            return found
    raise CheckpointError(f"{p}: no checkpoint here (no {MANIFEST}, and no {LATEST} pointer under it)")


class Checkpointer:
    """Runs on every rank; rank 0 commits."""

    def __init__(self, root: Path, keep: int) -> None:
        self.root = root
        self.keep = keep

    def save(self, step: int, write_shards: Callable[[Path], None], state: dict[str, Any]) -> Path:
        final = self.root / tag_for(step)
        partial = self.root / (tag_for(step) + PARTIAL)
        if comm.rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if partial.exists():  # left by a save that died
                shutil.rmtree(partial)
            partial.mkdir()
        comm.barrier()
        write_shards(partial)
        comm.barrier()  # every rank's shards are on disk
        if comm.rank() == 0:
            write_atomic(partial / STATE, json.dumps(state, indent=1))
            write_manifest(partial, step)
            _fsync_dir(partial)
            if final.exists():  # an older save of this step (after a restart): replace it whole
                shutil.rmtree(final)
            os.replace(partial, final)
            _fsync_dir(self.root)
            write_atomic(self.root / LATEST, final.name)
            self._retain()
        comm.barrier()
        return final

    def _retain(self) -> None:
        for old in complete_checkpoints(self.root)[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
