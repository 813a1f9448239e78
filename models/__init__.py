"""Model registry by file name: `config.model.name = "gpt"` is the model in `models/gpt.py`.

A model file is self-describing (as in big_vision): it defines its Linen module, names it
`Model = MyModule` at module level, and says which task it serves with `TASK = "classification"`
(inputs [batch, ...] -> logits [batch, classes]) or `TASK = "lm"` (int32 tokens [batch, length]
-> logits [batch, length, vocab]). The remaining `config.model` fields are the module's
constructor arguments. Adding a model is one new file here and one config; nothing else changes.

Contracts a task places on the module's fields (checked by config_validation before compiling):
- every model: a `dtype` field (the compute dtype, from `config.dtype`);
- "lm": `vocab_size` (set from the tokenizer) and `block_size` (the context length); a
  `decode` field enables cached sampling (sampling.py).
Optional: a module-level `training_flops_per_token(model, seq_len)` gives the analytic FLOPs the
benchmark's MFU uses (otherwise it counts the traced matmuls); a `check_fields()` method raises
`ModelConfigError` for a field value the module cannot use, and config_validation calls it on
the configured module before anything compiles (so a bad field is one `ERROR:` line, without
the model depending on the command-line code).

Optional, for training: during a forward pass with `train=True` a model may `sow` float32
scalars into the collections LOSSES (terms steps.train_step adds to the objective: summed over
where they are sown, logged under their names) and METRICS (logged, averaged over where they are
sown), and arrays into PARAM_UPDATES (additive updates, outside the gradient, that train_step
applies after the optimizer step to the parameter of the same path and name, e.g. the routing
bias of models/moe.py). A model must not sow while it is initialised (`self.is_initializing()`).

A file here that defines no `Model` is a helper of the model files, not a model (layers.py,
preprocessing.py, gpt_flops.py, attention.py, moe.py).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import types

import jax.numpy as jnp
import ml_collections
from flax import linen as nn

TASKS = ("classification", "lm")
# Fields each task needs its module to have (besides `dtype`, which every model needs).
TASK_FIELDS = {"classification": (), "lm": ("vocab_size", "block_size")}

# The collections a model may sow into for steps.train_step (the docstring).
LOSSES, METRICS, PARAM_UPDATES = "losses", "metrics", "param_updates"

_HERE = os.path.dirname(os.path.abspath(__file__))


class UnknownModelError(ValueError):
    """config.model.name names no model file, or the file does not define a model."""


class ModelConfigError(ValueError):
    """A model field has a value the module cannot use; the message names the field and the fix
    in one line. Raised by a model's `check_fields()` (and its forward pass); config_validation
    reports it as a ConfigError."""


def _files() -> list[str]:
    return sorted(n[:-3] for n in os.listdir(_HERE) if n.endswith(".py") and n[0] != "_")


@functools.cache
def available_models() -> list[str]:
    """Names of the model files in this folder: those that define `Model` (helper files such
    as preprocessing.py and layers.py define none)."""
    return [n for n in _files() if hasattr(importlib.import_module(f"models.{n}"), "Model")]


@functools.cache
def model_module(name: str) -> types.ModuleType:
    """The module `models/<name>.py`, checked to define `Model` (a Linen module) and `TASK`.

    Raises UnknownModelError naming the available models, or what the file lacks."""
    if not isinstance(name, str) or name not in _files():
        raise UnknownModelError(
            f"config.model.name={name!r} is not a model file in models/; choose one of "
            f"{available_models()} or add models/{name}.py."
        )
    module = importlib.import_module(f"models.{name}")
    model = getattr(module, "Model", None)
    if not (isinstance(model, type) and issubclass(model, nn.Module)):
        raise UnknownModelError(
            f"models/{name}.py defines no `Model = <its Linen module class>` at module level."
        )
    task = getattr(module, "TASK", None)
    if task not in TASKS:
        raise UnknownModelError(f"models/{name}.py must set TASK to one of {TASKS}, got {task!r}.")
    return module


def model_class(name: str) -> type[nn.Module]:
    """The Linen module class of `models/<name>.py`."""
    return model_module(name).Model


def model_task(name: str) -> str:
    """'classification' or 'lm': the task `models/<name>.py` declares."""
    return model_module(name).TASK


def constructor_fields(name: str) -> set[str]:
    """The module's dataclass fields a config may set (Flax's own `parent` and `name` excluded)."""
    return {f.name for f in dataclasses.fields(model_class(name))} - {"parent", "name"}


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
    """Instantiates `config.model` with the run's compute dtype (`config.dtype`)."""
    kwargs = dict(config.model)
    name = kwargs.pop("name")
    return model_class(name)(dtype=jnp.dtype(config.get("dtype", "float32")), **kwargs)
