"""The train state, and its creation directly in sharded form (never whole on one device)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import struct
from jax.sharding import Mesh

import sharding


class TrainState(struct.PyTreeNode):
    """Everything a step changes, and everything a checkpoint holds."""

    step: jax.Array
    params: Any
    opt_state: Any
    model_state: Any  # non-parameter collections, e.g. {'batch_stats': ...}; {} for most models


def _init_boxed(
    model: nn.Module, tx: optax.GradientTransformation, example_input: np.ndarray, seed: int
) -> TrainState:
    """Initial state with parameters still boxed in their logical axis names."""
    params_rng, dropout_rng = jax.random.split(jax.random.key(seed))
    variables = model.init(
        {"params": params_rng, "dropout": dropout_rng}, jnp.asarray(example_input), train=False
    )
    params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k != "params"}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        model_state=model_state,
    )


def param_logical_axes(model: nn.Module, example_input: np.ndarray) -> dict[str, tuple]:
    """{'path/to/param': its logical axis names, e.g. ('vocab', 'embed')}, without allocating."""
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    boxed = jax.eval_shape(lambda: model.init(rngs, jnp.asarray(example_input), train=False))
    specs = nn.get_partition_spec(boxed["params"])
    flat = jax.tree_util.tree_leaves_with_path(
        specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    )
    return {"/".join(str(k.key) for k in path): tuple(spec) for path, spec in flat}


def state_shardings(
    model: nn.Module,
    tx: optax.GradientTransformation,
    example_input: np.ndarray,
    mesh: Mesh,
    rules: Any,
    seed: int = 0,
) -> Any:
    """Shardings of every state leaf, from the logical names, without allocating anything."""
    with nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(lambda: _init_boxed(model, tx, example_input, seed))
    return sharding.tree_shardings(boxed, mesh, rules)


def abstract_state(model, tx, example_input, mesh, rules, seed: int = 0) -> Any:
    """ShapeDtypeStructs carrying the target shardings: the restore target for Orbax."""
    shardings = state_shardings(model, tx, example_input, mesh, rules, seed)
    with nn.logical_axis_rules(rules):
        shapes = jax.eval_shape(lambda: nn.unbox(_init_boxed(model, tx, example_input, seed)))
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings
    )


def create_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    example_input: np.ndarray,
    mesh: Mesh,
    rules: Any,
    seed: int,
) -> TrainState:
    """Initialises the state with each device computing only its own shard (jit out_shardings)."""
    shardings = state_shardings(model, tx, example_input, mesh, rules, seed)
    # No mesh context here: out_shardings place every leaf, and some Flax layers (DenseGeneral)
    # call their initialisers on a flattened shape that a sharding constraint would reject.
    with nn.logical_axis_rules(rules):
        init = jax.jit(
            lambda: nn.unbox(_init_boxed(model, tx, example_input, seed)), out_shardings=shardings
        )
        return init()
