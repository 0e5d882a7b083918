# dfn4lab: `make lab` (set up, open JupyterLab) and `make test` (set up, run every test).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# MLX's Linux backend (a pip extra of ours): cuda where nvidia-smi sees a GPU, else cpu. Choose with
# `make lab MLX_BACKEND=cpu`; switching reinstalls (the two write the same files, so the other one
# is removed first). macOS ignores it (MLX brings Metal there).
MLX_BACKEND ?= $(shell nvidia-smi -L 2>/dev/null | grep -q '^GPU' && echo cuda || echo cpu)
STAMP := $(VENV)/.installed-$(MLX_BACKEND)
CONSTRAINTS := .ci/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: lab run test setup system install kernels ipykernel data lint unit notebooks lock clean info

lab: setup
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks

# Every notebook in full mode (12 min here once notebook 04's runs exist; figures/, data/runs, data/eval), the benchmarks, then
# README's result tables (python -m dfn4lab.report).
run: setup
	$(PY) -m pytest -q --nbmake --nbmake-timeout=7200 --durations=0 notebooks
	$(PY) -m dfn4lab.bench enhance
	$(PY) -m dfn4lab.bench stream
	$(PY) -m dfn4lab.report README.md

test: setup lint unit notebooks

setup: system install kernels ipykernel data

# The demo corpus's speech and noise (see dfn4lab/data/sources.py); it builds from whatever is present.
CORPUS_PKGS := espeak-ng festival festvox-us-slt-hts klettres-data ktuberling-data \
  asterisk-core-sounds-en-wav sonic-pi-samples minetest-data

# Debian as root: an optimized BLAS for MLX, a C++ compiler for dfn4lab/kernels, alsa-utils' spoken
# prompts (real speech for tests and benchmarks), Chromium for the browser test (Playwright drives it;
# it never downloads a browser).
# Elsewhere this is skipped: MLX binds MKL from PyPI (Linux x86_64) or Accelerate (macOS), and the
# tests that need these say so and skip.
system:
	@if [ "$$(uname)" = Linux ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  pkgs=""; for p in libopenblas0-pthread g++ alsa-utils chromium $(CORPUS_PKGS); do \
	    dpkg -s $$p >/dev/null 2>&1 || pkgs="$$pkgs $$p"; done; \
	  if [ -n "$$pkgs" ]; then (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$pkgs; fi; \
	else echo "make system: not Debian as root; skipping system packages"; fi

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(not (3, 11, 5) <= sys.version_info[:3] < (3, 13))' 2>/dev/null || { \
	  echo "dfn4lab needs Python 3.11.5 to 3.12; $(PYTHON) is $$($(PYTHON) --version 2>&1 || echo missing)."; \
	  echo "Run with another one, e.g. make test PYTHON=python3.12"; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml $(CONSTRAINTS) | $(PY)
	@case "$(MLX_BACKEND)" in cpu|cuda) ;; *) echo "MLX_BACKEND must be cpu or cuda, not '$(MLX_BACKEND)'"; exit 1;; esac
	$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip uninstall -q -y $(if $(filter cuda,$(MLX_BACKEND)),mlx-cpu,mlx-cuda-12) 2>/dev/null || true
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[test,kernels,$(MLX_BACKEND)]"
	rm -f $(VENV)/.installed*
	touch $(STAMP)

install: $(STAMP)

# dfn4lab's C++ CPU kernels (python -m dfn4lab.kernels, ~20 s): optional at run time, so a failed build
# says so and the pure-MLX loops run instead; the unit tests require them on Linux, where CI runs.
KERNELS := $(VENV)/.kernels
kernels: $(KERNELS)

$(KERNELS): $(STAMP) $(wildcard dfn4lab/kernels/*.cpp dfn4lab/kernels/*.h) dfn4lab/kernels/CMakeLists.txt dfn4lab/kernels/__main__.py
	@$(PY) -m dfn4lab.kernels && touch $@ || true

ipykernel: install
	@$(PY) -m ipykernel install --sys-prefix --name dfn4lab --display-name "dfn4lab (.venv)" >/dev/null

# The demo corpus in data/demo (python -m dfn4lab.data.demo): built once, in well under a minute, from
# the packages `make system` installs; sources that are missing are skipped and named.
data: install
	@$(PY) -m dfn4lab.data.demo --out data/demo

lint: install
	$(VENV)/bin/ruff check dfn4lab tests notebooks
	$(VENV)/bin/ruff format --check dfn4lab tests

# pytest exits 5 when it collects nothing: that is a failure here, never a silent pass.
unit: install
	$(PY) -m pytest -q tests; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

notebooks: install
	@if ls notebooks/*.ipynb >/dev/null 2>&1; then \
	  DFN4LAB_QUICK=1 $(PY) -m pytest -q --nbmake --durations=0 notebooks; \
	else echo "no notebooks yet"; fi

info: install
	$(PY) -m dfn4lab info

# Record the exact versions installed, for reproducible set-ups (`make lock` after changing deps).
lock: install
	$(PY) -m pip freeze --exclude-editable | sed -E 's/\+cpu$$//' | grep -v '^-e' > $(CONSTRAINTS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
