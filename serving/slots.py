"""Slot decoding for the server's engine (serving/engine.py): a fixed number of independent rows
("slots"), each with its own KV cache, position, seed and sampling settings, decoded together
by one compiled step.

A request joins a free slot between steps (continuous batching), so rows sit at different
positions: each slot holds a batch-1 cache of `model.clone(decode=True)`, and the step maps the
decode model over the slots with `jax.vmap`, which turns the model's one cache index into one
per slot. Shapes are fixed (slots; prompt buckets), so after one call of each program nothing
compiles again.

The model keeps sampling.py's cache contract (block_size, decode, the 'cache' collection), and
its cache's position counter is a leaf named `cache_index` (as models/gpt.py's is): a prefill
rewinds it and sets it to the prompt's length, and an idle slot's is parked at 0.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

import sampling


def prompt_buckets(block_size: int) -> list[int]:
    """The padded prompt lengths a slot prefill is compiled for: the powers of two below
    `block_size`, then `block_size` itself (e.g. [1, 2, 4, ..., 32, 64] for 64)."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}.")
    buckets = []
    length = 1
    while length < block_size:
        buckets.append(length)
        length *= 2
    return buckets + [block_size]


def bucket_for(prompt_len: int, block_size: int) -> int:
    """The smallest bucket of `prompt_buckets(block_size)` that holds `prompt_len` tokens.

    Raises ValueError for an empty prompt or one longer than the context (a slot's cache holds
    `block_size` positions)."""
    if not 1 <= prompt_len <= block_size:
        raise ValueError(f"prompt length must be in [1, {block_size}], got {prompt_len}.")
    return next(b for b in prompt_buckets(block_size) if b >= prompt_len)


def max_slot_tokens(prompt_len: int, block_size: int) -> int:
    """The most new tokens a slot can generate after a prompt of `prompt_len` tokens: those
    whose context still fits the window (prompt_len + i <= block_size for token i, counted
    from 0), as `sampling.num_cached_tokens` counts them; 0 for a prompt longer than the window."""
    return max(0, block_size - prompt_len + 1)


def init_slot_cache(model: nn.Module, num_slots: int) -> Any:
    """Empty KV caches for `num_slots` slots: `sampling.init_cache(model, 1)` stacked on a
    leading slot axis (every leaf [num_slots, ...]; the cache index becomes int32[num_slots])."""
    one = jax.eval_shape(lambda: sampling.init_cache(model, 1))
    return jax.tree.map(lambda s: jnp.zeros((num_slots,) + s.shape, s.dtype), one)


def sample_logits_per_row(
    logits: jax.Array,
    keys: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
) -> jax.Array:
    """`sampling.sample_logits` with settings per row: int32 token ids[batch] from
    logits[batch, vocab].

    keys: typed PRNG keys [batch]; temperature: float32[batch] (0 = argmax); top_k:
    int32[batch] (0 = no top-k filter); top_p: float32[batch] in (0, 1] (1 = no nucleus
    filter). Row i gets exactly the token `sampling.sample_logits(logits[i:i+1], keys[i],
    temperature[i], top_k[i] or None, top_p[i])` gives: the same scaling, the same k-th-largest
    threshold (from a sort instead of `lax.top_k`, whose k must be static) and the same nucleus
    rule. Settings are traced values, so one compiled program serves every mix of requests.
    """
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampled_rows = temperature > 0
    scaled = logits / jnp.where(sampled_rows, temperature, 1.0)[:, None]
    use_k = ((top_k > 0) & (top_k < vocab))[:, None]
    use_p = (top_p < 1.0)[:, None]

    def restrict(scaled: jax.Array) -> jax.Array:
        # top-k: drop what is below the k-th largest value (rows with 0 or k >= vocab keep all).
        descending = jnp.sort(scaled, axis=-1)[:, ::-1]
        k = jnp.clip(top_k, 1, vocab)
        kth_largest = jnp.take_along_axis(descending, (k - 1)[:, None], axis=-1)
        scaled = jnp.where(use_k & (scaled < kth_largest), -jnp.inf, scaled)
        # Nucleus over what top-k kept, as in sampling.sample_logits (top_p = 1 rows keep all).
        # The masking keeps the sorted order (the dropped values were the tail): no re-sort.
        descending = jnp.where(use_k & (descending < kth_largest), -jnp.inf, descending)
        cutoff = sampling.nucleus_cutoff(descending, top_p[:, None])
        return jnp.where(use_p & (scaled < cutoff), -jnp.inf, scaled)

    # The sort is most of the sampler's time: skipped when no row filters.
    scaled = jax.lax.cond(jnp.any(use_k | use_p), restrict, lambda x: x, scaled)
    sampled = jax.vmap(lambda key, row: jax.random.categorical(key, row[None])[0])(keys, scaled)
    return jnp.where(sampled_rows, sampled.astype(jnp.int32), greedy)


def token_keys(seeds: jax.Array, token_index: jax.Array) -> jax.Array:
    """The PRNG key of each row's token `token_index` (counted from 0 after the prompt):
    `fold_in(key(seed), i)`, which equals `sampling.generate`'s `jax.random.split(key(seed), n)[i]`
    (threefry's partitionable split is a fold-in of the index), so a slot draws the tokens
    `sampling.generate` draws for a one-row batch with the same seed."""
    return jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seeds, token_index)


def _map_cache_index(cache: Any, fn: Callable[[jax.Array], jax.Array]) -> Any:
    """`cache` with fn applied to its `cache_index` leaves (the other leaves unchanged)."""

    def apply(path, leaf):
        return fn(leaf) if getattr(path[-1], "key", None) == "cache_index" else leaf

    return jax.tree_util.tree_map_with_path(apply, cache)


def _set_cache_index(cache: Any, index: jax.Array) -> Any:
    """`cache` with its `cache_index` leaves replaced by `index` (broadcast to their shape)."""
    return _map_cache_index(
        cache, lambda leaf: jnp.broadcast_to(index, leaf.shape).astype(leaf.dtype)
    )


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("cache",))
def prefill_slot(
    model: nn.Module,
    params: Any,
    cache: Any,
    slot: jax.Array,
    tokens: jax.Array,
    length: jax.Array,
    seed: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
) -> tuple[jax.Array, Any]:
    """Writes a prompt into one slot's cache and samples the slot's first new token.

    tokens: int32[1, bucket], the prompt's `length` tokens then padding (any ids: the causal
    mask keeps the real positions from seeing it, and decoding overwrites it, position by
    position, before anything attends to it). cache: `init_slot_cache`'s tree (donated).
    slot, length, seed (uint32/int32), temperature, top_k, top_p: scalars (see
    `sample_logits_per_row`). Returns (int32 token, the cache with the slot's positions
    0..bucket-1 written and its index at `length`). One compilation per bucket length.
    """
    decode_model = model.clone(decode=True)
    slot_cache = jax.tree.map(lambda c: c[slot], cache)
    slot_cache = _set_cache_index(slot_cache, jnp.zeros((), jnp.int32))
    logits, state = decode_model.apply(
        {"params": params, "cache": slot_cache}, tokens, mutable=["cache"]
    )
    new_slot_cache = _set_cache_index(state["cache"], length)
    cache = jax.tree.map(lambda c, s: c.at[slot].set(s), cache, new_slot_cache)
    last = jax.lax.dynamic_index_in_dim(logits[0], length - 1, axis=0, keepdims=True)
    token = sample_logits_per_row(
        last,
        token_keys(seed[None], jnp.zeros((1,), jnp.int32)),
        temperature[None],
        top_k[None],
        top_p[None],
    )
    return token[0], cache


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("cache",))
def decode_slots(
    model: nn.Module,
    params: Any,
    cache: Any,
    tokens: jax.Array,
    token_index: jax.Array,
    seeds: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    active: jax.Array,
) -> tuple[jax.Array, Any]:
    """One decoding step of every slot: feeds tokens[slots] (each slot's last token) at the
    slot's own position and samples the next, token number token_index[slots] of its request
    (keys from `token_keys`). Per-slot settings as in `sample_logits_per_row`; active[slots]
    (bool) marks the slots in use: the others compute garbage at position 0. Returns (int32
    tokens[slots], the cache; donated). One compilation per slot count.
    """
    decode_model = model.clone(decode=True)

    def park_idle(index):
        return jnp.where(active.reshape((-1,) + (1,) * (index.ndim - 1)), index, 0)

    # Idle slots decode at position 0: a finished slot's index may be block_size, where the
    # position table has no row (the lookup would give NaN) and the cache write would land, as
    # NaN, on its last position, which the next request in the slot would attend to with
    # weight 0 (and 0 * NaN is NaN). Position 0 is always rewritten by the next prefill.
    cache = _map_cache_index(cache, park_idle)

    def one_slot(slot_cache, token):
        logits, state = decode_model.apply(
            {"params": params, "cache": slot_cache}, token[None, None], mutable=["cache"]
        )
        return logits[0, -1], state["cache"]

    logits, cache = jax.vmap(one_slot)(cache, tokens)
    next_tokens = sample_logits_per_row(
        logits, token_keys(seeds, token_index), temperature, top_k, top_p
    )
    return next_tokens, cache


@functools.partial(jax.jit, static_argnames=("model",))
def window_step(
    model: nn.Module,
    params: Any,
    window: jax.Array,
    seed: jax.Array,
    token_index: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
) -> jax.Array:
    """One token past the context, nanoGPT's way (as `sampling.generate` does once its window is
    full): a full forward pass over window int32[1, block_size] (the last block_size tokens
    so far) and the next token sampled from its last position, with the key of token number
    `token_index` of the request (`token_keys`) and the settings of `sample_logits_per_row`
    (scalars). Returns an int32 token. One compilation (the window's shape is fixed)."""
    logits = model.clone(decode=False).apply({"params": params}, window)
    token = sample_logits_per_row(
        logits[:, -1],
        token_keys(seed[None], token_index[None]),
        temperature[None],
        top_k[None],
        top_p[None],
    )
    return token[0]
