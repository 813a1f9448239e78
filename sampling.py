"""Autoregressive generation from a language model, any length (nanoGPT's definition: each token
conditioned on the last block_size tokens): a KV cache while the context fits the window, then
full forward passes over a rolling window; one jitted program.

The model is any Linen module of task 'lm' (models/__init__.py) that keeps the cache contract
models/gpt.py's GPT keeps:
- `block_size` (int field): the context length, and the size of its KV cache;
- `decode` (bool field): `model.clone(decode=True)` appends each call's tokens to a cache in
  the 'cache' collection (made by `init`, carried by `apply(..., mutable=["cache"])`), its
  positions continuing from the cache's index;
- `model.apply({"params": params}, tokens)`, tokens int32[batch, length <= block_size], gives
  logits[batch, length, vocab] (any float dtype), the same function with or without the cache.
The server's slot decoding (serving/slots.py) builds on `init_cache` and `nucleus_cutoff`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn


def nucleus_cutoff(descending: jax.Array, top_p: jax.Array | float) -> jax.Array:
    """The smallest logit the nucleus (top-p, Holtzman et al. 2020) keeps, [..., 1], from logits
    sorted in descending order [..., vocab] (top_p: a float, or an array broadcasting against
    [..., 1]): a token is kept while the probability of the tokens more likely than it has not
    yet reached top_p. Shared with the server's per-row sampler (serving/slots.py)."""
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
        cutoff = nucleus_cutoff(jnp.sort(logits, axis=-1)[..., ::-1], top_p)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def init_cache(model: nn.Module, batch_size: int) -> Any:
    """An empty (all-zero, index 0) KV cache of `model.clone(decode=True)` for batch_size rows:
    the 'cache' collection its `init` makes on int32[batch_size, model.block_size] tokens (for
    the GPT: per layer, or stacked on a leading layer axis with scan_layers, cached_key and
    cached_value [batch_size, block_size, kv_heads, head_dim] in the compute dtype; and an
    int32 scalar cache_index)."""
    decode_model = model.clone(decode=True)
    tokens = jnp.zeros((batch_size, model.block_size), jnp.int32)
    shapes = jax.eval_shape(decode_model.init, jax.random.key(0), tokens)["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def generate(
    model: nn.Module,
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

    Args:
      model: a language model keeping the cache contract of the module docstring (block_size,
        decode, the 'cache' collection); its decode field may be either value.
      params: its parameters.
      prompt: int[batch, prompt_len], prompt_len >= 1 (converted to int32).
      rng: a PRNG key.
      max_new_tokens: tokens to add (0 returns the prompt).
      temperature, top_k, top_p: as in `sample_logits`.

    Raises ValueError for an empty or non-2-D prompt, a negative max_new_tokens or a bad
    sampling setting (before anything compiles).
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
    model: nn.Module,
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
