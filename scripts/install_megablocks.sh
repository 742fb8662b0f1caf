#!/usr/bin/env bash
# MegaBlocks for the `megablocks` MoE backend, against the torch already installed (any CUDA build).
#
# `pip install 'scalesparse[gpu]'` is right only for torch 2.7.0 with a CUDA 12 toolkit: megablocks
# 0.10.0 pins torch==2.7.0 (pip would replace a newer torch) and numpy<2.1. With another torch, or
# CUDA 13 (whose CUB 3 dropped DeviceScan's `debug_synchronous` argument, which megablocks'
# csrc/cumsum.h still passes: the build fails there), build from source without its pins:
#   scripts/install_megablocks.sh              fetch (network), patch, build into this Python
#   scripts/install_megablocks.sh fetch DIR    only fetch and patch the sources into DIR
#   scripts/install_megablocks.sh build DIR [pip args, e.g. --target T]   build fetched sources
# Builds need nvcc and take minutes (about 150 s for megablocks on 16 cores, reported on an H200
# with CUDA 13); TORCH_CUDA_ARCH_LIST (e.g. 9.0 for Hopper) limits them to your GPU.
# grouped_gemm 0.3.0 builds unchanged; stanford-stk 0.7.1 is imported by megablocks (its `sparse`
# MLP, which refuses triton >= 3.2, is not what scalesparse uses).
set -euo pipefail
PY=${PY:-python3}

fetch() {  # DIR
  local dir=$1 url
  mkdir -p "$dir"
  "$PY" -m pip download -q --no-deps -d "$dir" stanford-stk==0.7.1
  for spec in grouped-gemm:0.3.0 megablocks:0.10.0; do
    local name=${spec%%:*} version=${spec##*:} file
    file=${name//-/_}-$version.tar.gz
    # straight from the index: pip's own download would run setup.py, which needs CUDA
    url=$(curl -fsSL "https://pypi.org/simple/$name/" | grep -o "https://[^\"]*/$file#sha256=[0-9a-f]*" | head -1)
    [ -n "$url" ] || { echo "install_megablocks: no $file on the index" >&2; exit 1; }
    curl -fsSL -o "$dir/$file" "${url%%#*}"
    echo "${url##*sha256=}  $dir/$file" | sha256sum -c --quiet
  done
  tar -xzf "$dir/megablocks-0.10.0.tar.gz" -C "$dir" && rm "$dir/megablocks-0.10.0.tar.gz"
  # harmless with CUDA 12 (the argument was deprecated there), required with CUDA 13
  perl -0pi -e 's/,\s*bool debug_synchronous = false\)/)/g; s/,\s*debug_synchronous\)\)/))/g' \
    "$dir/megablocks-0.10.0/csrc/cumsum.h"
  if grep -q debug_synchronous "$dir/megablocks-0.10.0/csrc/cumsum.h"; then
    echo "install_megablocks: csrc/cumsum.h still passes debug_synchronous; patch it by hand" >&2; exit 1
  fi
}

build() {  # DIR [pip args...]
  local dir=$1; shift
  # --no-deps: keep this torch and numpy; --no-build-isolation: compile against this torch
  "$PY" -m pip install --no-index --no-deps --no-build-isolation --no-cache-dir "$@" \
    "$dir"/stanford_stk-0.7.1.tar.gz "$dir"/grouped_gemm-0.3.0.tar.gz "$dir"/megablocks-0.10.0
}

case "${1:-all}" in
  fetch) fetch "$2" ;;
  build) dir=$2; shift 2; build "$dir" "$@" ;;
  all) tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT; fetch "$tmp"; build "$tmp"
       "$PY" -c 'from megablocks import ops, grouped_gemm_util as gg; assert gg.grouped_gemm_is_available(); print("megablocks ok")' ;;
  *) echo "usage: $0 [fetch DIR | build DIR [pip args]]" >&2; exit 2 ;;
esac
