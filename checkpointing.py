"""Orbax checkpoints: keep-N, async saves, newest-valid restore, and reshaping onto any mesh.

A checkpoint holds the train state and a small JSON `meta` item (the step and the config). The
data order is a pure function of the step, so the step is all the input state there is.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging


class CheckpointMismatchError(ValueError):
    """The workdir's checkpoint was made by a model of other shapes than the config's."""


def _path_str(path: tuple) -> str:
    """'params/dense_0/kernel' from a pytree key path, whatever the container types."""
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
    return "/".join(parts)


def _model_shapes(tree: Any) -> dict[str, tuple]:
    """Shapes of the parameters and model state (the model's shapes, not the optimizer's)."""
    if hasattr(tree, "keys"):  # a dict, or Orbax's item metadata (dict-like, not a dict)
        parts = {k: tree[k] for k in ("params", "model_state") if k in tree.keys()}
    else:
        parts = {"params": tree.params, "model_state": tree.model_state}
    return {
        _path_str(path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(parts)
        if hasattr(leaf, "shape")
    }


class NonFiniteStateError(FloatingPointError):
    """The state to be checkpointed holds NaN/Inf: it is not saved (older checkpoints stay)."""


def _leaf_fingerprint(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Two position-weighted sums of the raw bits (mod 2**32) and whether the leaf is finite.

    Integer sums are exact in any order, so the result is the same on every mesh: a checkpoint
    saved on 8 devices verifies when restored onto 1. Odd weights make any one changed element
    change both sums."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        bits = jax.random.key_data(x)  # uint32 words in a trailing axis
    elif x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    elif x.dtype.itemsize < 4:
        unsigned = {1: jnp.uint8, 2: jnp.uint16}[x.dtype.itemsize]
        bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    else:  # 4 bytes; 8-byte types (x64) get a trailing axis of two words
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    index = jnp.zeros(bits.shape, jnp.uint32)
    stride = 1
    for dim in reversed(range(bits.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, dim) * jnp.uint32(stride)
        stride = (stride * bits.shape[dim]) % 2**32
    w1 = index * jnp.uint32(0x9E3779B1) + jnp.uint32(0x7F4A7C15) | jnp.uint32(1)
    w2 = (index ^ jnp.uint32(0x5BD1E995)) * jnp.uint32(0x85EBCA6B) | jnp.uint32(1)
    mixed = bits ^ (bits >> 15)
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else True
    return jnp.sum(bits * w1), jnp.sum(mixed * w2), jnp.asarray(finite)


@jax.jit
def _tree_fingerprint(tree: Any) -> list:
    return [_leaf_fingerprint(x) for x in jax.tree.leaves(tree)]


def fingerprint(tree: Any) -> tuple[dict[str, str], list[str]]:
    """({leaf path: checksum of its bits}, [paths of leaves holding NaN/Inf]) of a (sharded,
    possibly multi-process) pytree of arrays, computed where the arrays live."""
    paths = [_path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
    values = _tree_fingerprint(tree)
    # Scalars are replicated on every device, so each process reads its own copy.
    host = [[int(np.asarray(v.addressable_data(0))) for v in leaf] for leaf in values]
    sums = {path: f"{a:08x}{b:08x}" for path, (a, b, _) in zip(paths, host, strict=True)}
    return sums, [path for path, (_, _, ok) in zip(paths, host, strict=True) if not ok]


def _all_processes_agree(ok: bool) -> bool:
    """True only if `ok` on every process (a damaged shard may be read by one process only)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


class Checkpointer:
    """A thin wrapper over `ocp.CheckpointManager` with the policies above."""

    def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                enable_async_checkpointing=async_save,
                create=True,
            ),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints on disk, oldest first."""
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any], force: bool = False) -> bool:
        """Saves (asynchronously unless disabled); Orbax deletes old ones only after it commits."""
        if step in self.all_steps():  # e.g. the final save at a checkpoint step: Orbax would raise
            return False
        # Orbax reads back flipped bytes without complaint: keep checksums to verify at restore.
        sums, nonfinite = fingerprint(state)
        if nonfinite:
            raise NonFiniteStateError(
                f"The state at step {step} holds NaN/Inf ({', '.join(nonfinite[:3])}); it is not "
                f"checkpointed and the older checkpoints in {self.directory} are kept. Lower the "
                "learning rate or clip gradients (config.grad_clip_norm)."
            )
        meta = {**meta, "checksums": sums}
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=force,
        )

    def check_shapes(self, step: int, abstract_state: Any) -> None:
        """Raises CheckpointMismatchError if the saved arrays' shapes differ from the target's."""
        saved = self._manager.item_metadata(step)["state"]
        saved_shapes = _model_shapes(saved)
        wanted = _model_shapes(abstract_state)
        diffs = [
            f"{name}: checkpoint {saved_shapes.get(name)} vs config {wanted.get(name)}"
            for name in sorted(set(saved_shapes) | set(wanted))
            if saved_shapes.get(name) != wanted.get(name)
        ]
        if diffs:
            raise CheckpointMismatchError(
                f"The checkpoint at step {step} in {self.directory} does not fit this config's "
                f"model ({len(diffs)} arrays differ, e.g. {'; '.join(diffs[:3])}). Use a new "
                "--workdir, or pass --config.restart=True to move the old checkpoints aside and "
                "start afresh."
            )

    def restore_latest(
        self, abstract_state: Any, set_aside_damaged: bool = True
    ) -> tuple[Any, dict[str, Any]] | None:
        """Restores the newest checkpoint that reads back whole and matches its checksums, onto
        `abstract_state`'s shardings; warns about and skips damaged ones. None if there is no
        checkpoint. Damaged ones newer than the restored one are moved to
        workdir/damaged_checkpoints/ (unless `set_aside_damaged` is False, for readers), so that
        the resumed run can save those steps again."""
        self._warn_about_unfinished_saves()
        damaged = []
        for step in sorted(self.all_steps(), reverse=True):
            problem = None
            try:
                self.check_shapes(step, abstract_state)
                restored = self._manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        meta=ocp.args.JsonRestore(),
                    ),
                )
            except CheckpointMismatchError:
                raise
            except Exception as e:  # unreadable metadata or arrays: a damaged checkpoint
                problem = f"{type(e).__name__}: {str(e)[:300]}"
            # Every process must take the same branch: the checksums are a collective computation.
            if _all_processes_agree(problem is None):
                problem = self._verify(restored["state"], restored["meta"])
            else:
                problem = problem or "unreadable on another process"
            if problem is not None:
                logging.warning(
                    "Checkpoint %d in %s is damaged or incomplete (%s); trying an older one.",
                    step,
                    self.directory,
                    problem,
                )
                damaged.append(step)
                continue
            if damaged and set_aside_damaged:
                self._set_aside(damaged)
            return restored["state"], restored["meta"]
        if self.all_steps():  # never silently start over on top of unreadable checkpoints
            raise CheckpointMismatchError(
                f"None of the checkpoints {self.all_steps()} in {self.directory} could be read "
                "(see the warnings above). Pass --config.restart=True to move them aside and "
                "start afresh, or use a new --workdir."
            )
        return None

    def _verify(self, state: Any, meta: dict[str, Any]) -> str | None:
        """None if the restored arrays match the checksums saved with them, else what differs."""
        saved = meta.get("checksums")
        if saved is None:  # a checkpoint from before checksums were kept
            return None
        sums, _ = fingerprint(state)
        bad = [path for path in sorted(set(saved) | set(sums)) if saved.get(path) != sums.get(path)]
        if bad:
            return f"checksum mismatch in {len(bad)} arrays, e.g. {', '.join(bad[:3])}"
        return None

    def _warn_about_unfinished_saves(self) -> None:
        """Names the saves cut off mid-write (Orbax ignores them and replaces them on re-save)."""
        if not os.path.isdir(self.directory):
            return
        for name in sorted(os.listdir(self.directory)):
            if ".orbax-checkpoint-tmp" in name:
                logging.warning(
                    "%s is a checkpoint save that never finished (cut off mid-write, or still "
                    "being written by another job); it is ignored.",
                    os.path.join(self.directory, name),
                )

    def _set_aside(self, steps: list[int]) -> None:
        """Moves damaged step directories to workdir/damaged_checkpoints/ (nothing is deleted)."""
        target_root = os.path.join(os.path.dirname(self.directory), "damaged_checkpoints")
        if jax.process_index() == 0:
            os.makedirs(target_root, exist_ok=True)
            for step in steps:
                target = os.path.join(target_root, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
                shutil.move(os.path.join(self.directory, str(step)), target)
                logging.warning("Moved the damaged checkpoint %d to %s.", step, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("jaxlab_set_aside_damaged_checkpoints")
        self._manager.reload()

    def wait(self) -> None:
        """Blocks until any asynchronous save has been committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()


def move_aside(workdir: str) -> str | None:
    """Renames an existing checkpoints directory (config.restart=True); nothing is deleted."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory) or not os.listdir(directory):
        return None
    target = f"{directory}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:
        shutil.move(directory, target)
    return target


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Writes the run's config next to its checkpoints (read back by sample.py, evaluate.py)."""
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """Reads back the config a run was trained with."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir} a jaxlab workdir?")
    with open(path) as f:
        return ml_collections.ConfigDict(_lists_to_tuples(json.load(f)))


def _lists_to_tuples(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _lists_to_tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_lists_to_tuples(v) for v in x)
    return x


def to_host(tree: Any) -> Any:
    """Fetches a (possibly sharded, multi-process) pytree to host numpy arrays."""
    from jax.experimental import multihost_utils

    if jax.process_count() > 1:
        tree = multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(np.asarray, tree)


def load_for_inference(
    workdir: str, step: int | None = None
) -> tuple[ml_collections.ConfigDict, Any]:
    """(config, params) of a run's latest (or given) checkpoint, placed on this host's devices."""
    config, state, _ = load_state_for_inference(workdir, step)
    return config, state.params


def load_state_for_inference(
    workdir: str, step: int | None = None
) -> tuple[ml_collections.ConfigDict, Any, int]:
    """(config, whole train state, checkpoint step) of a run's latest (or given) checkpoint;
    the state includes model_state (BatchNorm statistics), which evaluation needs."""
    import input_pipeline  # local imports: only inference needs the whole model stack
    import models
    import optim
    import sharding
    import train_state

    config = load_config(workdir)
    config.mesh_shape = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    config.parallelism = "jit"
    model = models.build_model(config)
    tx = optim.build_optimizer(config, optim.learning_rate_schedule(config, 1))
    example = input_pipeline.example_input(config)
    mesh = sharding.make_mesh(config, jax.local_devices())
    target = train_state.abstract_state(
        model, tx, example, mesh, sharding.logical_axis_rules(config), config.seed
    )
    checkpointer = Checkpointer(workdir, async_save=False)
    steps = checkpointer.all_steps()
    if not steps:
        raise FileNotFoundError(f"No checkpoints in {checkpointer.directory}.")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"No checkpoint at step {step} in {workdir}; have {steps}.")
    if step is None:
        restored = checkpointer.restore_latest(target, set_aside_damaged=False)
        if restored is None:
            raise FileNotFoundError(f"No readable checkpoint in {checkpointer.directory}.")
        state, step = restored[0], int(restored[1]["step"])
    else:
        state = checkpointer._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )["state"]
    checkpointer.close()
    return config, state, int(step)
