# Two entry points: `make demo` (the main job) and `make test` (the whole suite).
# Both create or reuse .venv and install only what is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The stamp names a hash of the files that declare dependencies: editing them re-runs the install.
DEPS_HASH := $(shell cat setup.cfg pyproject.toml Makefile 2>/dev/null | md5sum | cut -c1-12)
STAMP := $(VENV)/.installed-$(DEPS_HASH)
# Without an NVIDIA driver, pin the CPU build of torch so that pip never pulls a multi-GB CUDA build.
TORCH_SPEC := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.4" || echo "torch==2.13.0")
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup demo test lint system-deps clean gpu-check

setup: $(STAMP) system-deps

$(STAMP): setup.cfg pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check --upgrade pip "setuptools>=64" wheel
	@$(PY) -m pip show torch >/dev/null 2>&1 || $(PY) -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	@$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	@rm -f $(VENV)/.installed-*; touch $@
	@echo "effnetv2: environment ready in $(VENV)"

system-deps:
	@if [ ! -f $(FMNIST) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "effnetv2: installing Debian package dataset-fashion-mnist"; \
	    apt-get install -y -q dataset-fashion-mnist >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }; \
	  else \
	    echo "effnetv2: Fashion-MNIST is missing. Install it with: sudo apt-get install dataset-fashion-mnist"; \
	  fi; \
	fi

demo: setup
	@$(VENV)/bin/effnetv2 train demo $(ARGS)

lint: $(STAMP)
	@$(VENV)/bin/ruff check .

test: setup lint
	@$(PY) -m pytest $(PYTEST_ARGS)

# The prepared GPU check (bench/gpu-check.sh --help; bench/RESULTS.md): GPU tests and benchmarks in one
# command. No setup: a GPU machine has its own torch and may have no registry. ARGS=--cpu-smoke tests it here.
gpu-check:
	@bash bench/gpu-check.sh $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
