"""jaxlab's dependencies: the version ranges it runs on, and extras for accelerators and tests.

The declared ranges admit every version jaxlab is tested on: jax 0.11.2 (the floor, tested without
TensorFlow on the language-model path) up to the pins in `constraints.txt` (the tested default,
which `make` installs with `pip install -c constraints.txt`). Extras:
  cuda  JAX's CUDA 13 plugin (NVIDIA GPUs): `pip install -c constraints.txt -e '.[cuda]'`
  tpu   libtpu (TPU VMs):                     `pip install -c constraints.txt -e '.[tpu]'`
  eval  EleutherAI's lm-eval (with its API models) for tools/lm_eval.py and lm-eval's
        local-completions against serve.py, and the openai client: `pip install -c
        constraints.txt -e '.[eval]'`
  dev   tests and linting, plus libtpu for compiling TPU programs on any machine (tools/aot.py),
        and the eval extra's packages with LangChain's OpenAI client (tests/test_lm_eval.py,
        tests/test_openai_api.py)

jaxlab is run from the repository root (`python train.py ...`, `python -m tools.bench ...`),
as Flax's examples are, so installing it adds dependencies only: no top-level module of ours
(`train`, `evaluate`, `distributed`, ...) lands in site-packages, where it could shadow another
package of the same name (Dask's `distributed`, Hugging Face's `evaluate`).
"""

from setuptools import setup

setup(
    name="jaxlab",
    version="0.1.0",
    description="A JAX/Flax research codebase for scalable models.",
    python_requires=">=3.12",  # JAX 0.11 dropped Python 3.11
    # Nothing to install but the dependencies (see the docstring).
    py_modules=[],
    packages=[],
    install_requires=[
        "jax>=0.11.2,<0.13",
        "jaxlib>=0.11.2,<0.13",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "tensorflow-cpu>=2.21,<2.22",
        "tensorflow-datasets>=4.9.10,<4.10",
        "absl-py>=2.1",
        "ml-collections>=1.0",
        # Not pulled in by the above but needed: TensorBoard summaries, TFDS builders.
        "tensorboard>=2.20",
        "importlib_resources>=6",
        "sentencepiece>=0.2",
        "tokenizers>=0.20,<1",  # byte-level BPE (Hugging Face)
        "tqdm>=4.60",  # data/prepare.py's progress bar
        "matplotlib>=3.8",
        # serve.py: an ASGI app (FastAPI) on a production server (uvicorn).
        "fastapi>=0.110,<1",
        "uvicorn>=0.30,<1",
        "jinja2>=3.1",  # /v1/chat/completions renders a run's chat template (serving/chat.py)
        # hf/ reads and writes Hugging Face checkpoints with NumPy (no PyTorch).
        "safetensors>=0.4,<1",
        # jax.export's serialization (tools/export.py, scripts/gpu_check.py) needs it; jax does
        # not declare it, and only TensorFlow brings it in otherwise.
        "flatbuffers>=24",
        "numpy>=1.26",
    ],
    extras_require={
        # The plugin that matches the installed jax (CUDA 13, as current NVIDIA drivers ship).
        "cuda": ["jax[cuda13]>=0.11.2,<0.13"],
        # A TPU VM: jax with the libtpu it was built against.
        "tpu": ["jax[tpu]>=0.11.2,<0.13"],
        # lm-eval's core needs no PyTorch; [api] adds what local-completions needs.
        "eval": ["lm-eval[api]>=0.4.9,<0.5", "openai>=1.40"],
        "dev": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "ruff>=0.6",
            "scikit-learn>=1.4",
            "httpx>=0.27",  # tests/scripts call serve.py's HTTP API
            "wandb>=0.17",  # tests/test_tracking.py logs in offline mode (optional for users)
            # the eval extra, and LangChain's OpenAI client (tests/test_openai_api.py)
            "lm-eval[api]>=0.4.9,<0.5",
            "openai>=1.40",
            "langchain-openai>=0.3",
            # libtpu at the matching version: tools/aot.py compiles for TPU topologies on any
            # machine (tests/test_aot.py). Without constraints.txt, a jax whose libtpu the index
            # lacks makes pip fall back quietly to an older jax; the pins avoid that.
            "jax[tpu]>=0.11.2,<0.13",
        ],
    },
)
