"""Optimizer and learning-rate schedule from the config (optax).

Every optimizer and schedule is optax's; this file only chooses and configures them, and
decides which parameters are weight-decayed (matrices, never biases or normalization scales)
and, for Muon, which parameters are matrices to orthogonalize. docs/training.md has the table
of choices with their sources.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from flax import traverse_util
from optax.contrib import _muon as optax_muon

import config_validation


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """The learning rate at each update count (0-based), from `config.lr_schedule`.

    Every schedule starts with `warmup_steps` of linear warmup from lr/(warmup+1), so update t
    gets lr*(t+1)/(warmup+1) exactly as nanoGPT's get_lr (starting at 0 would waste the first
    update). Then, until `decay_steps` (None: `total_steps`; counted from step 0, warmup
    included), and `min_learning_rate` after it:
      'cosine': cosine decay from lr to min_learning_rate (nanoGPT; Loshchilov & Hutter 2017);
      'linear': linear decay from lr to min_learning_rate;
      'wsd': warmup-stable-decay: lr held constant, then decayed to min_learning_rate over the
        last `decay_fraction` of the decay_steps, linearly or by 1 - sqrt (Hu et al. 2024,
        MiniCPM, arXiv:2404.06395; Hägele et al. 2024, arXiv:2405.18392, whose 1-sqrt
        cooldown is lr * (1 - sqrt((t - t_0) / T_cooldown)));
      'constant': lr after the warmup (decay_steps and min_learning_rate unused).
    Returns an optax schedule: a jittable function of the int32 count giving a float32 rate.
    """
    lr, warmup = float(config.learning_rate), int(config.warmup_steps)
    warmup_schedule = optax.linear_schedule(lr / (warmup + 1), lr, warmup)
    end = max(total_steps if config.decay_steps is None else int(config.decay_steps), warmup + 1)
    min_lr = float(config.min_learning_rate)
    if config.lr_schedule == "constant":
        return optax.constant_schedule(lr) if warmup == 0 else warmup_schedule
    if config.decay_steps is not None and int(config.decay_steps) > total_steps:
        # Legitimate (a run stopped early on purpose), but a shortened preset run otherwise
        # never decays (e.g. 'wsd' never reaches its cooldown) without a word.
        logging.warning(
            "config.decay_steps=%d is past the run's %d steps: the '%s' schedule will not "
            "finish its decay (--config.decay_steps=%d or None ends it with the run).",
            int(config.decay_steps), total_steps, config.lr_schedule, total_steps,
        )  # fmt: skip
    if config.lr_schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=lr / (warmup + 1),
            peak_value=lr,
            warmup_steps=warmup,
            decay_steps=end,
            end_value=min_lr,
        )
    if config.lr_schedule == "linear":
        decay = optax.linear_schedule(lr, min_lr, end - warmup)
        return optax.join_schedules([warmup_schedule, decay], [warmup])
    if config.lr_schedule == "wsd":
        start = max(warmup, end - round(float(config.decay_fraction) * end))
        if config.decay_shape == "linear":
            cooldown = optax.linear_schedule(lr, min_lr, end - start)
        else:  # '1-sqrt' (optax has no such schedule)
            cooldown = _one_minus_sqrt_schedule(lr, min_lr, end - start)
        stable = optax.constant_schedule(lr)
        return optax.join_schedules([warmup_schedule, stable, cooldown], [warmup, start])
    raise ValueError(
        f"config.lr_schedule={config.lr_schedule!r}: choose one of {config_validation.SCHEDULES}."
    )


def _one_minus_sqrt_schedule(init: float, end: float, steps: int) -> optax.Schedule:
    """init + (end - init) * sqrt(t / steps) for t in [0, steps], then `end` (Hägele et al.
    2024, eq. for the '1-sqrt' cooldown, written towards a floor `end` instead of 0)."""

    def schedule(count: jax.Array) -> jax.Array:
        frac = jnp.clip(count / max(steps, 1), 0.0, 1.0)
        return init + (end - init) * jnp.sqrt(frac)

    return schedule


def _decay_mask(params: Any) -> Any:
    """Weight decay on weights (kernels, embeddings), never on biases or normalization scales,
    whatever their rank (attention biases are [heads, head_dim]): decided by what a parameter
    is, its name, as nanoGPT and Flax's examples do."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({path: path[-1] not in NO_DECAY for path in flat})


# Parameter names (the last path element) that are never weight-decayed.
NO_DECAY = ("bias", "scale")

# Logical axis names of output layers (the token or class logits), which Muon leaves to AdamW.
OUTPUT_AXES = ("vocab", "classes")


def muon_dimension_numbers(
    path: str, axes: Sequence[str | None]
) -> optax.contrib.MuonDimensionNumbers | None:
    """How Muon sees the parameter at `path` ('h_0/attn/query/kernel') with logical axis names
    `axes` (train_state.param_logical_axes): as one matrix (reduction axes -> output axes,
    other axes batched), or None: not a hidden matrix, left to AdamW.

    Muon orthogonalizes the update of a linear map's weight, so it takes the `kernel`s of the
    hidden layers only; embeddings (lookup tables, not linear maps), output layers (an axis
    named 'vocab' or 'classes'), biases, scales and anything of rank < 2 go to AdamW, as Jordan
    (2024, "Muon: An optimizer for hidden layers") and Liu et al. (2025, arXiv:2502.16982) do.
    A 3-D attention kernel is the linear map it implements, not a stack of per-head matrices:
    a query/key/value kernel [embed, heads, head_dim] is the map embed -> heads*head_dim (its
    leading 'embed' axis is the input), the output kernel [heads, head_dim, embed] the map
    heads*head_dim -> embed (Flax's [inputs..., outputs] layout: the last axis is the output).
    That is exactly the 2-D [embed, embed] weight of nanoGPT's or modded-nanogpt's q, k, v and
    c_proj, so the update does not depend on how the code splits heads. A leading 'layers' axis
    (GPT scan_layers) is a batch axis: each layer's matrix is orthogonalized on its own; so is
    an 'expert' axis (the stacked experts of an MoE layer, models/moe.py): each expert's matrix.
    """
    if path.rsplit("/", 1)[-1] != "kernel" or any(a in OUTPUT_AXES for a in axes):
        return None
    dims = [i for i, a in enumerate(axes) if a not in ("layers", "expert")]
    if len(dims) < 2:
        return None
    if axes[dims[0]] == "embed":
        return optax.contrib.MuonDimensionNumbers(tuple(dims[:1]), tuple(dims[1:]))
    return optax.contrib.MuonDimensionNumbers(tuple(dims[:-1]), tuple(dims[-1:]))


def _muon(
    config: ml_collections.ConfigDict, schedule: optax.Schedule, param_axes: Mapping[str, Any]
) -> optax.GradientTransformation:
    """Muon on the hidden matrices (muon_dimension_numbers), optax.adamw on the rest, both with
    `schedule` and decoupled weight decay on matrices only (_decay_mask).

    The Muon part is the chain optax.contrib.muon builds for its matrices (scale_by_muon ->
    scale_by_shape -> add_decayed_weights -> scale_by_learning_rate, optax 0.2.8), here beside
    an optax.adamw of our own instead of the AdamW inside optax.contrib.muon, because that one
    (1) labels parameters with a jax.tree.map that enters Flax's boxed (logically named)
    parameters, leaving `Partitioned(MaskedNode)` leaves in the optimizer state that the state's
    shardings cannot follow, (2) decays every AdamW parameter or none (no mask: biases and
    scales would be decayed), and (3) shares Muon's Nesterov momentum with AdamW.
    tests/test_optim.py checks the result equals optax.contrib.muon on matrices and
    optax.adamw on the rest."""
    dims = {path: muon_dimension_numbers(path, axes) for path, axes in param_axes.items()}

    def labels(params: Any) -> Any:
        flat = traverse_util.flatten_dict(params, sep="/")
        return traverse_util.unflatten_dict(
            {p: "adamw" if _dims_of(dims, p) is None else "muon" for p in flat}, sep="/"
        )

    def dimension_numbers(updates: Any) -> Any:
        # Called on the Muon part only, whose AdamW leaves are optax MaskedNodes.
        flat = traverse_util.flatten_dict(updates, sep="/")
        return traverse_util.unflatten_dict(
            {
                p: v if isinstance(v, optax.transforms.MaskedNode) else _dims_of(dims, p)
                for p, v in flat.items()
            },
            sep="/",
        )

    muon = optax.chain(
        optax.contrib.scale_by_muon(
            ns_steps=config.muon_ns_steps,
            beta=config.muon_momentum,
            nesterov=True,
            weight_dimension_numbers=dimension_numbers,
        ),
        # Not exported by optax.contrib, but the very transformation its muon() applies.
        optax_muon.scale_by_shape(
            weight_dimension_numbers=dimension_numbers, consistent_rms=config.muon_update_rms
        ),
        optax.add_decayed_weights(config.weight_decay, _decay_mask),
        optax.scale_by_learning_rate(schedule),
    )
    adamw = _adamw(config, schedule, config.weight_decay)
    return optax.multi_transform({"muon": muon, "adamw": adamw}, labels)


def _adamw(
    config: ml_collections.ConfigDict, schedule: optax.Schedule, weight_decay: float
) -> optax.GradientTransformation:
    """optax.adamw with the config's betas and eps, decaying matrices only (_decay_mask)."""
    return optax.adamw(
        schedule,
        b1=config.b1,
        b2=config.b2,
        eps=config.eps,
        weight_decay=weight_decay,
        mask=_decay_mask,
    )


def _dims_of(dims: Mapping[str, Any], path: str) -> Any:
    if path not in dims:
        raise ValueError(
            f"Parameter {path!r} has no logical axis names (param_axes lists {len(dims)} "
            "others): build_optimizer's param_axes must come from the same model."
        )
    return dims[path]


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
    config: ml_collections.ConfigDict,
    schedule: optax.Schedule,
    param_axes: Mapping[str, Sequence[str | None]] | None = None,
) -> optax.GradientTransformation:
    """Clipping -> `config.optimizer` with decoupled weight decay -> optional freezing and NaN
    skipping. Every optimizer scales its update by `schedule` and decays matrices only
    (_decay_mask); decoupled decay removes lr * weight_decay * p per update (AdamW, Loshchilov &
    Hutter 2019), except SGD's, which is PyTorch's coupled L2 (wd * p added to the gradient).

    'adamw'/'adam': optax.adamw (b1, b2, eps; 'adam' without decay). 'lion': optax.lion (b1,
    b2; Chen et al. 2023 use b2=0.99, a 3-10x smaller lr and larger decay than AdamW).
    'adafactor': optax.adafactor (Shazeer & Stern 2018; factored second moments for axes of
    >= 128, update clipping 1.0; `adafactor_multiply_by_parameter_scale` for the paper's
    relative step). 'muon': optax.contrib.muon on hidden matrices and AdamW on the rest (see
    _muon and muon_dimension_numbers); needs `param_axes`. 'sgd': optax.sgd with Nesterov
    momentum b1.

    param_axes: {'path/to/param': logical axis names} (train_state.param_logical_axes), needed
    by 'muon' only. Raises ValueError for an unknown optimizer or a missing `param_axes`.
    """
    wd = config.weight_decay
    if config.optimizer in ("adamw", "adam"):
        tx = _adamw(config, schedule, wd if config.optimizer == "adamw" else 0.0)
    elif config.optimizer == "lion":
        tx = optax.lion(schedule, b1=config.b1, b2=config.b2, weight_decay=wd, mask=_decay_mask)
    elif config.optimizer == "adafactor":
        tx = optax.adafactor(
            schedule,
            multiply_by_parameter_scale=config.adafactor_multiply_by_parameter_scale,
            # optax adds weight_decay_rate * p after the learning rate: scaled by the schedule
            # here, so the decay is lr * wd * p as for every other optimizer.
            weight_decay_rate=(lambda count: wd * schedule(count)) if wd > 0 else None,
            weight_decay_mask=_decay_mask,
        )
    elif config.optimizer == "muon":
        if param_axes is None:
            raise ValueError(
                "config.optimizer='muon' needs param_axes (train_state.param_logical_axes) to "
                "tell hidden matrices from the rest."
            )
        tx = _muon(config, schedule, param_axes)
    elif config.optimizer == "sgd":
        tx = optax.chain(
            optax.add_decayed_weights(wd, mask=_decay_mask),
            optax.sgd(schedule, momentum=config.b1 or None, nesterov=True),
        )
    else:
        raise ValueError(
            f"config.optimizer={config.optimizer!r}: choose one of {config_validation.OPTIMIZERS}."
        )
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
