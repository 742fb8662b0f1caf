"""`python -m scalesparse.data verify [FOLDER ...]`: check prepared token folders in full.

Every start of a run checks its cache cheaply (sizes, headers and a sampled digest); this reads every
byte and compares the sha256 recorded when the files were written. Without folders, every prepared
folder under --cache-dir. Exit status 1 when any folder fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from scalesparse.data.tokens import verify


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scalesparse.data", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    check = sub.add_parser("verify", help="check prepared token folders against their full sha256s")
    check.add_argument("folders", nargs="*", type=Path, help="prepared folders (holding meta.json)")
    check.add_argument("--cache-dir", default="~/.cache/scalesparse", help="data.cache_dir (without folders)")
    args = ap.parse_args(argv)
    prepared = Path(args.cache_dir).expanduser() / "prepared"
    folders = args.folders or sorted(p.parent for p in prepared.glob("*/meta.json"))
    if not folders:
        print(f"no prepared folders under {prepared}", file=sys.stderr)
        return 1
    failed = 0
    for folder in folders:
        try:
            problem = verify(folder, json.loads((folder / "meta.json").read_text())["files"], "full")
        except (OSError, ValueError, KeyError) as e:
            problem = f"meta.json is missing or unreadable ({type(e).__name__})"
        print(f"{folder}: {problem or 'ok'}", file=sys.stderr if problem else sys.stdout, flush=True)
        failed += problem is not None
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
