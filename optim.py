"""Optimizer and learning-rate schedule from the config (optax)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import optax
from flax import traverse_util


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup, then cosine decay to `min_learning_rate` (nanoGPT's get_lr) or constant."""
    warmup = int(config.warmup_steps)
    if config.lr_schedule == "constant":
        if warmup == 0:
            return optax.constant_schedule(config.learning_rate)
        return optax.linear_schedule(
            config.learning_rate / (warmup + 1), config.learning_rate, warmup
        )
    decay_steps = total_steps if config.decay_steps is None else int(config.decay_steps)
    # Warmup from lr/(warmup+1), so step t gets lr*(t+1)/(warmup+1) exactly as nanoGPT's get_lr
    # (starting at 0 would waste the first update).
    return optax.warmup_cosine_decay_schedule(
        init_value=config.learning_rate / (warmup + 1),
        peak_value=config.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(decay_steps, warmup + 1),
        end_value=config.min_learning_rate,
    )


def _decay_mask(params: Any) -> Any:
    """Weight decay on matrices and kernels only, never biases, norm scales or 1-D vectors."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def _frozen_labels(params: Any, freeze: Sequence[str]) -> Any:
    """'frozen' for parameters whose path ('block_0/attn/...') starts with a prefix in `freeze`."""
    flat = traverse_util.flatten_dict(params, sep="/")
    labels = {
        path: "frozen" if any(path.startswith(prefix) for prefix in freeze) else "trained"
        for path in flat
    }
    return traverse_util.unflatten_dict(labels, sep="/")


def build_optimizer(
    config: ml_collections.ConfigDict, schedule: optax.Schedule
) -> optax.GradientTransformation:
    """Clipping -> optimizer with decoupled weight decay -> optional freezing and NaN skipping."""
    if config.optimizer in ("adamw", "adam"):
        tx = optax.adamw(
            schedule,
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay if config.optimizer == "adamw" else 0.0,
            mask=_decay_mask,
        )
    elif config.optimizer == "sgd":
        tx = optax.chain(
            optax.add_decayed_weights(config.weight_decay, mask=_decay_mask),
            optax.sgd(schedule, momentum=config.b1 or None, nesterov=True),
        )
    else:
        raise ValueError(f"config.optimizer={config.optimizer!r}: use 'adamw', 'adam' or 'sgd'.")
    if config.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
    freeze = tuple(config.init_from.freeze)
    if freeze:
        tx = optax.multi_transform(
            {"trained": tx, "frozen": optax.set_to_zero()},
            lambda params: _frozen_labels(params, freeze),
        )
    if config.skip_nonfinite_steps:
        # Skips (and counts) updates whose gradients hold NaN/Inf instead of applying them.
        tx = optax.apply_if_finite(tx, max_consecutive_errors=1_000_000)
    return tx


def nonfinite_count(opt_state: Any) -> Any:
    """How many updates `apply_if_finite` has skipped so far (0 when it is not in use)."""
    if isinstance(opt_state, optax.ApplyIfFiniteState):
        return opt_state.total_notfinite
    return 0
