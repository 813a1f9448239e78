"""Tests for sampling.py: greedy/top-k/top-p sampling and compiled generation of any length
(cached within the window, nanoGPT's cropped context past it), and sample.py."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import sampling
from models.gpt import GPT

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=13, block_size=12, num_layers=2, num_heads=2, embed_dim=16)
BLOCK = TINY["block_size"]


@pytest.fixture(scope="module", params=["learned", "rope"])
def model_and_params(request: pytest.FixtureRequest) -> tuple[GPT, dict]:
    """A tiny randomly initialised GPT and its params."""
    model = GPT(**TINY, position_embedding=request.param)
    tokens = jnp.zeros((1, BLOCK), jnp.int32)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens)["params"])
    return model, params


def _prompt(batch: int = 2, length: int = 5, seed: int = 1) -> jax.Array:
    """Random int32 prompt[batch, length]."""
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, TINY["vocab_size"])


@functools.partial(jax.jit, static_argnums=0)
def _forward(model: GPT, params: dict, tokens: jax.Array) -> jax.Array:
    """The plain forward pass (no cache), compiled once per model and length for all tests."""
    return model.apply({"params": params}, tokens)


def _reference(model: GPT, params: dict, prompt: jax.Array, rng: jax.Array,
               max_new_tokens: int, **settings) -> jax.Array:  # fmt: skip
    """nanoGPT's definition as a plain Python loop: each token from the last position of a full
    forward pass over the last block_size tokens (no cache), token i with split(rng)[i]."""
    rngs = jax.random.split(rng, max_new_tokens)
    idx = jnp.asarray(prompt, jnp.int32)
    for i in range(max_new_tokens):
        idx_cond = idx if idx.shape[1] <= model.block_size else idx[:, -model.block_size :]
        logits = _forward(model, params, idx_cond)[:, -1]
        next_token = sampling.sample_logits(logits, rngs[i], **settings)
        idx = jnp.concatenate([idx, next_token[:, None]], axis=1)
    return idx


@pytest.mark.parametrize(
    ("prompt_len", "max_new_tokens"),
    [
        (5, 1),  # the prefill alone
        (5, BLOCK - 5 + 1),  # within the window, up to the last token that fits it
        (5, 20),  # crossing the window
        (BLOCK + 5, 9),  # a prompt longer than the window
    ],
)
def test_greedy_matches_full_forward_on_cropped_context(
    model_and_params: tuple[GPT, dict], prompt_len: int, max_new_tokens: int
) -> None:
    """Greedy generation equals nanoGPT's loop of full forward passes over the last block_size
    tokens, token for token, inside the window, across it and from a prompt longer than it;
    the whole prompt is returned."""
    model, params = model_and_params
    prompt = _prompt(length=prompt_len)
    out = sampling.generate(model, params, prompt, jax.random.key(0), max_new_tokens, 0.0)
    assert out.shape == (2, prompt_len + max_new_tokens) and out.dtype == jnp.int32
    np.testing.assert_array_equal(out[:, :prompt_len], prompt)
    expected = _reference(model, params, prompt, jax.random.key(0), max_new_tokens,
                          temperature=0.0)  # fmt: skip
    np.testing.assert_array_equal(out, expected)


class _PrefixMeanLM(nn.Module):
    """A language model that is not a GPT: each position's logits from the mean of the token
    embeddings so far. Its decode mode keeps sampling.py's cache contract (a 'cache' collection:
    the running sum and the cache_index), so generate's cached path is exercised on it."""

    vocab_size: int = TINY["vocab_size"]
    block_size: int = BLOCK
    decode: bool = False

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = nn.Embed(self.vocab_size, 8)(tokens)  # [batch, length, 8]
        total = jnp.cumsum(x, axis=1)
        count = jnp.arange(1, tokens.shape[1] + 1, dtype=jnp.float32)
        if self.decode:
            initialized = self.has_variable("cache", "cache_index")
            index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
            cached = self.variable("cache", "cached_sum", jnp.zeros, (tokens.shape[0], 8))
            if initialized:  # init only creates the cache
                total = total + cached.value[:, None]
                count = count + index.value
                cached.value = total[:, -1]
                index.value = index.value + tokens.shape[1]
        return nn.Dense(self.vocab_size)(3 * jnp.tanh(total / count[None, :, None]))


@pytest.mark.parametrize("settings", [dict(temperature=0.0), dict(temperature=0.9, top_k=6)])
def test_generate_takes_any_language_model(settings: dict) -> None:
    """generate needs only the cache contract (block_size, decode, the 'cache' collection): on
    a model of another architecture it draws nanoGPT's loop's tokens, inside the window and
    past it."""
    model = _PrefixMeanLM()
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, BLOCK), jnp.int32))["params"]
    prompt = _prompt(length=4, seed=3)
    out = sampling.generate(model, params, prompt, jax.random.key(2), 20, **settings)
    expected = _reference(model, params, prompt, jax.random.key(2), 20, **settings)
    np.testing.assert_array_equal(out, expected)


def test_cached_tokens_split_point() -> None:
    """The KV cache serves exactly the tokens whose context fits the window."""
    assert sampling.num_cached_tokens(5, 6, 12) == 6
    assert sampling.num_cached_tokens(5, 20, 12) == 8  # contexts of 5..12 tokens
    assert sampling.num_cached_tokens(1, 100, 12) == 12
    assert sampling.num_cached_tokens(12, 5, 12) == 0
    assert sampling.num_cached_tokens(17, 5, 12) == 0


def test_sampled_past_the_window_follows_the_definition(
    model_and_params: tuple[GPT, dict],
) -> None:
    """Sampling (temperature, top_k, top_p) past the window: the same seed gives the same
    tokens, another seed others, and each token is drawn as the plain loop draws it."""
    model, params = model_and_params
    prompt = _prompt(length=3, seed=2)
    settings = dict(temperature=0.9, top_k=8, top_p=0.95)
    a = sampling.generate(model, params, prompt, jax.random.key(3), 30, **settings)
    b = sampling.generate(model, params, prompt, jax.random.key(3), 30, **settings)
    c = sampling.generate(model, params, prompt, jax.random.key(4), 30, **settings)
    assert a.shape == (2, 33)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[:, BLOCK + 1 :], c[:, BLOCK + 1 :])
    np.testing.assert_array_equal(
        a, _reference(model, params, prompt, jax.random.key(3), 30, **settings)
    )


def test_top_k_1_is_greedy(model_and_params: tuple[GPT, dict]) -> None:
    """Sampling with top_k=1 at any temperature is greedy decoding, past the window too."""
    model, params = model_and_params
    greedy = sampling.generate(model, params, _prompt(), jax.random.key(0), 20, temperature=0)
    top1 = sampling.generate(model, params, _prompt(), jax.random.key(5), 20, 1.5, top_k=1)
    np.testing.assert_array_equal(top1, greedy)


def test_no_recompilation(model_and_params: tuple[GPT, dict]) -> None:
    """Repeated calls with the same shapes and settings reuse the compiled function."""
    model, params = model_and_params
    prompt = _prompt(batch=3, length=4)
    sampling.generate(model, params, prompt, jax.random.key(0), 25, temperature=0.7, top_p=0.9)
    size = sampling._generate._cache_size()
    sampling.generate(model, params, prompt + 1, jax.random.key(1), 25, temperature=0.7, top_p=0.9)
    assert sampling._generate._cache_size() == size


def test_bad_requests_raise(model_and_params: tuple[GPT, dict]) -> None:
    """A negative max_new_tokens or an empty prompt raises; 0 new tokens returns the prompt."""
    model, params = model_and_params
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        sampling.generate(model, params, _prompt(), jax.random.key(0), -1)
    with pytest.raises(ValueError, match="non-empty"):
        sampling.generate(model, params, jnp.zeros((2, 0), jnp.int32), jax.random.key(0), 3)
    with pytest.raises(ValueError, match="top_p"):
        sampling.generate(model, params, _prompt(), jax.random.key(0), 3, top_p=1.5)
    long_prompt = _prompt(length=BLOCK + 3)
    out = sampling.generate(model, params, long_prompt, jax.random.key(0), 0)
    np.testing.assert_array_equal(out, long_prompt)


def test_sample_command_generates_past_the_window(trained_lm_run: str) -> None:
    """sample.py on a run with block_size 32 prints every sample at full length: the prompt and
    100 new characters (the README asks 300 of a block-64 run)."""
    prompt = "The king"
    result = subprocess.run(
        [sys.executable, "sample.py", f"--workdir={trained_lm_run}", f"--prompt={prompt}",
         "--num_samples=2", "--max_new_tokens=100", "--temperature=0.8", "--top_k=200"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    body = out[: out.index("\n----------\ncompile") + 1]
    samples = re.split(r"^---------- sample \d+ ----------\n", body, flags=re.M)[1:]
    texts = [s[:-1] for s in samples]  # each without print's newline
    assert len(texts) == 2, out
    for text in texts:
        assert text.startswith(prompt) and len(text) == len(prompt) + 100, repr(text)
    assert "2 samples x 100 tokens" in out


# sample_logits on hand-made distributions.
PROBS = np.array([0.05, 0.5, 0.15, 0.3])  # sorted: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)


def _draw(n: int = 2000, **settings) -> np.ndarray:
    """n samples from PROBS with sample_logits (one batch row per sample)."""
    logits = jnp.tile(jnp.log(jnp.asarray(PROBS, jnp.float32)), (n, 1))
    return np.asarray(sampling.sample_logits(logits, jax.random.key(0), **settings))


def test_sample_logits_temperature_zero_is_argmax() -> None:
    """temperature=0 picks the most likely token, whatever top_k/top_p say."""
    assert set(_draw(10, temperature=0.0)) == {1}
    assert set(_draw(10, temperature=0.0, top_k=3, top_p=0.2)) == {1}


def test_sample_logits_plain_follows_distribution() -> None:
    """Without filtering, sample frequencies match the probabilities."""
    counts = np.bincount(_draw(4000), minlength=4) / 4000
    np.testing.assert_allclose(counts, PROBS, atol=0.03)


def test_sample_logits_top_k() -> None:
    """top_k=2 samples only the two most likely tokens, in ratio 0.5 : 0.3."""
    samples = _draw(top_k=2)
    assert set(samples) == {1, 3}
    np.testing.assert_allclose(np.mean(samples == 1), 0.5 / 0.8, atol=0.04)


@pytest.mark.parametrize(
    ("top_p", "nucleus"), [(0.4, {1}), (0.7, {1, 3}), (0.9, {1, 3, 2}), (1.0, {0, 1, 2, 3})]
)
def test_sample_logits_top_p(top_p: float, nucleus: set[int]) -> None:
    """top_p keeps the smallest set of most likely tokens whose mass reaches top_p."""
    assert set(_draw(top_p=top_p)) == nucleus


def test_sample_logits_rejects_bad_settings() -> None:
    """Negative temperature, top_k < 1 and top_p outside (0, 1] raise ValueError."""
    for settings in (dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            _draw(2, **settings)
