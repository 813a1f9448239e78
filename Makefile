# One-command set-up, training and testing. Every target is idempotent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/fashion_mnist_mlp.py
WORKDIR ?= runs/default
# Multi-device tests simulate 8 CPU devices in their own subprocesses; pytest itself runs on 2 workers
# and lists the 25 slowest tests (the suite should stay under about 20 minutes on 2 cores).
PYTEST_ARGS ?= -n 2 --durations=25

.PHONY: setup venv data train test lint format clean torch-env

setup: venv data

venv: $(VENV)/.installed
$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

data: $(VENV)/.installed
	bash scripts/install_system_data.sh
	$(PY) data_setup.py

train: setup
	$(PY) train.py --config=$(CONFIG) --workdir=$(WORKDIR)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: setup lint torch-env
	$(PY) -m pytest $(PYTEST_ARGS) tests

# PyTorch and Hugging Face transformers, in their own environment and only as references:
# scripts/compare_nanogpt.py's nanoGPT baseline and tests/hf_reference.py (run by
# tests/test_hf_convert.py in a subprocess). Nothing that trains or samples imports them.
# torch==2.13.0 is a CPU build on this machine's disk; elsewhere add
# --index-url https://download.pytorch.org/whl/cpu to avoid a multi-GB CUDA build.
TORCH_ENV_PACKAGES := numpy torch==2.13.0 'transformers>=5,<6'
torch-env: .venv-torch/.installed
.venv-torch/.installed: Makefile
	test -x .venv-torch/bin/python || $(PYTHON) -m venv .venv-torch
	.venv-torch/bin/python -m pip install -q $(TORCH_ENV_PACKAGES)
	touch $@

clean:
	rm -rf $(VENV) .venv-torch .data runs
