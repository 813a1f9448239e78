"""Optimizer and learning-rate schedule from the config (optax)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import optax
from flax import traverse_util

import config_validation


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
    """Weight decay on weights (kernels, embeddings), never on biases or normalization scales,
    whatever their rank (attention biases are [heads, head_dim]): decided by what a parameter
    is, its name, as nanoGPT and Flax's examples do."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({path: path[-1] not in NO_DECAY for path in flat})


# Parameter names (the last path element) that are never weight-decayed.
NO_DECAY = ("bias", "scale")


def freeze_prefixes(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """config.init_from.freeze as parameter path prefixes, in any form typed on a command line:
    ('dense_0', 'dense_1'), 'dense_0,dense_1', '(dense_0, dense_1)', "['h_0/', 'wte']"."""
    items = config.init_from.freeze
    items = (items,) if isinstance(items, str) else tuple(items)
    prefixes = []
    for item in items:
        for part in str(item).strip("()[] ").split(","):
            part = part.strip().strip("'\"").strip().rstrip("/")
            if part:
                prefixes.append(part)
    return tuple(prefixes)


def _is_under(path: str, prefix: str) -> bool:
    """Whether parameter `path` ('h_0/attn/query/kernel') lies under `prefix` ('h_0', 'h_0/attn'),
    whole path segments only ('h_1' is not under 'h_10')."""
    return path == prefix or path.startswith(prefix + "/")


def _frozen_labels(params: Any, freeze: Sequence[str]) -> Any:
    """'frozen' for parameters under a prefix in `freeze`, else 'trained'."""
    flat = traverse_util.flatten_dict(params, sep="/")
    labels = {
        path: "frozen" if any(_is_under(path, prefix) for prefix in freeze) else "trained"
        for path in flat
    }
    return traverse_util.unflatten_dict(labels, sep="/")


def check_freeze(config: ml_collections.ConfigDict, params: Any) -> None:
    """Raises config_validation.ConfigError naming every freeze prefix that matches no
    parameter, and the paths that exist (a typo would otherwise freeze nothing, silently)."""
    paths = list(traverse_util.flatten_dict(params, sep="/"))
    unmatched = [p for p in freeze_prefixes(config) if not any(_is_under(q, p) for q in paths)]
    if unmatched:
        tops = sorted({q.split("/")[0] for q in paths})
        raise config_validation.ConfigError(
            f"config.init_from.freeze: {unmatched} match no parameter. Prefixes are parameter "
            f"paths or their leading segments; the model's top level: {tops}; e.g. "
            f"{paths[:3]}."
        )


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
    freeze = freeze_prefixes(config)
    if freeze:
        tx = optax.multi_transform(
            {"trained": tx, "frozen": optax.set_to_zero()},
            lambda params: _frozen_labels(params, freeze),
        )
    if config.skip_nonfinite_steps:
        # Skips (and counts) updates whose gradients hold NaN/Inf instead of applying them.
        tx = optax.apply_if_finite(tx, max_consecutive_errors=1_000_000)
    return tx


def schedule_count(opt_state: Any, default: Any) -> Any:
    """The step count at which the optimizer evaluates its learning-rate schedule in the next
    update (optax's ScaleByScheduleState inside `opt_state`); `default` if it has none."""
    is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=is_schedule) if is_schedule(s)]
    return found[0].count if found else default


def nonfinite_count(opt_state: Any) -> Any:
    """How many updates `apply_if_finite` has skipped so far (0 when it is not in use)."""
    if isinstance(opt_state, optax.ApplyIfFiniteState):
        return opt_state.total_notfinite
    return 0
