"""Checks a config before anything compiles; every error names the field and the fix."""

from __future__ import annotations

import difflib
import inspect
import math
from typing import Any

import jax
import ml_collections

import models
import sharding
from configs import base
from runtime import cli


class ConfigError(cli.UserError, ValueError):
    """The config asks for something impossible or misspelt."""


OPTIMIZERS = ("adamw", "adam", "lion", "adafactor", "muon", "sgd")  # optim.build_optimizer
SCHEDULES = ("cosine", "linear", "wsd", "constant")  # optim.learning_rate_schedule
WANDB_MODES = ("disabled", "offline", "online")  # tracking.py

_CHOICES = {
    "task": ("classification", "lm"),
    "optimizer": OPTIMIZERS,
    "lr_schedule": SCHEDULES,
    "decay_shape": ("linear", "1-sqrt"),
    "parallelism": ("jit", "pmap"),
    "dtype": ("float32", "bfloat16", "float16"),
    "wandb.mode": WANDB_MODES,  # ConfigDict resolves the dotted key
}
_POSITIVE = ("batch_size", "eval_batch_size", "grad_accum_steps", "steps_per_dispatch",
             "log_every_steps", "eval_every_steps", "checkpoint_every_steps",
             "keep_checkpoints", "muon_ns_steps", "muon_update_rms")  # fmt: skip
_POSITIVE_IF_SET = ("num_train_steps", "decay_steps", "eval_steps", "tokenizer_vocab_size")
_NON_NEGATIVE = ("learning_rate", "min_learning_rate", "warmup_steps", "weight_decay",
                 "grad_clip_norm", "label_smoothing", "z_loss")  # fmt: skip


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _check_keys(config: Any, schema: Any, prefix: str) -> None:
    """Unknown keys and wrong types, recursively, against configs/base.py."""
    for key in config.keys():
        if key not in schema:
            raise ConfigError(
                f"Unknown config field {prefix}{key}.{_suggest(key, list(schema.keys()))} "
                "Every field is defined in configs/base.py."
            )
        value, default = config[key], schema[key]
        if prefix == "" and key == "model":
            continue  # model fields depend on the model family: see _check_model
        if isinstance(default, ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict | dict):
                raise ConfigError(f"config.{prefix}{key} must be a group of fields, got {value!r}.")
            _check_keys(value, default, f"{prefix}{key}.")
            continue
        if not _same_kind(value, default):
            raise ConfigError(
                f"config.{prefix}{key}={value!r} has type {type(value).__name__}; "
                f"expected {type(default).__name__} (like the default {default!r})."
            )


def _same_kind(value: Any, default: Any) -> bool:
    """Whether `value` may replace `default` (ints may stand for floats, bools for nothing else)."""
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, int | float)
    if isinstance(default, int | str):
        return isinstance(value, type(default))
    return True


def _check_model(config: ml_collections.ConfigDict) -> None:
    """The model file exists, the config sets only its fields, it has what the task needs, and
    the module accepts their values (its `check_fields()`, where it has one)."""
    name = config.model.get("name")
    try:
        fields = models.constructor_fields(name)
        task = models.model_task(name)
    except models.UnknownModelError as e:
        raise ConfigError(f"{e}{_suggest(str(name), models.available_models())}") from e
    for key in config.model.keys():
        if key != "name" and key not in fields:
            raise ConfigError(
                f"config.model.{key} is not a field of the {name!r} model.{_suggest(key, fields)} "
                f"Its fields: {sorted(fields - {'dtype'})}."
            )
    if task != config.task:
        raise ConfigError(
            f"config.model.name={name!r} is a model for task {task!r} (models/{name}.py), but "
            f"config.task={config.task!r}; set config.task={task!r} or choose another model."
        )
    missing = [f for f in ("dtype", *models.TASK_FIELDS[task]) if f not in fields]
    if missing:
        raise ConfigError(
            f"models/{name}.py's Model lacks the field(s) {missing} that a {task!r} model needs "
            "(see models/__init__.py)."
        )
    # The model's own checks of its field values (models/__init__.py's `check_fields`), here
    # rather than at its first trace: a bad value is then a ConfigError, one ERROR line.
    check_fields = getattr(models.build_model(config), "check_fields", None)
    if check_fields is not None:
        try:
            check_fields()
        except models.ModelConfigError as e:
            raise ConfigError(str(e)) from e


def _check_packing(config: ml_collections.ConfigDict) -> None:
    """config.packing (documents packed into windows, data/text_windows.py) needs language-model
    text prepared with document separators and a model that takes segment ids. (Whether the
    prepared data has separators is checked where it is opened, input_pipeline.py.)"""
    if not config.get("packing", False):
        return
    if config.task != "lm" or config.dataset == "synthetic":
        raise ConfigError(
            "config.packing=True packs the documents of prepared language-model text; "
            f"config.task={config.task!r} with config.dataset={config.dataset!r} has none: "
            "set config.packing=False."
        )
    name = config.model.get("name")
    if "segment_ids" not in inspect.signature(models.model_class(name).__call__).parameters:
        raise ConfigError(
            f"config.packing=True needs a model that keeps attention inside each document (its "
            f"__call__ takes segment_ids, as gpt's does); the {name!r} model does not: set "
            "config.packing=False."
        )


def _check_axis_rules(config: ml_collections.ConfigDict) -> None:
    """Every override in config.logical_axis_rules names a logical axis the models use and maps
    it to mesh axes (or None); an override that matches nothing would silently do nothing."""
    known = [name for name, _ in sharding.DEFAULT_RULES]
    for rule in config.logical_axis_rules or ():
        if not isinstance(rule, tuple | list) or len(rule) != 2:
            raise ConfigError(
                f"config.logical_axis_rules entry {rule!r} must be a pair (logical axis, mesh "
                "axes), e.g. --config.logical_axis_rules=\"(('embed', None),)\"."
            )
        name, axes = rule
        if name not in known:
            raise ConfigError(
                f"config.logical_axis_rules names the logical axis {name!r}, which no model "
                f"uses.{_suggest(str(name), known)} Known axes: {known}."
            )
        for axis in (axes,) if axes is None or isinstance(axes, str) else tuple(axes):
            if axis is not None and axis not in sharding.MESH_AXES:
                raise ConfigError(
                    f"config.logical_axis_rules maps {name!r} to {axis!r}, not a mesh axis; use "
                    f"one of {sharding.MESH_AXES} or None."
                )


def validate(
    config: ml_collections.ConfigDict, num_devices: int | None = None, training: bool = True
) -> None:
    """Raises ConfigError naming the field and the fix for the first problem found.

    num_devices: the devices the mesh will span (default: all). With training=False (a run
    restored for inference) the training batch need not divide over them."""
    _check_keys(config, base.get_config(), "")
    tokenizers = ("char", "byte", "sentencepiece", "bpe")
    if config.tokenizer not in tokenizers and not config.tokenizer.endswith(".json"):
        raise ConfigError(
            f"config.tokenizer={config.tokenizer!r}: choose one of {tokenizers} or the path of "
            "a Hugging Face tokenizer.json."
        )
    for key, choices in _CHOICES.items():
        if config[key] not in choices:
            raise ConfigError(f"config.{key}={config[key]!r}: choose one of {choices}.")
    for key in _POSITIVE:
        if config[key] <= 0:
            raise ConfigError(f"config.{key}={config[key]} must be positive.")
    for key in _NON_NEGATIVE:
        if config[key] < 0:
            raise ConfigError(f"config.{key}={config[key]} must not be negative.")
    if config.num_train_steps is None and config.num_epochs <= 0:
        raise ConfigError("Set config.num_train_steps or config.num_epochs to a positive number.")
    for key in _POSITIVE_IF_SET:
        if config[key] is not None and config[key] <= 0:
            raise ConfigError(f"config.{key}={config[key]} must be positive (or unset: None).")
    if config.init_from.step is not None and config.init_from.step < 0:
        raise ConfigError(
            f"config.init_from.step={config.init_from.step} must be a step >= 0, or unset "
            "(None) for the newest checkpoint."
        )
    if not 0 <= config.label_smoothing < 1:
        raise ConfigError(f"config.label_smoothing={config.label_smoothing} must be in [0, 1).")
    if not 0 < config.decay_fraction <= 1:
        raise ConfigError(
            f"config.decay_fraction={config.decay_fraction} must be in (0, 1]: the share of the "
            "run that lr_schedule='wsd' spends decaying (e.g. 0.2)."
        )
    if not 0 <= config.muon_momentum < 1:
        raise ConfigError(f"config.muon_momentum={config.muon_momentum} must be in [0, 1).")
    _check_profile_steps(config.profile_steps)
    if config.task == "lm" and not 0 < config.val_fraction < 1:
        raise ConfigError(f"config.val_fraction={config.val_fraction} must be in (0, 1).")
    if config.init_from.mode not in ("params", "state"):
        raise ConfigError(f"config.init_from.mode={config.init_from.mode!r}: 'params' or 'state'.")
    _check_model(config)
    _check_packing(config)
    _check_axis_rules(config)
    check_parallelism(config, num_devices, training)


def _check_profile_steps(value: Any) -> None:
    """config.profile_steps is None (off) or (first_step, num_steps): first_step >= 1 (step 0's
    call compiles), num_steps >= 1."""
    if value is None:
        return
    ok = (
        isinstance(value, tuple | list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    )
    if not ok or value[0] < 1 or value[1] < 1:
        raise ConfigError(
            f"config.profile_steps={value!r} must be (first_step, num_steps) with first_step >= 1 "
            "and num_steps >= 1, e.g. --config.profile_steps=10,5 (or None: no profile)."
        )


def _check_context(config: ml_collections.ConfigDict, context: int) -> None:
    """A context axis of more than one device splits every sequence (models/context_parallel.py):
    only a model with a `context_parallel` field does that, under 'jit', with its own attention,
    on sequences that 2 x context chunks divide (the load-balanced layout)."""
    rules = dict(sharding.logical_axis_rules(config))
    if context == 1 or rules.get("length") is None:  # nothing is split
        return
    where = f"config.mesh_shape.context={context} splits sequences"
    if config.parallelism == "pmap":
        raise ConfigError(f"{where}, which needs config.parallelism='jit' (pmap has no mesh).")
    name = config.model.get("name")
    if "context_parallel" not in models.constructor_fields(name):
        raise ConfigError(
            f"{where}, which the {name!r} model cannot attend across (models with a "
            "context_parallel field can, e.g. gpt); set config.mesh_shape.context=1."
        )
    model = models.build_model(config)
    if model.block_size % (2 * context):
        raise ConfigError(
            f"config.model.block_size={model.block_size} does not split into 2 x "
            f"config.mesh_shape.context={context} equal chunks (context parallelism's "
            "load-balanced layout holds one chunk from the start and one from the end of a "
            f"sequence per device); use a block_size that is a multiple of {2 * context}."
        )
    if getattr(model, "moe_num_experts", 0) and model.moe_dispatch == "capacity":
        raise ConfigError(
            f"config.model.moe_dispatch='capacity' drops tokens by their order in a sequence, "
            f"which context parallelism's load-balanced layout changes ({where}); use "
            "moe_dispatch='dropless'."
        )
    if getattr(model, "attention_impl", "auto") not in ("auto", "plain"):
        raise ConfigError(
            f"config.model.attention_impl={model.attention_impl!r} cannot attend across a "
            f"split sequence ({where}: config.model.context_parallel="
            f"{model.context_parallel!r} computes attention itself); set it to 'auto'."
        )


def check_parallelism(
    config: ml_collections.ConfigDict, num_devices: int | None = None, training: bool = True
) -> None:
    """The mesh fits the devices and the batch divides over data-parallel devices, processes
    and microbatches (the training batch only if `training`)."""
    num_devices = num_devices or jax.device_count()
    try:
        sizes = sharding.resolve_mesh_shape(dict(config.mesh_shape), num_devices)
        axes = dict(zip(sharding.MESH_AXES, sizes, strict=True))
    except sharding.MeshError as e:
        raise ConfigError(str(e)) from e
    experts = config.model.get("moe_num_experts", 0) or 0
    if experts and experts % axes["expert"]:
        raise ConfigError(
            f"config.mesh_shape.expert={axes['expert']} does not divide model.moe_num_experts="
            f"{experts}; use an expert axis that divides the experts."
        )
    _check_context(config, axes["context"])
    # The mesh axes the batch splits over, as the logical rules say (data x fsdp x expert).
    split = {a: axes[a] for a in sharding.batch_mesh_axes(config)}
    if config.parallelism == "pmap":
        split = {"data": jax.local_device_count() * jax.process_count()}
        if jax.process_count() > 1:
            raise ConfigError(
                "config.parallelism='pmap' runs on one process here; use 'jit' on several hosts."
            )
    dp = math.prod(split.values())
    need = math.lcm(dp, jax.process_count())
    if config.eval_batch_size % need:
        raise ConfigError(
            f"config.eval_batch_size={config.eval_batch_size} does not divide over {dp} "
            f"data-parallel devices; use a multiple of {need}."
        )
    if not training:
        return
    b, k = config.batch_size, config.grad_accum_steps
    if b % k:
        raise ConfigError(
            f"config.batch_size={b} does not divide into config.grad_accum_steps={k} microbatches."
        )
    if (b // k) % need:
        named = " x ".join(f"{a}={n}" for a, n in split.items())
        raise ConfigError(
            f"The microbatch of {b // k} examples (batch_size={b} / grad_accum_steps={k}) does "
            f"not divide over {dp} data-parallel devices ({named}) and "
            f"{jax.process_count()} processes; use a batch size that is a multiple of {need * k}."
        )
