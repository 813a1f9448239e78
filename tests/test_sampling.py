"""Tests for sampling.py: greedy/top-k/top-p sampling and cached, compiled generation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import sampling
from models.gpt import GPT

TINY = dict(vocab_size=13, block_size=24, num_layers=2, num_heads=2, embed_dim=16)


@pytest.fixture(scope="module", params=["learned", "rope"])
def model_and_params(request: pytest.FixtureRequest) -> tuple[GPT, dict]:
    """A tiny randomly initialised GPT and its params."""
    model = GPT(**TINY, position_embedding=request.param)
    tokens = jnp.zeros((1, TINY["block_size"]), jnp.int32)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens)["params"])
    return model, params


def _prompt(batch: int = 2, length: int = 5) -> jax.Array:
    """Random int32 prompt[batch, length]."""
    return jax.random.randint(jax.random.key(1), (batch, length), 0, TINY["vocab_size"])


def test_greedy_matches_full_model_argmax(model_and_params: tuple[GPT, dict]) -> None:
    """Greedy generation equals re-running the full model and appending the argmax."""
    model, params = model_and_params
    prompt = _prompt()
    out = sampling.generate(model, params, prompt, jax.random.key(0), 8, temperature=0.0)
    assert out.shape == (2, 13) and out.dtype == jnp.int32
    np.testing.assert_array_equal(out[:, :5], prompt)

    forward = jax.jit(lambda tokens: model.apply({"params": params}, tokens))
    expected = prompt
    for _ in range(8):
        next_token = jnp.argmax(forward(expected)[:, -1], axis=-1).astype(jnp.int32)
        expected = jnp.concatenate([expected, next_token[:, None]], axis=1)
    np.testing.assert_array_equal(out, expected)


def test_top_k_1_is_greedy(model_and_params: tuple[GPT, dict]) -> None:
    """Sampling with top_k=1 at any temperature is greedy decoding."""
    model, params = model_and_params
    greedy = sampling.generate(model, params, _prompt(), jax.random.key(0), 6, temperature=0)
    top1 = sampling.generate(model, params, _prompt(), jax.random.key(5), 6, 1.5, top_k=1)
    np.testing.assert_array_equal(top1, greedy)


def test_same_seed_same_samples(model_and_params: tuple[GPT, dict]) -> None:
    """Same rng -> same samples; different rng -> (almost surely) different ones."""
    model, params = model_and_params
    prompt = _prompt(batch=4)
    a = sampling.generate(model, params, prompt, jax.random.key(3), 12, temperature=1.0)
    b = sampling.generate(model, params, prompt, jax.random.key(3), 12, temperature=1.0)
    c = sampling.generate(model, params, prompt, jax.random.key(4), 12, temperature=1.0)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_no_recompilation(model_and_params: tuple[GPT, dict]) -> None:
    """Repeated calls with the same shapes and settings reuse the compiled function."""
    model, params = model_and_params
    prompt = _prompt(batch=3, length=4)
    sampling.generate(model, params, prompt, jax.random.key(0), 5, temperature=0.7, top_p=0.9)
    size = sampling._generate._cache_size()
    sampling.generate(model, params, prompt + 1, jax.random.key(1), 5, temperature=0.7, top_p=0.9)
    assert sampling._generate._cache_size() == size


def test_too_long_request_raises(model_and_params: tuple[GPT, dict]) -> None:
    """prompt_len + max_new_tokens > block_size raises a ValueError naming all three numbers."""
    model, params = model_and_params
    with pytest.raises(ValueError, match=r"prompt length 5 \+ max_new_tokens 20 .* block_size 24"):
        sampling.generate(model, params, _prompt(), jax.random.key(0), 20)
    out = sampling.generate(model, params, _prompt(), jax.random.key(0), 19, temperature=0)
    assert out.shape == (2, 24)


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
