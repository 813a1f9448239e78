"""Model registry: a config names its model family in `config.model.name`; the rest are kwargs."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from models.cnn import CNN
from models.gpt import GPT
from models.mlp import MLP

MODELS: dict[str, type[nn.Module]] = {"mlp": MLP, "cnn": CNN, "gpt": GPT}


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
    """Instantiates `config.model` with the run's compute dtype (`config.dtype`)."""
    kwargs = dict(config.model)
    name = kwargs.pop("name")
    if name not in MODELS:
        raise ValueError(
            f"config.model.name={name!r} is not a known model; choose one of {sorted(MODELS)} "
            "or register a new one in models/__init__.py."
        )
    return MODELS[name](dtype=jnp.dtype(config.get("dtype", "float32")), **kwargs)
