"""Convolutional classifier: the Keras small CNN by default, deeper VGG-style stacks by config."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from models import layers
from models.preprocessing import pixels_to_unit_range


def max_pool_2x2(x: jnp.ndarray) -> jnp.ndarray:
    """2x2 max-pooling, stride 2, VALID (an odd last row/column is dropped), via a reshape:
    XLA:CPU differentiates this max far faster than reduce_window's select_and_scatter."""
    b, h, w, c = x.shape
    x = x[:, : h - h % 2, : w - w % 2, :]
    x = x.reshape(b, h // 2, 2, w // 2, 2, c)
    top = jnp.maximum(x[:, :, 0, :, 0], x[:, :, 0, :, 1])
    bottom = jnp.maximum(x[:, :, 1, :, 0], x[:, :, 1, :, 1])
    return jnp.maximum(top, bottom)


class Conv3x3(nn.Module):
    """3x3 convolution, stride 1, with the parameters of nn.Conv (kernel [3, 3, in, out], bias).

    With few input channels (a first layer) it is one matmul over the 9 shifted copies of the
    input (im2col): XLA:CPU's convolution is ~5x slower there, a [pixels, 9*in] x [9*in, out]
    matmul is not. With more channels XLA's convolution is the faster of the two.
    """

    features: int
    padding: str = "VALID"
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, pool: bool = False) -> jnp.ndarray:
        """Applies the convolution to x[batch, height, width, channels]; with `pool`, 2x2
        max-pools before adding the bias (equal, as the bias is constant per channel)."""
        if self.padding not in ("SAME", "VALID"):
            raise ValueError(f"padding={self.padding!r}: use 'SAME' or 'VALID'.")
        cin = x.shape[-1]
        kernel = self.param("kernel", _conv_init(), (3, 3, cin, self.features))
        if self.padding == "SAME":
            x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if cin < 8:
            b, h, w = x.shape[0], x.shape[1] - 2, x.shape[2] - 2
            patches = jnp.concatenate(
                [x[:, i : i + h, j : j + w, :] for i in range(3) for j in range(3)], axis=-1
            )
            y = patches.reshape(b * h * w, 9 * cin) @ kernel.reshape(9 * cin, self.features)
            y = y.reshape(b, h, w, self.features)
        else:  # enough input channels for XLA's convolution to be efficient
            y = jax.lax.conv_general_dilated(
                x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
        if pool:
            y = max_pool_2x2(y)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,))  # as nn.Conv's
            y = y + bias.astype(self.dtype)
        return y


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
    # None: 'SAME' with several convs per block (VGG), 'VALID' with one (the Keras CNN).
    padding: str | None = None
    dense_features: Sequence[int] = (128,)
    num_classes: int = 10
    dropout_rate: float = 0.0
    batch_norm: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = pixels_to_unit_range(x, self.dtype)
        if x.ndim == 3:  # (batch, height, width) -> add a channel axis
            x = x[..., None]
        x = nn.with_logical_constraint(x, ("batch", None, None, None))
        for block, width in enumerate(self.conv_features):
            for j in range(self.convs_per_block):
                conv = Conv3x3(
                    width,
                    padding=self.padding or ("SAME" if self.convs_per_block > 1 else "VALID"),
                    use_bias=not self.batch_norm,
                    dtype=self.dtype,
                    name=f"conv_{block}_{j}",
                )
                fuse_pool = not self.batch_norm and j == self.convs_per_block - 1
                if not fuse_pool:
                    x = conv(x)
                    if self.batch_norm:
                        x = nn.BatchNorm(
                            use_running_average=not train,
                            momentum=0.9,
                            dtype=self.dtype,
                            name=f"bn_{block}_{j}",
                        )(x)
                    x = nn.relu(x)
                else:
                    # relu(pool(conv(x)) + b) == pool(relu(conv(x) + b)): the bias is per
                    # channel and relu is monotonic, so both run on the 4x smaller pooled map.
                    x = nn.relu(conv(x, pool=True))
            if self.batch_norm:
                x = max_pool_2x2(x)
            x = nn.Dropout(self.dropout_rate / 2, deterministic=not train)(x)
        x = x.reshape((x.shape[0], -1))
        for i, width in enumerate(self.dense_features):
            x = layers.dense(width, ("embed", "mlp"), self.dtype, f"dense_{i}")(x)
            x = nn.relu(x)
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        logits = layers.dense(self.num_classes, ("mlp", "classes"), self.dtype, "head")(x)
        return logits.astype(jnp.float32)


# The registry (models/__init__.py) finds this file by its name: config.model.name = "cnn".
Model = CNN
TASK = "classification"
