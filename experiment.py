"""The one way to build a run from a config, and the one way to restore a workdir.

`build_run(config)` makes everything a training, benchmark or compilation needs, in order:
validated config -> data (or its description) -> model -> schedule and optimizer -> mesh and
logical axis rules -> abstract sharded state -> compiled steps. `restore_run(workdir)` reads a
run's config, input description and tokenizer from its workdir, builds the same run on the
devices at hand and restores its newest (or a given) checkpoint, verified, onto that mesh.
train.py, evaluate.py, sample.py, fine-tuning (`config.init_from`) and every tool go through
these two functions; nothing else builds an optimizer or an abstract state from a config.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh

import checkpointing
import config_validation
import data
import models
import optim
import sharding
import steps
import train_state
from runtime import workdir_files


@dataclasses.dataclass
class Run:
    """A run built from a config: its parts, shared by every command.

    datasets is None when the run was built from a description of its data (`restore_run`);
    `input_spec` and `tokenizer` describe the data either way.
    """

    config: ml_collections.ConfigDict  # validated, with model.vocab_size set from the tokenizer
    input_spec: data.InputSpec
    tokenizer: Any  # language models: the run's tokenizer (data.tokenization); else None
    datasets: Any  # data.Datasets, or None
    model: nn.Module
    total_steps: int
    schedule: optax.Schedule
    tx: optax.GradientTransformation
    mesh: Mesh
    rules: tuple[tuple[str, Any], ...]
    abstract_state: train_state.TrainState  # ShapeDtypeStructs carrying the target shardings
    compiled: steps.CompiledSteps  # the train, eval and predict steps, compiled for the mesh

    @property
    def num_params(self) -> int:
        """Number of trainable parameters (elements)."""
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.abstract_state.params))

    def init_state(self) -> train_state.TrainState:
        """Fresh global state from `config.seed`, created sharded over the mesh."""
        return train_state.create_train_state(
            self.model, self.tx, self.input_spec.example_input, self.mesh, self.rules,
            self.config.seed,
        )  # fmt: skip


def total_train_steps(config: ml_collections.ConfigDict, num_train_examples: int) -> int:
    """config.num_train_steps if set, else num_epochs over `num_train_examples`."""
    if config.num_train_steps is not None:
        return int(config.num_train_steps)
    return int(math.ceil(config.num_epochs * num_train_examples / config.batch_size))


def build_run(
    config: ml_collections.ConfigDict,
    *,
    datasets: Any = None,
    input_spec: data.InputSpec | None = None,
    tokenizer: Any = None,
    devices: Sequence[Any] | None = None,
    training: bool = True,
) -> Run:
    """Builds the run `config` describes (a copy of it; the caller's config is left alone).

    The data: `datasets` if given; else, with `input_spec` (and `tokenizer` for language models),
    no data is loaded; else `input_pipeline.get_datasets(config)` loads it. `devices` (default:
    every device of every process) form the mesh `config.mesh_shape` asks for. With
    `training=False` the training batch need not divide over the mesh (inference only).

    Raises config_validation.ConfigError for a config that cannot run on these devices.
    """
    config = ml_collections.ConfigDict(config.to_dict())
    devices = list(jax.devices() if devices is None else devices)
    config_validation.validate(config, num_devices=len(devices), training=training)
    if datasets is None and input_spec is None:
        import input_pipeline  # only runs that read data import the data libraries

        datasets = input_pipeline.get_datasets(config)
    if datasets is not None:
        input_spec, tokenizer = datasets.input_spec(), datasets.tokenizer
    if tokenizer is not None:
        config.model.vocab_size = tokenizer.vocab_size
    model = models.build_model(config)
    total_steps = total_train_steps(config, input_spec.num_train_examples)
    schedule = optim.learning_rate_schedule(config, total_steps)
    # Muon tells hidden matrices from the rest by their logical axis names.
    param_axes = None
    if config.optimizer == "muon":
        param_axes = train_state.param_logical_axes(model, input_spec.example_input)
    tx = optim.build_optimizer(config, schedule, param_axes)
    mesh = sharding.make_mesh(config, devices)
    rules = sharding.logical_axis_rules(config)
    abstract_state = train_state.abstract_state(
        model, tx, input_spec.example_input, mesh, rules, config.seed
    )
    optim.check_freeze(config, abstract_state.params)
    compiled = steps.steps_class(config)(
        config, model, tx, schedule, abstract_state, mesh, rules, input_spec.num_classes
    )
    return Run(config, input_spec, tokenizer, datasets, model, total_steps, schedule, tx, mesh,
               rules, abstract_state, compiled)  # fmt: skip


@dataclasses.dataclass
class Restored:
    """A workdir's run and one of its checkpoints, verified and placed on the run's mesh."""

    run: Run
    state: train_state.TrainState  # global arrays sharded as run.abstract_state says
    step: int  # the checkpoint's step

    @property
    def config(self) -> ml_collections.ConfigDict:
        return self.run.config

    @property
    def model(self) -> nn.Module:
        return self.run.model

    @property
    def tokenizer(self) -> Any:
        return self.run.tokenizer

    @property
    def params(self) -> Any:
        return self.state.params

    @property
    def variables(self) -> dict[str, Any]:
        """{'params': ..., **model_state}: what `model.apply` takes."""
        return {"params": self.state.params, **self.state.model_state}


# Inference on devices the run's own mesh does not fit: parameters sharded over all of them.
INFERENCE_MESH = {"data": 1, "fsdp": -1, "tensor": 1}


def restore_run(
    workdir: str,
    step: int | None = None,
    *,
    devices: Sequence[Any] | None = None,
    load_data: bool = False,
) -> Restored:
    """Restores `workdir`'s newest readable checkpoint (or the one at `step`) for inference.

    The run is rebuilt from workdir/config.json, input_spec.json and its tokenizer files, with
    'jit' parallelism on `devices` (default: all): on the run's own mesh_shape when it fits them,
    else with parameters sharded over all of them (INFERENCE_MESH). Never gathered on one
    device. Every checkpoint is verified (shapes, checksums); the newest damaged ones are
    skipped with a warning, exactly as when training resumes. `load_data=True` also builds the
    run's input pipelines (run.datasets).

    Raises FileNotFoundError (no such workdir, checkpoint or step) and
    checkpointing.CheckpointMismatchError (damaged, or of other shapes than the config).
    """
    config = workdir_files.load_config(workdir)
    config.parallelism = "jit"
    devices = list(jax.devices() if devices is None else devices)
    try:
        sharding.resolve_mesh_shape(dict(config.mesh_shape), len(devices))
    except sharding.MeshError:
        config.mesh_shape = ml_collections.ConfigDict(INFERENCE_MESH)
    tokenizer = None
    if config.task == "lm" and config.dataset != "synthetic":  # synthetic tokens: no tokenizer
        from data import tokenization

        tokenizer = tokenization.load_tokenizer(workdir)
    if load_data:
        run = build_run(config, devices=devices, training=False)
        if tokenizer is not None and run.tokenizer != tokenizer:
            raise workdir_files.WorkdirError(
                f"{workdir} was trained with a {tokenizer.describe()}, but its data now gives "
                f"a {run.tokenizer.describe()}: evaluating on it would score other text."
            )
    else:
        spec = workdir_files.load_input_spec(workdir)
        run = build_run(
            config, input_spec=spec, tokenizer=tokenizer, devices=devices, training=False
        )
    checkpointer = checkpointing.Checkpointer(workdir, async_save=False)
    try:
        if step is None:
            restored = checkpointer.restore_latest(run.abstract_state, set_aside_damaged=False)
            if restored is None:
                raise FileNotFoundError(f"No checkpoints in {checkpointer.directory}.")
        else:
            restored = checkpointer.restore(step, run.abstract_state)
    finally:
        checkpointer.close()
    state, meta = restored
    return Restored(run=run, state=state, step=int(meta["step"]))
