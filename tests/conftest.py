"""Shared pytest fixtures: tiny configs and the prepared offline data."""

from __future__ import annotations

import os
import re
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from runtime import cli  # noqa: E402

cli.quiet_libtpu_without_tpu()  # before any test starts JAX's backends (subprocesses inherit it)


def _project_modules() -> list[str]:
    """Dotted names of every module of the project (not tests), e.g. 'train', 'models.gpt'."""
    names = []
    for root, dirs, files in os.walk(REPO):
        rel = os.path.relpath(root, REPO)
        dirs[:] = [d for d in dirs if not d.startswith((".", "_")) and d not in ("tests", "runs")]
        if rel != "." and not os.path.exists(os.path.join(root, "__init__.py")):
            dirs[:] = []
            continue
        package = [] if rel == "." else rel.split(os.sep)
        names += [".".join(package + [f[:-3]]) for f in files if f.endswith(".py")]
    return sorted(n.removesuffix(".__init__") for n in names)


# An API deprecated by JAX (or any library) and called from jaxlab's own code fails the test
# that calls it, here and in the scripts tests start (`__main__`), so that the code keeps running
# on the next JAX release, which removes what this one deprecates.
# The warning's module is the caller's: libraries' own internal deprecations do not count.
DEPRECATION_CATEGORIES = ("DeprecationWarning", "FutureWarning")
_CALLERS = ["__main__", *_project_modules(), "conftest", "sharded_driver"]
# For subprocesses: Python escapes each module name and matches it whole. (Not passed to
# .venv-torch's reference scripts: PyTorch's deprecations are not ours.)
_OURS = [f"error::{c}:{module}" for c in DEPRECATION_CATEGORIES for module in _CALLERS]
# Idempotent: xdist workers and the scripts that import conftest inherit the variable already set.
_KEPT = [w for w in os.environ.get("PYTHONWARNINGS", "").split(",") if w and w not in _OURS]
os.environ["PYTHONWARNINGS"] = ",".join(_KEPT + _OURS)


def pytest_configure(config: pytest.Config) -> None:
    """In-process, the same rule as a pytest filter (a regex, matched whole) that also covers
    the test modules."""
    names = "|".join(re.escape(m) for m in _CALLERS)
    callers = rf"({names}|tests(\.\w+)*|test_\w+)\Z"  # no "(?:": the filter splits on ':'
    # pytest shows other deprecations unless sys.warnoptions is set, as PYTHONWARNINGS sets it
    # for xdist's workers: keep them shown (later filters take precedence over these).
    for category in ("DeprecationWarning", "PendingDeprecationWarning"):
        config.addinivalue_line("filterwarnings", f"always::{category}")
    for category in DEPRECATION_CATEGORIES:
        config.addinivalue_line("filterwarnings", f"error::{category}:{callers}")


@pytest.fixture(scope="session")
def fashion_mnist_ready() -> str:
    """Prepares Fashion-MNIST in the default data dir once per session; returns the dir."""
    from data import sources

    data_dir = sources.default_data_dir()
    sources.prepare_fashion_mnist(data_dir)
    return data_dir


@pytest.fixture
def tiny_mlp_config(fashion_mnist_ready):
    """The default MLP config shrunk to a few steps (seconds on a CPU)."""
    from configs import fashion_mnist_mlp

    config = fashion_mnist_mlp.get_config()
    config.num_train_steps = 20
    config.batch_size = 32
    config.warmup_steps = 2
    config.eval_batch_size = 1000
    config.log_every_steps = 5
    config.eval_every_steps = 1000
    config.checkpoint_every_steps = 10
    config.async_checkpointing = False
    config.steps_per_dispatch = 1  # tests step one batch at a time; test_steps_per_dispatch.py
    return config


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> str:
    """A ~20 kB deterministic text file (a made-up language of short words) for tiny LM runs."""
    import numpy as np

    rng = np.random.default_rng(0)
    words = ["the", "king", "and", "thou", "art", "my", "lord", "speak", "to", "me", "of", "love"]
    lines = [" ".join(rng.choice(words, size=8)).capitalize() + "." for _ in range(500)]
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _tiny_lm_config(corpus: str):
    """A 1-layer character GPT on `corpus`, 12 steps (seconds on a CPU)."""
    from configs import shakespeare_char_cpu

    config = shakespeare_char_cpu.get_config()
    config.dataset = corpus
    config.model.update({"num_layers": 1, "num_heads": 2, "embed_dim": 32, "block_size": 32})
    config.batch_size = 8
    config.num_train_steps = 12
    config.decay_steps = 12
    config.warmup_steps = 2
    config.log_every_steps = 4
    config.steps_per_dispatch = 1  # tests step one batch at a time; test_steps_per_dispatch.py
    config.eval_every_steps = 6
    config.eval_steps = 2
    config.eval_batch_size = 8
    config.checkpoint_every_steps = 6
    config.async_checkpointing = False
    return config


@pytest.fixture
def tiny_lm_config(tiny_corpus):
    """A 1-layer character GPT on `tiny_corpus`, 12 steps, evaluated at steps 6 and 12."""
    return _tiny_lm_config(tiny_corpus)


def _train_once(config, workdir: str) -> str:
    """Trains `config` in `workdir` and returns the workdir."""
    import train

    train.train_and_evaluate(config, workdir)
    return workdir


@pytest.fixture(scope="session")
def trained_mlp_run(fashion_mnist_ready, tmp_path_factory) -> str:
    """Workdir of a tiny MLP trained once per session (20 steps, checkpoints at 10 and 20).
    Tests may read it and add files, but must not train in it again."""
    from configs import fashion_mnist_mlp

    config = fashion_mnist_mlp.get_config()
    config.model.features = (32,)
    config.num_train_steps = 20
    config.batch_size = 32
    config.warmup_steps = 2
    config.eval_batch_size = 1000
    config.log_every_steps = 5
    config.eval_every_steps = 10
    config.checkpoint_every_steps = 10
    config.async_checkpointing = False
    return _train_once(config, str(tmp_path_factory.mktemp("mlp_run")))


@pytest.fixture(scope="session")
def trained_lm_run(tiny_corpus, tmp_path_factory) -> str:
    """Workdir of a tiny character GPT trained once per session (12 steps, evals at 6 and 12)."""
    return _train_once(_tiny_lm_config(tiny_corpus), str(tmp_path_factory.mktemp("lm_run")))
