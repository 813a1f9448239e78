# One-command set-up, training and testing. Every target is idempotent.
# .venv's interpreter: Python >= 3.12, found by scripts/find_python.sh (PYTHON=... to choose one).
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/fashion_mnist_mlp.py
WORKDIR ?= runs/default
# Multi-device tests simulate 8 CPU devices in their own subprocesses; pytest itself runs on 2 workers
# and lists the 25 slowest tests (the suite should stay under about 20 minutes on 2 cores).
PYTEST_ARGS ?= -n 2 --durations=25

.PHONY: setup venv data train test test-fast test-floor lint format clean torch-env floor-env

setup: venv data

# The tested default: setup.py's dependencies at constraints.txt's pins. A .venv made by an older
# Python (before jaxlab needed 3.12) is made anew.
venv: $(VENV)/.installed
$(VENV)/.installed: setup.py constraints.txt
	@python="$$(scripts/find_python.sh)" || exit 1; \
	if [ -x $(PY) ] && ! $(PY) -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then \
		echo "Replacing $(VENV) (made by $$($(PY) --version)) with one made by $$python."; \
		rm -rf $(VENV); \
	fi; \
	test -x $(PY) || "$$python" -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

data: $(VENV)/.installed
	bash scripts/install_system_data.sh
	$(PY) -m data

train: setup
	$(PY) train.py --config=$(CONFIG) --workdir=$(WORKDIR)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: setup lint torch-env floor-env
	$(PY) -m pytest $(PYTEST_ARGS) tests
	$(MAKE) --no-print-directory test-floor

# A minute's check while iterating: lint, the house's shape (no import cycle, the root's modules,
# module length), data preparation and tokenizers. `make test` is what CI runs.
FAST_TESTS := tests/test_project_layout.py tests/test_data_setup.py tests/test_prepare_data.py \
	tests/test_tokenizers.py tests/test_detokenizer.py
test-fast: setup lint
	$(PY) -m pytest $(PYTEST_ARGS) $(FAST_TESTS) -k "not new_model and not readme"

# The floor: the versions of a typical GPU image (Python 3.12, jax/jaxlib 0.11.2, no TensorFlow,
# no TFDS). The language-model path and the GPU check's dry run are tested on it, so what must run
# on such a machine is tested on its versions before it meets a GPU. FLOOR_TESTS are the test
# files of that path; tests/test_environment.py checks the environment is what it claims.
FLOOR := .venv-floor
FLOOR_PACKAGES := jax==0.11.2 jaxlib==0.11.2 flax optax orbax-checkpoint ml-collections absl-py \
	numpy sentencepiece tokenizers safetensors tensorboard tqdm flatbuffers pytest pytest-xdist
FLOOR_TESTS := tests/test_environment.py tests/test_gpt.py tests/test_sampling.py tests/test_gpu_check.py \
	tests/test_prepare_data.py tests/test_tokenizers.py tests/test_synthetic.py
floor-env: $(FLOOR)/.installed
$(FLOOR)/.installed: Makefile constraints.txt
	@python="$$(scripts/find_python.sh)" || exit 1; test -x $(FLOOR)/bin/python || "$$python" -m venv $(FLOOR)
	$(FLOOR)/bin/python -m pip install -q --upgrade pip
	$(FLOOR)/bin/python -m pip install -q $(FLOOR_PACKAGES)
	touch $@

test-floor: floor-env data
	JAXLAB_FLOOR_ENV=1 $(FLOOR)/bin/python -m pytest $(PYTEST_ARGS) $(FLOOR_TESTS)

# PyTorch and Hugging Face transformers, in their own environment and only as references:
# scripts/compare_nanogpt.py's nanoGPT baseline, tests/hf_reference.py (run by
# tests/test_hf_convert.py in a subprocess) and lm-eval's `hf` backend (tests/test_lm_eval.py
# scores the same model both ways). Nothing that trains or samples imports them.
# torch==2.13.0 is a CPU build on this machine's disk; elsewhere add
# --index-url https://download.pytorch.org/whl/cpu to avoid a multi-GB CUDA build.
# It keeps the interpreter that wheel was built for (the system's python3).
TORCH_ENV_PACKAGES := numpy torch==2.13.0 'transformers>=5,<6' 'lm-eval[hf]==0.4.13'
TORCH_PYTHON ?= python3
torch-env: .venv-torch/.installed
.venv-torch/.installed: Makefile
	test -x .venv-torch/bin/python || $(TORCH_PYTHON) -m venv .venv-torch
	.venv-torch/bin/python -m pip install -q $(TORCH_ENV_PACKAGES)
	touch $@

clean:
	rm -rf $(VENV) $(FLOOR) .venv-torch .data runs
