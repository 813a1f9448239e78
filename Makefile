# One-command set-up, training and testing. Every target is idempotent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/fashion_mnist_mlp.py
WORKDIR ?= runs/default
# Multi-device tests simulate 8 CPU devices in their own subprocesses; pytest itself runs on 2 workers.
PYTEST_ARGS ?= -n 2

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

test: setup lint
	$(PY) -m pytest $(PYTEST_ARGS) tests

# PyTorch, in its own environment, only for scripts/compare_nanogpt.py's nanoGPT baseline.
# torch==2.13.0 is a CPU build on this machine's disk; elsewhere add
# --index-url https://download.pytorch.org/whl/cpu to avoid a multi-GB CUDA build.
torch-env: .venv-torch/.installed
.venv-torch/.installed:
	test -x .venv-torch/bin/python || $(PYTHON) -m venv .venv-torch
	.venv-torch/bin/python -m pip install -q numpy torch==2.13.0
	touch $@

clean:
	rm -rf $(VENV) .venv-torch .data runs
