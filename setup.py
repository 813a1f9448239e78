"""jaxlab's dependencies, with the version ranges we test against (and extras).

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
    python_requires=">=3.10",
    # Nothing to install but the dependencies (see the docstring).
    py_modules=[],
    packages=[],
    install_requires=[
        "jax>=0.10.2,<0.11",
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
        "tqdm>=4.60",  # prepare_data.py's progress bar
        "matplotlib>=3.8",
        # serve.py: an ASGI app (FastAPI) on a production server (uvicorn).
        "fastapi>=0.110,<1",
        "uvicorn>=0.30,<1",
        # tools/hf/ reads and writes Hugging Face checkpoints with NumPy (no PyTorch).
        "safetensors>=0.4,<1",
        "numpy>=1.26",
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "ruff>=0.6",
            "scikit-learn>=1.4",
            "httpx>=0.27",  # tests/scripts call serve.py's HTTP API
            "wandb>=0.17",  # tests/test_tracking.py logs in offline mode (optional for users)
            # libtpu at the matching version: tools/aot.py compiles for TPU topologies on any
            # machine (tests/test_aot.py); the range is install_requires' jax range.
            "jax[tpu]>=0.10.2,<0.11",
        ],
    },
)
