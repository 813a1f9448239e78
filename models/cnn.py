"""Convolutional classifier: the Keras small CNN by default, deeper VGG-style stacks by config."""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
from flax import linen as nn


def _conv_init():
    return nn.with_logical_partitioning(
        nn.linear.default_kernel_init, ("conv_h", "conv_w", "embed", "mlp")
    )


class CNN(nn.Module):
    """Conv blocks (each `convs_per_block` 3x3 convs + 2x2 max-pool), then dense layers and a head.

    The default (one block of one 32-filter conv, dense 128, dense 10) is the Keras small CNN.
    `batch_norm=True` adds BatchNorm after each conv; its statistics live in `batch_stats`.
    """

    conv_features: Sequence[int] = (32,)
    convs_per_block: int = 1
    dense_features: Sequence[int] = (128,)
    num_classes: int = 10
    dropout_rate: float = 0.0
    batch_norm: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = x.astype(self.dtype)
        if x.ndim == 3:  # (batch, height, width) -> add a channel axis
            x = x[..., None]
        x = nn.with_logical_constraint(x, ("batch", None, None, None))
        for block, width in enumerate(self.conv_features):
            for j in range(self.convs_per_block):
                x = nn.Conv(
                    width,
                    (3, 3),
                    padding="SAME" if self.convs_per_block > 1 else "VALID",
                    dtype=self.dtype,
                    use_bias=not self.batch_norm,
                    kernel_init=_conv_init(),
                    name=f"conv_{block}_{j}",
                )(x)
                if self.batch_norm:
                    x = nn.BatchNorm(
                        use_running_average=not train,
                        momentum=0.9,
                        dtype=self.dtype,
                        name=f"bn_{block}_{j}",
                    )(x)
                x = nn.relu(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
            x = nn.Dropout(self.dropout_rate / 2, deterministic=not train)(x)
        x = x.reshape((x.shape[0], -1))
        for i, width in enumerate(self.dense_features):
            x = nn.Dense(
                width,
                dtype=self.dtype,
                kernel_init=nn.with_logical_partitioning(
                    nn.linear.default_kernel_init, ("embed", "mlp")
                ),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
                name=f"dense_{i}",
            )(x)
            x = nn.relu(x)
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        logits = nn.Dense(
            self.num_classes,
            dtype=self.dtype,
            kernel_init=nn.with_logical_partitioning(
                nn.linear.default_kernel_init, ("mlp", "classes")
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("classes",)),
            name="head",
        )(x)
        return logits.astype(jnp.float32)
