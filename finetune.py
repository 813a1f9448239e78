"""Start a run from another run's checkpoint (`config.init_from`): pretraining -> fine-tuning.

Parameters are matched by path; those whose shape differs (a new classifier head, a new
vocabulary) or that the source lacks keep their fresh initialisation, and the list is reported.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util


def load_state_as_numpy(workdir: str, step: int = -1) -> tuple[dict[str, Any], int]:
    """Reads a run's saved train state as host numpy arrays (any mesh), newest step by default."""
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    steps = (
        sorted(int(d) for d in os.listdir(directory) if d.isdigit())
        if os.path.isdir(directory)
        else []
    )
    if not steps:
        raise FileNotFoundError(f"config.init_from.workdir={workdir!r} has no checkpoints.")
    step = steps[-1] if step < 0 else step
    if step not in steps:
        raise FileNotFoundError(f"No checkpoint at step {step} in {directory}; have {steps}.")
    path = os.path.join(directory, str(step), "state")
    with ocp.PyTreeCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(path).item_metadata.tree
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
        tree = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    return tree, step


def merge_params(fresh: Any, source: Any) -> tuple[Any, list[str], list[str]]:
    """Copies source params into `fresh` where paths and shapes agree.

    Returns (merged, copied paths, re-initialised paths).
    """
    flat_fresh = traverse_util.flatten_dict(fresh, sep="/")
    flat_source = traverse_util.flatten_dict(source, sep="/")
    merged, copied, reinit = {}, [], []
    for path, value in flat_fresh.items():
        other = flat_source.get(path)
        if other is not None and tuple(np.shape(other)) == tuple(value.shape):
            merged[path] = np.asarray(other, dtype=value.dtype)
            copied.append(path)
        else:
            merged[path] = value
            reinit.append(path)
    return traverse_util.unflatten_dict(merged, sep="/"), copied, reinit


def init_from(config: ml_collections.ConfigDict, state: Any, abstract_state: Any) -> Any:
    """Returns `state` with parameters (and, for mode='state', optimizer state and step)
    taken from `config.init_from.workdir`, placed with `abstract_state`'s shardings."""
    source, step = load_state_as_numpy(config.init_from.workdir, config.init_from.step)
    params, copied, reinit = merge_params(jax.device_get(state.params), source["params"])
    print(
        f"init_from {config.init_from.workdir} (step {step}): copied {len(copied)} parameter "
        f"arrays; re-initialised {len(reinit)}: {reinit}",
        flush=True,
    )
    logging.info("Re-initialised parameters: %s", reinit)
    new = state.replace(params=params)
    if config.init_from.mode == "state":
        if reinit:
            raise ValueError(
                "config.init_from.mode='state' needs identical parameter shapes; these differ: "
                f"{reinit}. Use mode='params'."
            )
        new = new.replace(
            opt_state=jax.tree.unflatten(
                jax.tree.structure(state.opt_state), jax.tree.leaves(source["opt_state"])
            ),
            step=np.asarray(source["step"]),
        )
    if "model_state" in source and source["model_state"]:
        merged, _, _ = merge_params(jax.device_get(state.model_state), source["model_state"])
        new = new.replace(model_state=merged)
    shardings = jax.tree.map(lambda a: a.sharding, abstract_state)
    return jax.device_put(new, shardings)
