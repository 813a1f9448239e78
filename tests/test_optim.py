"""The optimizer and schedule follow nanoGPT's (PyTorch AdamW, clip_grad_norm_, get_lr) exactly."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optim
from configs import base, shakespeare_char_cpu


def nanogpt_lr(it: int, lr=1e-3, min_lr=1e-4, warmup=100, decay_iters=2000) -> float:
    """nanoGPT's get_lr, written out independently."""
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > decay_iters:
        return min_lr
    ratio = (it - warmup) / (decay_iters - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def test_schedule_matches_nanogpt() -> None:
    config = shakespeare_char_cpu.get_config()
    schedule = optim.learning_rate_schedule(config, 2000)
    for it in [0, 1, 50, 99, 100, 101, 500, 1000, 1999, 2000, 2001, 3000]:
        np.testing.assert_allclose(float(schedule(it)), nanogpt_lr(it), rtol=1e-5)


def test_constant_schedule_warmup() -> None:
    config = base.get_config()
    config.lr_schedule, config.learning_rate, config.warmup_steps = "constant", 0.1, 9
    schedule = optim.learning_rate_schedule(config, 100)
    np.testing.assert_allclose(
        [float(schedule(t)) for t in (0, 4, 9, 50)], [0.01, 0.05, 0.1, 0.1], rtol=1e-6
    )


def torch_adamw_reference(params, grads_per_step, lrs, wd, b1, b2, eps, clip):
    """PyTorch's AdamW with clip_grad_norm_, in numpy: decay p *= 1 - lr*wd (matrices only),
    then the bias-corrected Adam update."""
    p = {k: v.astype(np.float64).copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    for t, (grads, lr) in enumerate(zip(grads_per_step, lrs, strict=True), start=1):
        norm = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values()))
        scale = min(1.0, clip / (norm + 1e-6))
        for k in p:
            g = grads[k].astype(np.float64) * scale
            if p[k].ndim >= 2:
                p[k] *= 1 - lr * wd
            m[k] = b1 * m[k] + (1 - b1) * g
            v2[k] = b2 * v2[k] + (1 - b2) * g * g
            m_hat, v_hat = m[k] / (1 - b1**t), v2[k] / (1 - b2**t)
            p[k] -= lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


def test_adamw_clip_decay_match_torch_semantics() -> None:
    config = shakespeare_char_cpu.get_config()
    schedule = optim.learning_rate_schedule(config, 2000)
    tx = optim.build_optimizer(config, schedule)
    rng = np.random.default_rng(0)
    params = {
        "kernel": rng.normal(size=(4, 3)).astype(np.float32),
        "scale": rng.normal(size=(3,)).astype(np.float32),
    }
    # Large first gradients (clipped), small later ones (not clipped).
    grads = [
        {k: (rng.normal(size=v.shape) * s).astype(np.float32) for k, v in params.items()}
        for s in (5.0, 3.0, 0.01, 0.02, 0.1)
    ]
    state = tx.init(params)
    current = jax.tree.map(jnp.asarray, params)
    for g in grads:
        updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, current)
        current = optax.apply_updates(current, updates)
    expected = torch_adamw_reference(
        params, grads, [nanogpt_lr(t) for t in range(5)], 0.1, 0.9, 0.99, 1e-8, 1.0
    )
    for k in params:
        np.testing.assert_allclose(np.asarray(current[k]), expected[k], rtol=2e-5, atol=1e-6)
