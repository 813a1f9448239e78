"""Multi-layer perceptron classifier (the Keras 784-128-64-10 starting point)."""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
from flax import linen as nn

from models import layers
from models.preprocessing import pixels_to_unit_range

# Alternate column- and row-parallel layers (Megatron style): odd layers shard their outputs over
# `mlp` (tensor axis), even layers their inputs, so tensor parallelism needs no extra all-gathers.
_KERNEL_AXES = (("embed", "mlp"), ("mlp", "embed"))


class MLP(nn.Module):
    """Flattens its input and applies Dense+ReLU layers, then a linear classifier head."""

    features: Sequence[int] = (128, 64)
    num_classes: int = 10
    dropout_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = pixels_to_unit_range(x.reshape((x.shape[0], -1)), self.dtype)
        x = nn.with_logical_constraint(x, ("batch", "embed"))
        for i, width in enumerate(self.features):
            axes = _KERNEL_AXES[i % 2]
            x = layers.dense(width, axes, self.dtype, f"dense_{i}")(x)
            x = nn.relu(x)
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        last_axis = _KERNEL_AXES[(len(self.features) - 1) % 2][1] if self.features else "embed"
        logits = layers.dense(self.num_classes, (last_axis, "classes"), self.dtype, "head")(x)
        return logits.astype(jnp.float32)


# The registry (models/__init__.py) finds this file by its name: config.model.name = "mlp".
Model = MLP
TASK = "classification"
