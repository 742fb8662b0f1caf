"""Regenerate docs/bad-input.md from tests/test_bad_input.py's cases, as they print today:

    .venv/bin/python -m tests.write_bad_input_doc

(tests/test_bad_input.py checks that every case has its row, so a new case without one fails.)"""

from __future__ import annotations

import re
import subprocess
import sys
import time

from tests.conftest import REPO

DOC = REPO / "docs" / "bad-input.md"
NOTES_MARK = "Not an error:"


def main() -> None:
    argv = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "tests/test_bad_input.py", "-k",
            "one_line"]  # fmt: skip
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    if proc.returncode != 0 or not rows:
        sys.exit(f"tests/test_bad_input.py failed; the doc is left as it is:\n{proc.stdout[-3000:]}")
    # temporary folders (pytest's, and each case's own) shortened, as the doc says
    rows = [re.sub(r"/[^\s`'\":]*/pytest-of-[^/]+/pytest-\d+/test_[^/\s:`'\"]+", "…", r) for r in rows]
    # `` message ``: messages quote commands in backticks of their own
    rows = [re.sub(r"^(\| .*? \| )`(.*)` \|$", r"\1`` \2 `` |", r) for r in rows]
    old = DOC.read_text() if DOC.is_file() else ""
    # rows written by hand (cases tested elsewhere, e.g. with a real Ray cluster) stay, after the generated ones
    generated = {r.split(" | ")[0] for r in rows}
    rows += [line for line in old.splitlines() if line.startswith("| ") and not line.startswith(("| case |", "|---"))
             and line.split(" | ")[0] not in generated]  # fmt: skip
    notes = old[old.index(NOTES_MARK):] if NOTES_MARK in old else ""
    notes = "\n".join(line for line in notes.splitlines() if not line.startswith("| ")).strip() + "\n"
    head = (f"# Bad input: what each mistake prints\n\nGenerated from `tests/test_bad_input.py` by `python -m "
            f"tests.write_bad_input_doc`, {time.strftime('%Y-%m-%d')}.\nEvery case exits with status 2, prints exactly "
            "one line, and leaves existing checkpoints untouched.\nTemporary paths shortened to `…`.\n\n"
            "| case | message |\n|---|---|\n")  # fmt: skip
    DOC.write_text(head + "\n".join(rows) + "\n" + ("\n" + notes if notes.strip() else ""))
    print(f"wrote {DOC}: {len(rows)} cases")


if __name__ == "__main__":
    main()
