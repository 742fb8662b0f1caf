# `make test` and `make demo` create or refresh .venv first (torch before everything else, so no
# dependency can pull a CUDA build). GPU users: make TORCH_SPEC='torch==2.7.0' (their CUDA build).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PIP_FLAGS ?= -q --disable-pip-version-check
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
DEMO_DIR ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)

export HF_HUB_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: venv system-deps test test-quick gpu-test gpu-rehearsal megablocks demo lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) "$(TORCH_SPEC)"
	$(PY) -m pip install $(PIP_FLAGS) -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

# Debian's chromium renders `scalesparse report` pages for the report screenshot test (a slow test).
# As root it is installed here; otherwise one line says what to install.
system-deps:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  if [ "$$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then \
	    echo "make: installing Debian's chromium (the report screenshot test needs it)"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	  else \
	    echo "make: the test suite needs Chromium (report screenshot test); install it first: sudo apt-get install chromium" >&2; \
	    exit 1; \
	  fi; }

test: $(STAMP) system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

test-quick: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# The CUDA tests alone (on a GPU machine, with TORCH_SPEC set to its CUDA build); they skip without CUDA.
gpu-test: $(STAMP)
	$(PY) -m pytest -m gpu -rs $(PYTEST_ARGS)

# The GPU session (scripts/gpu_session.sh) rehearsed on this CPU machine, in a Python like the GPU
# image's: the carried wheels installed as there, the training cases run, the benchmarks' CPU modes
# (docs/gpu-session.md). CI runs it, so the one GPU run cannot rot unseen.
gpu-rehearsal: $(STAMP)
	PY=$(PY) scripts/gpu_prepare.sh
	rm -rf out/gpu-rehearsal
	REHEARSE=1 OUT=out/gpu-rehearsal scripts/gpu_session.sh

# MegaBlocks built against the torch in .venv (any CUDA build; patched for CUDA 13): see the README.
megablocks: $(STAMP)
	PY=$(PY) scripts/install_megablocks.sh

demo: $(STAMP)
	$(VENV)/bin/scalesparse train configs/tiny.yaml --set run_dir=$(DEMO_DIR)

lint: $(STAMP)
	$(VENV)/bin/ruff check scalesparse tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .venv-gpu-rehearsal out/gpu-rehearsal
