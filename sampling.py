"""Autoregressive generation from a GPT, any length (nanoGPT's definition: each token conditioned
on the last block_size tokens): a KV cache while the context fits the window, then full forward
passes over a rolling window; one jitted program."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from models.gpt import GPT


def _nucleus_cutoff(descending: jax.Array, top_p: jax.Array | float) -> jax.Array:
    """The smallest logit the nucleus (top-p, Holtzman et al. 2020) keeps, [..., 1], from logits
    sorted in descending order [..., vocab]: a token is kept while the probability of the
    tokens more likely than it has not yet reached top_p."""
    probs = jax.nn.softmax(descending, axis=-1)
    keep = jnp.cumsum(probs, axis=-1) - probs < top_p
    return jnp.min(jnp.where(keep, descending, jnp.inf), axis=-1, keepdims=True)


def sample_logits(
    logits: jax.Array,
    rng: jax.Array,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> jax.Array:
    """Samples int32 token ids[batch] from logits[batch, vocab]; temperature 0 means argmax.

    The logits are divided by `temperature`, then restricted to the `top_k` largest and to the
    nucleus: the smallest set of most likely tokens whose probability reaches `top_p`.
    """
    _check_settings(temperature, top_k, top_p)
    logits = logits.astype(jnp.float32)
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    if top_p is not None and top_p < 1.0:
        cutoff = _nucleus_cutoff(jnp.sort(logits, axis=-1)[..., ::-1], top_p)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def init_cache(model: GPT, batch_size: int) -> Any:
    """An empty (all-zero, index 0) KV cache of `model.clone(decode=True)` for batch_size rows."""
    decode_model = model.clone(decode=True)
    tokens = jnp.zeros((batch_size, model.block_size), jnp.int32)
    shapes = jax.eval_shape(decode_model.init, jax.random.key(0), tokens)["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def generate(
    model: GPT,
    params: Any,
    prompt: jax.Array,
    rng: jax.Array,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> jax.Array:
    """Continues prompt[batch, prompt_len] by max_new_tokens; returns int32[batch, prompt_len +
    max_new_tokens] (the whole prompt, then the new tokens).

    Each new token is sampled from the model's last-position logits on the last
    `model.block_size` tokens so far (nanoGPT's definition), so neither the prompt nor the
    number of new tokens is bounded by the context window. While the sequence fits the window a
    KV cache makes each token one position's work; past it, each token is a full forward pass
    over the cropped window (positions restart at 0 there, so the cache cannot be reused).
    Token i is sampled with `jax.random.split(rng, max_new_tokens)[i]`.
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be a non-empty [batch, length] array, got {prompt.shape}.")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
    _check_settings(temperature, top_k, top_p)
    if max_new_tokens == 0:
        return prompt
    return _generate(
        model.clone(decode=False),
        params,
        prompt,
        rng,
        max_new_tokens=max_new_tokens,
        temperature=float(temperature),
        top_k=top_k,
        top_p=None if top_p is None else float(top_p),
    )


def num_cached_tokens(prompt_len: int, max_new_tokens: int, block_size: int) -> int:
    """How many of the new tokens are generated with the KV cache: those whose context (the
    prompt and the tokens before them) still fits the window, prompt_len + i <= block_size.
    A prompt that fills the window or more has none (a full pass on its cropped tail is the
    same work as a prefill)."""
    if prompt_len >= block_size:
        return 0
    return min(max_new_tokens, block_size - prompt_len + 1)


@functools.partial(
    jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k", "top_p")
)
def _generate(
    model: GPT,
    params: Any,
    prompt: jax.Array,
    rng: jax.Array,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
) -> jax.Array:
    """One compiled program: while the context fits the window, a prefill and a scan over the
    KV cache; then a scan of full forward passes over a rolling window of block_size tokens.
    The split point is static (prompt length, max_new_tokens and block_size are)."""
    sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)
    rngs = jax.random.split(rng, max_new_tokens)
    block_size = model.block_size
    num_cached = num_cached_tokens(prompt.shape[1], max_new_tokens, block_size)
    pieces = [prompt]

    if num_cached:
        decode_model = model.clone(decode=True)
        cache = init_cache(decode_model, prompt.shape[0])
        logits, state = decode_model.apply(
            {"params": params, "cache": cache}, prompt, mutable=["cache"]
        )
        token = sample(logits[:, -1], rngs[0])
        pieces.append(token[:, None])

        def cached_step(carry, step_rng):
            token, cache = carry
            logits, state = decode_model.apply(
                {"params": params, "cache": cache}, token[:, None], mutable=["cache"]
            )
            next_token = sample(logits[:, -1], step_rng)
            return (next_token, state["cache"]), next_token

        if num_cached > 1:
            _, tokens = jax.lax.scan(cached_step, (token, state["cache"]), rngs[1:num_cached])
            pieces.append(tokens.T)

    if num_cached < max_new_tokens:
        # The window is full: each token is the last position's prediction of a full forward
        # pass over the last block_size tokens, which then slide by one.
        window = jnp.concatenate(pieces, axis=1)[:, -block_size:]

        def window_step(window, step_rng):
            logits = model.apply({"params": params}, window)
            next_token = sample(logits[:, -1], step_rng)
            return jnp.concatenate([window[:, 1:], next_token[:, None]], axis=1), next_token

        _, tokens = jax.lax.scan(window_step, window, rngs[num_cached:])
        pieces.append(tokens.T)
    return jnp.concatenate(pieces, axis=1)


def _check_settings(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raises ValueError for a negative temperature, top_k < 1 or top_p outside (0, 1]."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}.")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or None), got {top_k}.")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (or None), got {top_p}.")


# Slot decoding for a server (serving/engine.py): a fixed number of independent rows ("slots"),
# each with its own KV cache, position, seed and sampling settings, decoded together by one
# compiled step. A request joins a free slot between steps (continuous batching), so rows sit
# at different positions: each slot holds a batch-1 cache of `model.clone(decode=True)`, and
# the step maps the decode model over the slots with `jax.vmap`, which turns the model's one
# cache index into one per slot. Shapes are fixed (slots; prompt buckets), so after one call
# of each program nothing compiles again.


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
    from 0), as `num_cached_tokens` counts them; 0 for a prompt longer than the window."""
    return max(0, block_size - prompt_len + 1)


def init_slot_cache(model: GPT, num_slots: int) -> Any:
    """Empty KV caches for `num_slots` slots: `init_cache(model, 1)` stacked on a leading slot
    axis (every leaf [num_slots, ...]; the cache index becomes int32[num_slots])."""
    one = jax.eval_shape(lambda: init_cache(model, 1))
    return jax.tree.map(lambda s: jnp.zeros((num_slots,) + s.shape, s.dtype), one)


def sample_logits_per_row(
    logits: jax.Array,
    keys: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
) -> jax.Array:
    """`sample_logits` with settings per row: int32 token ids[batch] from logits[batch, vocab].

    keys: typed PRNG keys [batch]; temperature: float32[batch] (0 = argmax); top_k:
    int32[batch] (0 = no top-k filter); top_p: float32[batch] in (0, 1] (1 = no nucleus
    filter). Row i gets exactly the token `sample_logits(logits[i:i+1], keys[i], temperature[i],
    top_k[i] or None, top_p[i])` gives: the same scaling, the same k-th-largest threshold (from a
    sort instead of `lax.top_k`, whose k must be static) and the same nucleus rule. Settings are
    traced values, so one compiled program serves every mix of requests.
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
        # Nucleus over what top-k kept, as in sample_logits (rows with top_p = 1 keep all).
        # The masking keeps the sorted order (the dropped values were the tail): no re-sort.
        descending = jnp.where(use_k & (descending < kth_largest), -jnp.inf, descending)
        cutoff = _nucleus_cutoff(descending, top_p[:, None])
        return jnp.where(use_p & (scaled < cutoff), -jnp.inf, scaled)

    # The sort is most of the sampler's time: skipped when no row filters.
    scaled = jax.lax.cond(jnp.any(use_k | use_p), restrict, lambda x: x, scaled)
    sampled = jax.vmap(lambda key, row: jax.random.categorical(key, row[None])[0])(keys, scaled)
    return jnp.where(sampled_rows, sampled.astype(jnp.int32), greedy)


def token_keys(seeds: jax.Array, token_index: jax.Array) -> jax.Array:
    """The PRNG key of each row's token `token_index` (counted from 0 after the prompt):
    `fold_in(key(seed), i)`, which equals `generate`'s `jax.random.split(key(seed), n)[i]`
    (threefry's partitionable split is a fold-in of the index), so a slot draws the tokens
    `generate` draws for a one-row batch with the same seed."""
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
    model: GPT,
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
    model: GPT,
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
