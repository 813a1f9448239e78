"""Causal self-attention of the GPT (models/gpt.py): the heads projections, rotary positions,
the explicit attention and the attention layer with its KV cache. A helper of the model files,
not a model (it defines no `Model`); models.gpt re-exports these names."""

from __future__ import annotations

import math
from typing import Protocol

import jax
import jax.numpy as jnp
from flax import linen as nn

from models import context_parallel
from models.context_parallel import TokenPositions
from models.layers import logical_normal as _normal
from models.layers import logical_zeros as _zeros
from models.layers import norm_layer as _norm

ATTENTION_IMPLS = ("auto", "xla", "cudnn", "plain")


class AttentionConfig(Protocol):
    """The fields of models.gpt.BlockConfig that the attention layer reads (a protocol, so that
    this module does not import the model that imports it)."""

    num_heads: int
    num_kv_heads: int  # key/value heads (== num_heads: multi-head; 1: multi-query)
    block_size: int  # the context length: the KV cache's size
    norm_epsilon: float
    qk_norm: bool
    attn_logit_softcap: float | None
    residual_init_std: float
    use_bias: bool
    rope: bool
    attention_impl: str  # one of ATTENTION_IMPLS
    context_parallel: str  # one of context_parallel.STRATEGIES: attention over a split sequence
    dropout_rate: float
    decode: bool
    dtype: jnp.dtype


class HeadsDense(nn.Module):
    """A dense layer to or from a (heads, head_dim) pair of axes: an einsum over a kernel kept
    in its true shape. (Flax's DenseGeneral initialises a flattened kernel, which clashes with
    sharding constraints on the logical axis names.)"""

    equation: str  # e.g. 'ble,ehd->blhd' (in) or 'blhd,hde->ble' (out)
    kernel_shape: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    bias_axes: tuple[str, ...]
    std: float
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """Applies the projection (and bias) in the compute dtype."""
        kernel = self.param("kernel", _normal(self.std, self.kernel_axes), self.kernel_shape)
        kernel = kernel.astype(self.dtype)
        if context_parallel.sequence_axis()[1] > 1:
            # Sequences split over devices: merging batch and length would gather the length.
            y = jnp.einsum(self.equation, x.astype(self.dtype), kernel)
        else:
            # Batch and length merged into one axis ('bl' -> 'l'): XLA:CPU then computes the
            # weight gradient as a plain matmul instead of through a slow transposing copy
            # (docs/performance.md).
            batch, length = x.shape[:2]
            flat = x.reshape((batch * length,) + x.shape[2:]).astype(self.dtype)
            y = jnp.einsum(self.equation.replace("b", ""), flat, kernel)
            y = y.reshape((batch, length) + y.shape[1:])
        if self.use_bias:
            bias_shape = y.shape[-len(self.bias_axes) :]
            y = y + self.param("bias", _zeros(self.bias_axes), bias_shape).astype(self.dtype)
        return y


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, base: float = 10000.0) -> jnp.ndarray:
    """Rotary position embedding (rotate-half form; Su et al. 2021) of x[batch, length, heads,
    head_dim] at int positions[length] or [batch, length] (packed documents)."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / base ** (jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [(batch,) length, half]
    angles = angles if angles.ndim == 3 else angles[None]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def plain_attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    mask: jnp.ndarray,
    softcap: float | None = None,
) -> jnp.ndarray:
    """Explicit softmax(cap(q k^T / sqrt(d)) + mask) v.

    q[batch, q_len, heads, head_dim]; k, v[batch, kv_len, kv_heads, head_dim], kv_heads dividing
    heads: query head h attends with key/value head h // (heads // kv_heads) (grouped-query
    attention, Ainslie et al. 2023; the grouping of jax.nn.dot_product_attention and of Llama's
    repeat_kv). mask: bool, broadcastable to [batch, heads, q_len, kv_len], True = attend.
    softcap: None, or c > 0 for c * tanh(scores / c) (Gemma 2's attention-logit soft-capping).
    Scores and softmax in float32; returns [batch, q_len, heads, head_dim] in v's dtype.
    """
    batch, q_len, heads, head_dim = q.shape
    kv_heads, kv_len = k.shape[2], k.shape[1]
    scale = 1.0 / math.sqrt(head_dim)
    if kv_heads == heads:  # multi-head: the plain einsums
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale
    else:  # the query heads of a group share one key/value head: no copies of k and v
        q = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
        scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k).astype(jnp.float32) * scale
        scores = scores.reshape(batch, heads, q_len, kv_len)
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    if kv_heads == heads:
        return jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    weights = weights.reshape(batch, kv_heads, heads // kv_heads, q_len, kv_len)
    y = jnp.einsum("bkgqs,bskd->bqkgd", weights, v)
    return y.reshape(batch, q_len, heads, head_dim)


class CausalSelfAttention(nn.Module):
    """Causal self-attention with num_heads query heads and num_kv_heads key/value heads
    (multi-head, grouped-query or multi-query); in decode mode keys/values accumulate in the
    'cache', [batch, block_size, num_kv_heads, head_dim] each. Where the rules split the
    sequence over devices (context parallelism), attention crosses them as
    `config.context_parallel` says (models/context_parallel.py)."""

    config: AttentionConfig

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, positions: jnp.ndarray | TokenPositions, train: bool = False
    ) -> jnp.ndarray:
        """Attends each position of x[batch, length, embed] to itself and earlier positions (of
        its own segment, with segment ids); positions: int32 [length] or a TokenPositions."""
        c = self.config
        segment_ids = None
        if isinstance(positions, TokenPositions):
            positions, segment_ids = positions
        batch, length, embed_dim = x.shape
        head_dim = embed_dim // c.num_heads
        # Key/value heads have their own logical axis when there are fewer of them than query
        # heads: sharding.py splits them over `tensor` only where it divides them. Multi-head
        # attention keeps 'heads' (today's layout and checkpoints).
        kv_axis = "heads" if c.num_kv_heads == c.num_heads else "kv_heads"

        def project(name: str, heads: int, axis: str) -> jnp.ndarray:
            return HeadsDense(
                "ble,ehd->blhd",
                (embed_dim, heads, head_dim),
                ("embed", axis, "kv"),
                (axis, "kv"),
                std=0.02,
                use_bias=c.use_bias,
                dtype=c.dtype,
                name=name,
            )(x)

        q_axes = ("batch", "length", "heads", "kv")
        # An activation constraint must divide evenly; grouped key/value heads may not divide
        # the tensor axis, so their activations follow the kernel's sharding unconstrained.
        kv_axes = ("batch", "length", "heads" if kv_axis == "heads" else None, "kv")
        q = nn.with_logical_constraint(project("query", c.num_heads, "heads"), q_axes)
        k = nn.with_logical_constraint(project("key", c.num_kv_heads, kv_axis), kv_axes)
        v = nn.with_logical_constraint(project("value", c.num_kv_heads, kv_axis), kv_axes)
        if c.qk_norm:  # before rotary positions, as OLMo 2 and Gemma 3 do
            q = _norm("rmsnorm", c.norm_epsilon, False, c.dtype, "query_norm", "kv")(q)
            k = _norm("rmsnorm", c.norm_epsilon, False, c.dtype, "key_norm", "kv")(k)
        if c.rope:
            q, k = apply_rope(q, positions), apply_rope(k, positions)

        impl = c.attention_impl
        if impl == "auto" and jax.default_backend() == "cpu":
            # XLA:CPU has no fused kernel; the explicit einsum form is faster there
            # (docs/performance.md).
            impl = "plain"
        if c.attn_logit_softcap is not None:  # jax.nn.dot_product_attention has no soft cap
            impl = "plain"
        axes, shards = context_parallel.split_sequence(length, c.decode)
        if shards > 1:  # the sequence is split, in the load-balanced layout GPT put it in
            y = context_parallel.context_attention(
                q, k, v, segment_ids, axes=axes, shards=shards, strategy=c.context_parallel,
                softcap=c.attn_logit_softcap, kv_names=kv_axes,
            )  # fmt: skip
        else:
            y = self._attend(q, k, v, positions, segment_ids, impl)
        y = nn.with_logical_constraint(y, q_axes)
        y = HeadsDense(
            "blhd,hde->ble",
            (c.num_heads, head_dim, embed_dim),
            ("heads", "kv", "embed"),
            ("embed",),
            std=c.residual_init_std,
            use_bias=c.use_bias,
            dtype=c.dtype,
            name="out",
        )(y)
        return nn.Dropout(c.dropout_rate, deterministic=not train)(y)

    def _attend(
        self,
        q: jnp.ndarray,
        k: jnp.ndarray,
        v: jnp.ndarray,
        positions: jnp.ndarray,
        segment_ids: jnp.ndarray | None,
        impl: str,
    ) -> jnp.ndarray:
        """Attention of whole sequences on each device (or over the cache, decoding): causal,
        and block-diagonal with segment ids. q [batch, length, heads, head_dim], k and v
        [batch, length, kv_heads, head_dim]; returns q's shape."""
        c = self.config
        batch, length, _, head_dim = q.shape
        mask = jnp.tril(jnp.ones((length, length), bool))[None, None]  # [1, 1, q, kv]
        is_causal = True
        if segment_ids is not None:  # block-diagonal: no attention across a document boundary
            if c.decode:
                raise ValueError("Segment ids (packed documents) are not for cached decoding.")
            mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
            is_causal = False
            if impl == "cudnn":  # an explicit mask: XLA's attention takes any
                impl = "xla"
        if c.decode:
            # Keys/values of every position so far; `init` only creates the (empty) cache.
            initialized = self.has_variable("cache", "cached_key")
            cache_shape = (batch, c.block_size, c.num_kv_heads, head_dim)
            cached_k = self.variable("cache", "cached_key", jnp.zeros, cache_shape, k.dtype)
            cached_v = self.variable("cache", "cached_value", jnp.zeros, cache_shape, v.dtype)
            if initialized:
                start = (0, positions[0], 0, 0)
                cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k, start)
                cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v, start)
                k, v = cached_k.value, cached_v.value
                mask = (jnp.arange(c.block_size)[None, :] <= positions[:, None])[None, None]
                is_causal = False
                if impl == "cudnn":  # an explicit mask over the cache: let XLA handle decoding
                    impl = "xla"

        if impl == "plain":
            return plain_attention(q, k, v, mask, c.attn_logit_softcap)
        return jax.nn.dot_product_attention(
            q,
            k,
            v,
            mask=None if is_causal else mask,
            is_causal=is_causal,
            implementation=None if impl == "auto" else impl,
        )
