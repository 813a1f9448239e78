"""Orbax checkpoints: keep-N, async saves, newest-valid restore, and reshaping onto any mesh.

A checkpoint holds the train state (the `state` item: params, model_state, opt_state, step) and
a small JSON `meta` item (the step and a checksum per leaf, verified on restore); the config is
the workdir's config.json, not part of a checkpoint (docs/evaluation.md restores one with Orbax
alone). The data order is a pure function of the step, so the step is all the input state there
is.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from runtime import cli, distributed


class CheckpointMismatchError(cli.UserError, ValueError):
    """The workdir's checkpoint was made by a model of other shapes than the config's, or none
    of its checkpoints can be read."""


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


class CheckpointPathError(cli.UserError, ValueError):
    """The workdir's path cannot be round-tripped by the checkpoint library."""


class NonFiniteStateError(cli.UserError, FloatingPointError):
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


class Checkpointer:
    """A thin wrapper over `ocp.CheckpointManager` with the policies above."""

    def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True):
        check_path(workdir)
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
        checkpoint; CheckpointMismatchError if there are some but none is readable. Damaged ones
        newer than the restored one are moved to workdir/damaged_checkpoints/ (unless
        `set_aside_damaged` is False, for readers), so that the resumed run can save those
        steps again."""
        self._warn_about_unfinished_saves()
        damaged = []
        for step in sorted(self.all_steps(), reverse=True):
            restored, problem = self._restore_verified(step, abstract_state)
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
            return restored
        if self.all_steps():  # never silently start over on top of unreadable checkpoints
            raise CheckpointMismatchError(
                f"None of the checkpoints {self.all_steps()} in {self.directory} could be read "
                "(see the warnings above). Pass --config.restart=True to move them aside and "
                "start afresh, or use a new --workdir."
            )
        return None

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restores the checkpoint at `step` onto `abstract_state`'s shardings, verified as
        `restore_latest` verifies; FileNotFoundError if there is none at that step,
        CheckpointMismatchError if it is damaged or of other shapes."""
        if step not in self.all_steps():
            raise FileNotFoundError(
                f"No checkpoint at step {step} in {self.directory}; have {self.all_steps()}."
            )
        restored, problem = self._restore_verified(step, abstract_state)
        if problem is not None:
            raise CheckpointMismatchError(
                f"The checkpoint at step {step} in {self.directory} is damaged or incomplete "
                f"({problem}); choose another step of {self.all_steps()}."
            )
        return restored

    def _restore_verified(
        self, step: int, abstract_state: Any
    ) -> tuple[tuple[Any, dict[str, Any]] | None, str | None]:
        """((state, meta), None) if the checkpoint at `step` reads back whole and matches its
        checksums, else (None, what is wrong). Raises CheckpointMismatchError for other shapes.
        Collective: every process must call it for the same step."""
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
        if distributed.all_processes_agree(problem is None):
            problem = self._verify(restored["state"], restored["meta"])
        else:
            problem = problem or "unreadable on another process"
        if problem is not None:
            return None, problem
        return (restored["state"], restored["meta"]), None

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
        for name in unfinished_saves(self.directory):
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


def unfinished_saves(directory: str) -> list[str]:
    """Names of the step directories in `directory` that Orbax does not count as finished saves
    (still being written, or cut off mid-write), by Orbax's own test: a temporary name where
    saves are renamed into place (local disks), no commit marker where they are not (object
    stores). Empty if the directory does not exist."""
    if not os.path.isdir(directory):
        return []
    return sorted(ocp.path.step.tmp_checkpoints(directory))


def finished_steps(directory: str) -> list[int]:
    """Steps in `directory` whose saves Orbax counts as finished, oldest first (without opening a
    manager: for watching a run from another process)."""
    if not os.path.isdir(directory):
        return []
    return sorted(
        int(name)
        for name in os.listdir(directory)
        if name.isdigit() and ocp.path.step.is_checkpoint_finalized(os.path.join(directory, name))
    )


def check_path(workdir: str) -> None:
    """Refuses (CheckpointPathError) a workdir path that the checkpoint library cannot read
    back: Orbax matches checkpoint folders with glob patterns, so `[`, `]`, `*` and `?` in the
    path save checkpoints that a rerun then cannot find."""
    bad = sorted(set(os.path.abspath(workdir)) & set("[]*?"))
    if bad:
        raise CheckpointPathError(
            f"--workdir={workdir} contains {' '.join(bad)}, which the checkpoint library reads "
            "as a pattern (its checkpoints could not be restored); choose a path without them."
        )


def read_state_as_numpy(workdir: str, step: int | None = None) -> tuple[dict[str, Any], int]:
    """A run's saved train state as a tree of host numpy arrays, whatever mesh saved it, with no
    model or config needed: for comparing checkpoints bit for bit (tests, scripts/chaos.py).
    The newest step by default. Verified against the saved checksums like every restore;
    CheckpointMismatchError if damaged, FileNotFoundError if there is no such checkpoint. (To
    use a run, restore it with `experiment.restore_run`, which places it on a mesh.)"""
    checkpointer = Checkpointer(workdir, async_save=False)
    try:
        steps = checkpointer.all_steps()
        if not steps:
            raise FileNotFoundError(f"No checkpoints in {checkpointer.directory}.")
        step = steps[-1] if step is None or step < 0 else step
        if step not in steps:
            raise FileNotFoundError(
                f"No checkpoint at step {step} in {checkpointer.directory}; have {steps}."
            )
        manager = checkpointer._manager
        metadata = manager.item_metadata(step)["state"]
        # numpy leaves in the target make Orbax restore host arrays (np.empty allocates lazily)
        target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), metadata)
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
            ),
        )
        problem = checkpointer._verify(restored["state"], restored["meta"])
        if problem is not None:
            raise CheckpointMismatchError(
                f"The checkpoint at step {step} in {checkpointer.directory} is damaged ({problem})."
            )
        return restored["state"], step
    finally:
        checkpointer.close()
