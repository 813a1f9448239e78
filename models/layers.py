"""Building blocks shared by the model files (not a model: it defines no `Model`)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn


def dense(features: int, axes: tuple[str, str], dtype: jnp.dtype, name: str) -> nn.Dense:
    """nn.Dense(features) computing in `dtype`, with Flax's default (LeCun normal) kernel and
    zero bias initialisers, its kernel [in, out] named by the logical `axes` (in, out) and its
    bias [out] by `axes[1]`, for sharding.py's rules."""
    return nn.Dense(
        features,
        dtype=dtype,
        kernel_init=nn.with_logical_partitioning(nn.linear.default_kernel_init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]),
        name=name,
    )


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """`vocab_size` rounded up to a multiple of `multiple`: the rows of a language model's
    embedding (and of an untied output layer). E.g. GPT-2's 50,257 tokens with multiple 64 ->
    50,304."""
    return -(-vocab_size // multiple) * multiple


def logical_normal(std: float, names: tuple[str | None, ...]) -> nn.initializers.Initializer:
    """Normal(0, std) initializer whose parameter carries the logical axis `names`."""
    return nn.with_logical_partitioning(nn.initializers.normal(std), names)


def logical_zeros(names: tuple[str | None, ...]) -> nn.initializers.Initializer:
    """Zeros initializer whose parameter carries the logical axis `names`."""
    return nn.with_logical_partitioning(nn.initializers.zeros, names)


def norm_layer(
    kind: str,
    epsilon: float,
    use_bias: bool,
    dtype: jnp.dtype,
    name: str,
    axis: str = "embed",
) -> nn.Module:
    """A normalisation over the last axis (logical name `axis`), scale 1 (and bias 0):
    'layernorm' (Ba et al. 2016; GPT-2's epsilon is 1e-5) or 'rmsnorm' (Zhang & Sennrich
    2019: x / sqrt(mean(x^2) + epsilon) * scale, no centring and no bias; Llama's)."""
    scale_init = nn.with_logical_partitioning(nn.initializers.ones, (axis,))
    if kind == "rmsnorm":
        return nn.RMSNorm(epsilon=epsilon, dtype=dtype, scale_init=scale_init, name=name)
    return nn.LayerNorm(
        epsilon=epsilon,
        use_bias=use_bias,
        dtype=dtype,
        scale_init=scale_init,
        bias_init=logical_zeros((axis,)),
        name=name,
    )


def mlp_activation(kind: str, h: jnp.ndarray, gate: jnp.ndarray | None = None) -> jnp.ndarray:
    """A feed-forward network's nonlinearity on its hidden units h (and, for 'swiglu', the
    gate projection of the same input): 'gelu' exact (erf), 'gelu_tanh' (GPT-2's tanh
    approximation; Hendrycks & Gimpel 2016), 'relu2' (squared ReLU; So et al. 2021, Primer),
    'swiglu' (silu(gate) * h; Shazeer 2020). Elementwise: any shape, h's dtype."""
    if kind == "swiglu":
        return nn.silu(gate) * h
    if kind == "relu2":
        return jnp.square(nn.relu(h))
    return gelu_exact(h) if kind == "gelu" else nn.gelu(h, approximate=True)


@jax.custom_jvp
def gelu_exact(x: jnp.ndarray) -> jnp.ndarray:
    """nn.gelu(x, approximate=False): x * Phi(x), Phi the standard normal CDF (erf-based).

    Its derivative Phi(x) + x * phi(x) is written out with jnp.exp because jax's own (through
    erfc's JVP, jax 0.12) builds a polynomial that `jax.shard_map`'s varying-axes check refuses
    when x varies over a mesh axis (models/moe.py's experts run inside a shard_map)."""
    return nn.gelu(x, approximate=False)


@gelu_exact.defjvp
def _gelu_exact_jvp(primals: tuple, tangents: tuple) -> tuple:
    (x,), (t,) = primals, tangents
    cdf = 0.5 * jax.lax.erfc(-x * (1 / math.sqrt(2)))
    pdf = jnp.exp(-0.5 * jnp.square(x)) * (1 / math.sqrt(2 * math.pi))
    return gelu_exact(x), t * (cdf + x * pdf).astype(t.dtype)
