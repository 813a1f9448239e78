"""Start a run from another run's checkpoint (`config.init_from`): pretraining -> fine-tuning.
The source may also be a Hugging Face GPT-2 directory: it is imported here, when the run starts
(configs only name it), once (hf/importing.py) into a cached workdir, and used from there.

The source is restored with `experiment.restore_run`, the same verified path that resuming and
every inference command use (a damaged checkpoint is skipped or refused exactly as on resume).
Parameters are matched by path; those whose shape differs (a new classifier head, a new
vocabulary) or that the source lacks keep their fresh initialisation, and the list is reported.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from absl import logging
from flax import traverse_util

import config_validation
import experiment
import train_state
from hf import importing
from runtime import distributed


def merge_params(
    fresh: Any, source: Any, exclude: frozenset[str] = frozenset()
) -> tuple[Any, list[str], list[str]]:
    """Copies source params into `fresh` where paths and shapes agree (and the path is not in
    `exclude`).

    Returns (merged, copied paths, re-initialised paths).
    """
    flat_fresh = traverse_util.flatten_dict(fresh, sep="/")
    flat_source = traverse_util.flatten_dict(source, sep="/")
    merged, copied, reinit = {}, [], []
    for path, value in flat_fresh.items():
        other = flat_source.get(path)
        if (
            other is not None
            and path not in exclude
            and tuple(np.shape(other)) == tuple(value.shape)
        ):
            merged[path] = np.asarray(other, dtype=value.dtype)
            copied.append(path)
        else:
            merged[path] = value
            reinit.append(path)
    return traverse_util.unflatten_dict(merged, sep="/"), copied, reinit


def init_from(run: experiment.Run, state: train_state.TrainState) -> train_state.TrainState:
    """Returns `state` with parameters (and, for mode='state', optimizer state and step) taken
    from `run.config.init_from.workdir`'s checkpoint, placed with `run.abstract_state`'s
    shardings.

    Raises FileNotFoundError (no such run or step), checkpointing.CheckpointMismatchError (its
    checkpoints are damaged), config_validation.ConfigError (mode='state' with other shapes)
    and hf.gpt2_files.HFConvertError (a Hugging Face directory that does not import).
    """
    spec = run.config.init_from
    devices = list(run.mesh.devices.flat)
    # A Hugging Face GPT-2 directory is imported now (the config only names it), once, into a
    # cached workdir that later runs reuse (hf/importing.py); a jaxlab workdir is used as is.
    source_workdir = importing.imported_workdir(spec.workdir)
    source = experiment.restore_run(source_workdir, spec.step, devices=devices)
    source_state = distributed.to_host(source.state)
    fresh = distributed.to_host(state)
    # Rows of vocabulary-indexed parameters (embeddings, output layers) mean tokens: with
    # another tokenizer they would mean other tokens, so they start afresh instead.
    vocab_params, why = frozenset(), ""
    if None not in (run.tokenizer, source.tokenizer) and run.tokenizer != source.tokenizer:
        axes = train_state.param_logical_axes(run.model, run.input_spec.example_input)
        vocab_params = frozenset(path for path, names in axes.items() if "vocab" in names)
        why = (f" (the source's {source.tokenizer.describe()} differs from this run's "
               f"{run.tokenizer.describe()}: its vocabulary rows are not copied)")  # fmt: skip
    params, copied, reinit = merge_params(fresh.params, source_state.params, vocab_params)
    if jax.process_index() == 0:
        print(
            f"init_from {source_workdir} (step {source.step}): copied {len(copied)} parameter "
            f"arrays; re-initialised {len(reinit)}: {reinit}{why}",
            flush=True,
        )
    logging.info("Re-initialised parameters: %s", reinit)
    new = fresh.replace(params=params)
    if spec.mode == "state":
        if reinit:
            raise config_validation.ConfigError(
                "config.init_from.mode='state' needs identical parameter shapes; these differ: "
                f"{reinit}. Use mode='params'."
            )
        new = new.replace(
            opt_state=jax.tree.unflatten(
                jax.tree.structure(fresh.opt_state), jax.tree.leaves(source_state.opt_state)
            ),
            step=np.asarray(source_state.step),
        )
    if source_state.model_state:
        merged, _, _ = merge_params(fresh.model_state, source_state.model_state)
        new = new.replace(model_state=merged)
    shardings = jax.tree.map(lambda a: a.sharding, run.abstract_state)
    return jax.device_put(new, shardings)
