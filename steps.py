"""The train and eval steps: pure functions, and their one compiled (jit or pmap) form.

`train_step(state, batch) -> (state, metrics)`, `eval_step(state, batch) -> sums` and
`predict_step(state, batch) -> log-probabilities` are plain functions of their arguments.
`steps_class(config)` wraps them once: `jax.jit` with the state's shardings, the batch sharding and
the state donated (`CompiledSteps`), or `jax.pmap` over a 'batch' axis (`PmapSteps`, the same
interface), with `scan_steps` around the train step when several steps run per call. A batch is
a dict with 'inputs', 'targets' and, for evaluation, 'mask' (1 for real examples, 0 for
padding). The same cross-entropy serves classifiers (logits [B, C]) and language models
(logits [B, T, V]).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import models
import optim
import sharding
from models import preprocessing
from train_state import TrainState

Metrics = dict[str, jax.Array]

# Packed documents (config.packing, data/text_windows.py): a language-model batch then also
# carries int32 [batch, length] 'positions' (each document's from 0) and 'segment_ids' (its
# document), which the model takes by name, and float32 'weights' [batch, length]: 0 for a target
# across a document boundary (the token after an end-of-text), whose loss is not taken.
PACKED_INPUTS = ("positions", "segment_ids")


def packed_inputs(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The packed-document arrays of `batch` the model takes as keyword arguments ({} unless
    packed)."""
    return {name: batch[name] for name in PACKED_INPUTS if name in batch}


def cross_entropy(
    logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None, label_smoothing=0.0
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns (sum of per-token losses, sum of correct predictions, number of tokens)."""
    num_classes = logits.shape[-1]
    labels = jax.nn.one_hot(targets, num_classes, dtype=jnp.float32)
    if label_smoothing:
        labels = optax.smooth_labels(labels, label_smoothing)
    losses = optax.softmax_cross_entropy(logits.astype(jnp.float32), labels)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    weights = (
        jnp.ones_like(losses)
        if mask is None
        else jnp.broadcast_to(
            mask.reshape(mask.shape + (1,) * (losses.ndim - mask.ndim)), losses.shape
        ).astype(jnp.float32)
    )
    return jnp.sum(losses * weights), jnp.sum(correct * weights), jnp.sum(weights)


def z_loss(logits: jax.Array, weight: float) -> jax.Array:
    """The z-loss of PaLM (Chowdhery et al. 2022, section 5): weight * log(Z)^2 per token,
    Z = sum(exp(logits)) the softmax normaliser, averaged over every token of logits[..., V].

    Added to the cross-entropy, it pulls log Z towards 0 (and keeps bf16 logits in range);
    PaLM uses weight 1e-4. Returns a float32 scalar (computed in float32)."""
    log_z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return weight * jnp.mean(jnp.square(log_z))


def _split_microbatches(batch: dict[str, jax.Array], k: int) -> dict[str, jax.Array]:
    """[B, ...] -> [k, B/k, ...], keeping each microbatch a strided slice so that every
    microbatch stays spread over all data-parallel devices (no resharding)."""
    return jax.tree.map(
        lambda x: x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1), batch
    )


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    seed: int,
    grad_accum_steps: int = 1,
    label_smoothing: float = 0.0,
    z_loss_weight: float = 0.0,
    axis_name: str | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on `batch` ({'inputs', 'targets'}, the global batch B), accumulating
    gradients over `grad_accum_steps` equal microbatches of B / grad_accum_steps.

    `seed` and the step number fix dropout's randomness; `label_smoothing` softens the targets of
    the training loss; `z_loss_weight` > 0 adds PaLM's z-loss (`z_loss`). What the model sows
    while training (models/__init__.py) joins in: the terms it sows into models.LOSSES are added
    to the objective (e.g. models/moe.py's load-balancing and router z-losses), and they and the
    statistics it sows into models.METRICS are returned as metrics under their names; its
    models.PARAM_UPDATES are added to the parameters after the optimizer's update. With
    `axis_name` (pmap) gradients, metrics, model state and those updates are averaged over that
    axis. Returns the new state and float32 scalar metrics: loss (the cross-entropy alone),
    accuracy, grad_norm, learning_rate, skipped_steps and, when on, z_loss and the sown ones."""
    # Dropout randomness is a pure function of (seed, step): resumed runs repeat it exactly.
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    if axis_name is not None:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    sown = (models.LOSSES, models.METRICS, models.PARAM_UPDATES)  # never part of the state
    mutable = list(state.model_state.keys()) + list(sown)

    def loss_fn(params, model_state, microbatch, micro_rng):
        variables = {"params": params, **model_state}
        logits, variables = model.apply(
            variables,
            microbatch["inputs"],
            train=True,
            rngs={"dropout": micro_rng},
            mutable=mutable,
            **packed_inputs(microbatch),
        )
        new_model_state = {k: v for k, v in variables.items() if k not in sown}
        loss_sum, correct, count = cross_entropy(
            logits, microbatch["targets"], microbatch.get("weights"), label_smoothing
        )
        # The objective is the cross-entropy plus the z-loss when it is on, plus the model's
        # own terms; `loss` stays the cross-entropy alone, comparable with evaluation and with
        # runs without the others.
        aux = {"loss": loss_sum / count, "accuracy": correct / count}
        if z_loss_weight:
            aux["z_loss"] = z_loss(logits, z_loss_weight)
        terms = {k: total for k, (total, _) in sown_scalars(variables.get(models.LOSSES)).items()}
        statistics = sown_scalars(variables.get(models.METRICS))
        objective = aux["loss"] + aux.get("z_loss", 0.0) + sum(terms.values())
        aux.update(terms)
        aux.update({k: total / count for k, (total, count) in statistics.items()})
        updates = variables.get(models.PARAM_UPDATES, {})
        return objective, (new_model_state, aux, updates)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    k = int(grad_accum_steps)
    if k == 1:
        (_, (model_state, aux, param_updates)), grads = grad_fn(
            state.params, state.model_state, batch, rng
        )
    else:
        # Mean of k equal-sized microbatch gradients == gradient of the mean loss on the batch.
        # Model state (BatchNorm's running statistics) is updated once per optimizer step, as
        # on the whole batch: every microbatch starts from the step's state, and the k updates
        # are averaged (m * old + (1 - m) * mean of the microbatch statistics). A running mean
        # is then exactly the whole batch's; BatchNorm still normalizes each microbatch by its
        # own statistics ("ghost" batch norm), as it does each device's batch without a
        # cross-device reduction.
        def accumulate(carry, xs):
            microbatch, i = xs
            (_, outputs), grads = grad_fn(
                state.params, state.model_state, microbatch, jax.random.fold_in(rng, i)
            )
            return jax.tree.map(jnp.add, carry, (grads, *outputs)), None

        microbatches = (_split_microbatches(batch, k), jnp.arange(k))
        # The sums start at zeros shaped like one microbatch's (gradients, model state,
        # metrics and parameter updates: whatever the model sows).
        shapes = jax.eval_shape(
            grad_fn, state.params, state.model_state, jax.tree.map(lambda x: x[0], microbatches[0]),
            rng,
        )  # fmt: skip
        zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), (shapes[1], *shapes[0][1]))
        sums, _ = jax.lax.scan(accumulate, zeros, microbatches)
        grads, model_state, aux, param_updates = jax.tree.map(lambda s: s / k, sums)

    if axis_name is not None:  # pmap: average over the data-parallel replicas
        grads, aux, model_state, param_updates = jax.lax.pmean(
            (grads, aux, model_state, param_updates), axis_name
        )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = apply_param_updates(optax.apply_updates(state.params, updates), param_updates)
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, model_state=model_state
    )
    metrics = {
        **aux,  # loss (the cross-entropy), accuracy, and z_loss and what the model sows, if any
        "grad_norm": optax.tree.norm(grads),
        # The rate this update used: the schedule at the optimizer's own step count (which a
        # skipped non-finite update does not advance), not at the train step.
        "learning_rate": schedule(optim.schedule_count(state.opt_state, state.step)),
        "skipped_steps": optim.nonfinite_count(opt_state),
    }
    return new_state, metrics


def sown_scalars(collection: Any) -> dict[str, tuple[jax.Array, int]]:
    """{name: (float32 sum, count)} of the scalars a model sowed into one collection (a nested
    dict of tuples, as model.apply returns it; None or {} for none): leaves grouped by the name
    they were sown under, each element one occurrence (a scanned stack [layers] counts each
    layer)."""
    sums: dict[str, tuple[jax.Array, int]] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(collection or {}):
        name = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)][-1]
        total, count = sums.get(name, (jnp.zeros((), jnp.float32), 0))
        sums[name] = (total + jnp.sum(leaf.astype(jnp.float32)), count + int(np.size(leaf)))
    return sums


def apply_param_updates(params: Any, param_updates: Any) -> Any:
    """`params` with each array of `param_updates` (what a model sowed into
    models.PARAM_UPDATES: a nested dict whose paths are parameters' paths) added to the
    parameter of the same path."""
    if not param_updates:
        return params
    flat = traverse_util.flatten_dict(params)
    for path, update in traverse_util.flatten_dict(param_updates).items():
        flat[path] = flat[path] + update.astype(flat[path].dtype)
    return traverse_util.unflatten_dict(flat)


def scan_steps(step_fn: Callable[..., tuple[TrainState, Metrics]]) -> Callable:
    """k training steps in one compiled program (Keras's steps_per_execution): (state,
    batches[k, batch, ...]) -> (state, metrics with a leading [k] axis). One dispatch, one
    transfer and one host `next()` per k steps instead of per step; the updates are the same."""

    def run(state: TrainState, batches: dict[str, jax.Array]) -> tuple[TrainState, Metrics]:
        if batches["inputs"].dtype == jnp.uint8:
            # Raw pixels scaled for the whole stack at once (the model then finds them scaled):
            # inside the scan's loop XLA:CPU converts them several times slower
            # (docs/performance.md).
            inputs = preprocessing.pixels_to_unit_range(batches["inputs"], jnp.float32)
            batches = {**batches, "inputs": inputs}
        return jax.lax.scan(step_fn, state, batches)

    return run


def eval_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: nn.Module,
    num_classes: int = 0,
    axis_name: str | None = None,
) -> dict[str, jax.Array]:
    """Sums over a (padded, masked) batch: loss, correct, count and, for classifiers, a confusion
    matrix [true, predicted]. Summing (not averaging) makes padded last batches exact."""
    variables = {"params": state.params, **state.model_state}
    logits = model.apply(variables, batch["inputs"], train=False, **packed_inputs(batch))
    mask = batch["mask"]  # [batch]: real examples; packed: also each target's weight
    if "weights" in batch:
        mask = mask[:, None] * batch["weights"]
    loss_sum, correct, count = cross_entropy(logits, batch["targets"], mask)
    sums = {"loss_sum": loss_sum, "correct": correct, "count": count}
    if num_classes:
        true = jax.nn.one_hot(batch["targets"], num_classes) * batch["mask"][:, None]
        pred = jax.nn.one_hot(jnp.argmax(logits, -1), num_classes)
        sums["confusion"] = true.T @ pred
    if axis_name is not None:
        sums = jax.lax.psum(sums, axis_name)
    return sums


def predict_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module) -> jax.Array:
    """float32 log-probabilities [batch, ..., classes] of the model on batch['inputs']."""
    variables = {"params": state.params, **state.model_state}
    logits = model.apply(variables, batch["inputs"], train=False, **packed_inputs(batch))
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def effective_steps_per_dispatch(config: ml_collections.ConfigDict) -> int:
    """Steps per compiled train call: the requested `config.steps_per_dispatch`, lowered to the
    largest number that also divides the log, eval and checkpoint intervals (so that those always
    fall between calls); 1 under pmap."""
    if config.parallelism == "pmap":
        return 1
    return math.gcd(
        int(config.steps_per_dispatch),
        int(config.log_every_steps),
        int(config.eval_every_steps),
        int(config.checkpoint_every_steps),
    )


def replicate_per_device(tree: Any) -> Any:
    """One copy of every leaf per local device, stacked on a new leading axis sharded over them:
    what `jax.pmap` takes for an argument it does not split. Each device gets its copy directly
    (no [devices, ...] stack is ever built on one device)."""
    devices = jax.local_devices()
    stacked = NamedSharding(Mesh(np.array(devices), ("device",)), PartitionSpec("device"))

    def put(x: jax.Array) -> jax.Array:
        copies = [jax.device_put(x, d)[None] for d in devices]
        return jax.make_array_from_single_device_arrays((len(devices),) + x.shape, stacked, copies)

    return jax.tree.map(put, tree)


def _step_functions(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    num_classes: int,
    steps_per_dispatch: int,
) -> tuple[Callable, Callable, Callable]:
    """The train, eval and predict steps with the run's parts bound: what gets compiled."""
    train = functools.partial(
        train_step, model=model, tx=tx, schedule=schedule, seed=int(config.seed),
        grad_accum_steps=int(config.grad_accum_steps),
        label_smoothing=float(config.label_smoothing),
        z_loss_weight=float(config.get("z_loss", 0.0) or 0.0),
    )  # fmt: skip
    if steps_per_dispatch > 1:
        train = scan_steps(train)
    evaluate = functools.partial(eval_step, model=model, num_classes=num_classes)
    predict = functools.partial(predict_step, model=model)
    return train, evaluate, predict


class CompiledSteps:
    """The steps compiled for one run with `jax.jit`, and the placement of what they take.

    Global arrays over the (data, fsdp, tensor) mesh: the state with the shardings of
    `abstract_state` (donated to the train step), batches split over data x fsdp. Checkpoints and
    metrics see the global layout (`to_global`). `PmapSteps` is the same interface over
    `jax.pmap`; `steps_class` picks one from `config.parallelism`.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        model: nn.Module,
        tx: optax.GradientTransformation,
        schedule: optax.Schedule,
        abstract_state: TrainState,
        mesh: Mesh,
        rules: Any,
        num_classes: int,
    ):
        self.mesh, self.rules = mesh, rules
        self.steps_per_dispatch = effective_steps_per_dispatch(config)
        self.packing = bool(config.get("packing", False))  # batches carry PACKED_INPUTS
        self._compile(
            *_step_functions(config, model, tx, schedule, num_classes, self.steps_per_dispatch),
            abstract_state,
        )

    def _compile(
        self, train: Callable, evaluate: Callable, predict: Callable, abstract_state: TrainState
    ) -> None:
        state_shardings = jax.tree.map(lambda a: a.sharding, abstract_state)
        self._batch_sharding = sharding.batch_sharding(self.mesh, self.rules)
        self._train_batch_sharding = sharding.batch_sharding(
            self.mesh, self.rules, stacked=self.steps_per_dispatch > 1
        )
        replicated = sharding.replicated(self.mesh)
        self.train_step = jax.jit(
            train,
            in_shardings=(state_shardings, self._train_batch_sharding),
            out_shardings=(state_shardings, replicated),
            donate_argnums=0,
        )
        self.eval_step = jax.jit(
            evaluate, in_shardings=(state_shardings, self._batch_sharding), out_shardings=replicated
        )
        self.predict_step = jax.jit(
            predict,
            in_shardings=(state_shardings, self._batch_sharding),
            out_shardings=self._batch_sharding,
        )

    def from_global(self, state: TrainState) -> TrainState:
        """Global (mesh-sharded) state -> the steps' layout (the same, under jit)."""
        return state

    def to_global(self, state: TrainState) -> TrainState:
        """The steps' layout -> one global copy, for checkpoints and metrics."""
        return state

    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Process-local numpy batch -> what eval_step and predict_step take (a global
        jax.Array split over data x fsdp)."""
        return self._put(batch, self._batch_sharding)

    def put_train_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Like put_batch, for what train_step takes: with steps_per_dispatch > 1, a stack of
        batches [steps, batch, ...] sharded on its second axis."""
        return self._put(batch, self._train_batch_sharding)

    def _put(self, batch: dict[str, np.ndarray], data_sharding) -> dict[str, jax.Array]:
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(data_sharding, x), batch
        )

    def abstract_batch(
        self, example_input: np.ndarray, batch_size: int, task: str, *, train: bool = True
    ) -> dict[str, jax.ShapeDtypeStruct]:
        """ShapeDtypeStructs (with shardings) of a global batch of `batch_size` inputs shaped
        like `example_input` [1, ...]: what train_step (train=True: stacked [k, batch, ...] when
        steps_per_dispatch k > 1) or eval_step (train=False: with 'mask') takes. Targets are
        int32 [batch] for task 'classification', [batch, length] for 'lm'. For lowering and
        compiling without data: `train_step.lower(abstract_state, abstract_batch(...))`."""
        inputs = (batch_size,) + tuple(example_input.shape[1:])
        targets = inputs if task == "lm" else inputs[:1]
        arrays = {"inputs": (inputs, example_input.dtype), "targets": (targets, np.int32)}
        if task == "lm" and self.packing:
            arrays.update({name: (inputs, np.int32) for name in PACKED_INPUTS})
            arrays["weights"] = (inputs, np.float32)
        if not train:
            arrays["mask"] = ((batch_size,), np.float32)
        sharding_ = self._batch_sharding
        if train:
            sharding_ = self._train_batch_sharding
            if self.steps_per_dispatch > 1:
                k = self.steps_per_dispatch
                arrays = {name: ((k,) + shape, dtype) for name, (shape, dtype) in arrays.items()}
        return {
            name: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding_)
            for name, (shape, dtype) in arrays.items()
        }

    def steps_in(self, batch: dict[str, jax.Array]) -> int:
        """How many steps a batch from put_train_batch covers: the length of its stack (the
        input pipeline aligns stacks to multiples of steps_per_dispatch), or 1."""
        return batch["targets"].shape[0] if self.steps_per_dispatch > 1 else 1

    def context(self) -> contextlib.AbstractContextManager:
        """Mesh and logical rules active while the steps trace (no cost once compiled)."""
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(self.rules))
        return stack

    def to_host(self, outputs: Any) -> Any:
        """The steps' outputs (eval sums, train metrics; any pytree) as host numpy, in one
        transfer."""
        return jax.device_get(outputs)

    def sums_to_host(self, sums: Any) -> Any:
        """eval_step's sums as host numpy."""
        return self.to_host(sums)


class PmapSteps(CompiledSteps):
    """The same steps under `jax.pmap` over a 'batch' axis of the local devices: the design
    card's data-parallel mode. The state is replicated per device (`from_global`), batches are
    split on a leading device axis, and gradients, metrics and sums are averaged or summed over
    'batch' inside the steps; every device returns an equal copy, of which the first is kept."""

    def _compile(
        self, train: Callable, evaluate: Callable, predict: Callable, abstract_state: TrainState
    ) -> None:
        del abstract_state  # pmap places the state itself (`from_global`)
        self._batch_sharding = self._train_batch_sharding = None  # pmap splits batches itself
        self.train_step = jax.pmap(
            functools.partial(train, axis_name="batch"), axis_name="batch", donate_argnums=0
        )
        self.eval_step = jax.pmap(functools.partial(evaluate, axis_name="batch"), "batch")
        self.predict_step = jax.pmap(predict, "batch")

    def from_global(self, state: TrainState) -> TrainState:
        return replicate_per_device(state)

    def to_global(self, state: TrainState) -> TrainState:
        return jax.tree.map(lambda x: x[0], state)

    def _put(self, batch: dict[str, np.ndarray], data_sharding) -> dict[str, jax.Array]:
        del data_sharding  # [local devices, per-device batch, ...]; pmap splits the leading axis
        n = jax.local_device_count()
        return jax.tree.map(lambda x: x.reshape((n, -1) + x.shape[1:]), batch)

    def abstract_batch(self, *args: Any, **kwargs: Any) -> dict[str, jax.ShapeDtypeStruct]:
        raise ValueError("abstract batches describe 'jit' parallelism; pmap lowers per device.")

    def context(self) -> contextlib.AbstractContextManager:
        # pmap maps over its own 'batch' axis: no context mesh, and no rules, so that the
        # models' logical constraints name no axis of the (data, fsdp, tensor) mesh.
        return nn.logical_axis_rules(())

    def to_host(self, outputs: Any) -> Any:
        return jax.tree.map(lambda x: x[0], jax.device_get(outputs))


def steps_class(config: ml_collections.ConfigDict) -> type[CompiledSteps]:
    """What compiles a run's steps, as `config.parallelism` asks: 'jit' (`CompiledSteps`,
    sharded over the mesh) or 'pmap' (`PmapSteps`, replicated over the local devices)."""
    return PmapSteps if config.parallelism == "pmap" else CompiledSteps
