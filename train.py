"""Training and evaluation: `train_and_evaluate(config, workdir)` and the absl entry point.

    python train.py --config=configs/fashion_mnist_mlp.py --workdir=runs/mlp
    python train.py --config=configs/shakespeare_char_cpu.py --config.learning_rate=3e-4 ...

The step functions live in steps.py; this file is the loop around them, top to bottom:
validate config -> data -> model, optimizer -> sharded state (or restore) -> loop of
(step, log, evaluate, checkpoint) -> final evaluation -> final_metrics.json.
"""

from __future__ import annotations

import host_allocator

# First, before jax and TensorFlow start their threads: reuse freed host memory instead of
# unmapping it after every step (XLA:CPU steps up to ~1.5x faster; see host_allocator.py).
host_allocator.keep_freed_memory_mapped()

import contextlib
import functools
import json
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import jax_utils
from flax import linen as nn
from ml_collections import config_flags

import checkpointing
import config_validation
import data_setup
import distributed
import evaluation_metrics
import finetune
import input_pipeline
import metrics_writer
import models
import optim
import preemption
import sampling
import sharding
import steps
import train_state

# Random numbers that do not depend on how arrays are sharded (same dropout on 1 or 8 devices).
jax.config.update("jax_threefry_partitionable", True)


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient became NaN or infinite."""


def total_train_steps(config: ml_collections.ConfigDict, num_train_examples: int) -> int:
    """num_train_steps if set, else num_epochs over the training set."""
    if config.num_train_steps > 0:
        return int(config.num_train_steps)
    return int(math.ceil(config.num_epochs * num_train_examples / config.batch_size))


def steps_per_dispatch(config: ml_collections.ConfigDict) -> int:
    """Steps per compiled train call: config.steps_per_dispatch, lowered to the largest number
    that also divides the log, eval and checkpoint intervals (so that those always fall between
    calls); 1 under pmap."""
    if config.parallelism == "pmap":
        return 1
    return math.gcd(
        int(config.steps_per_dispatch),
        int(config.log_every_steps),
        int(config.eval_every_steps),
        int(config.checkpoint_every_steps),
    )


class Runner:
    """Places state and batches and compiles the steps, for 'jit' (mesh) or 'pmap' parallelism."""

    def __init__(self, config, model, tx, schedule, example_input, num_classes: int):
        self.config = config
        self.pmap = config.parallelism == "pmap"
        self.mesh = sharding.make_mesh(config)
        self.rules = sharding.logical_axis_rules(config)
        self.abstract_state = train_state.abstract_state(
            model, tx, example_input, self.mesh, self.rules, config.seed
        )
        self._init = functools.partial(
            train_state.create_train_state, model, tx, example_input, self.mesh, self.rules
        )
        train = functools.partial(
            steps.train_step, model=model, tx=tx, schedule=schedule, config=config
        )
        self.steps_per_dispatch = steps_per_dispatch(config)
        if self.steps_per_dispatch > 1:
            train = steps.scan_steps(train)
        evaluate = functools.partial(steps.eval_step, model=model, num_classes=num_classes)
        if self.pmap:
            self.train_step = jax.pmap(
                functools.partial(train, axis_name="batch"), axis_name="batch", donate_argnums=0
            )
            self.eval_step = jax.pmap(functools.partial(evaluate, axis_name="batch"), "batch")
        else:
            shardings = jax.tree.map(lambda a: a.sharding, self.abstract_state)
            data = sharding.batch_sharding(self.mesh, self.rules)
            self._data_sharding = data
            stacked = self.steps_per_dispatch > 1
            self._train_data_sharding = sharding.batch_sharding(self.mesh, self.rules, stacked)
            with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
                self.train_step = jax.jit(
                    train,
                    in_shardings=(shardings, self._train_data_sharding),
                    out_shardings=(shardings, sharding.replicated(self.mesh)),
                    donate_argnums=0,
                )
                self.eval_step = jax.jit(
                    evaluate,
                    in_shardings=(shardings, data),
                    out_shardings=sharding.replicated(self.mesh),
                )

    def init_state(self) -> train_state.TrainState:
        """Fresh global state, created sharded over the mesh."""
        state, _ = self._init(self.config.seed)
        return state

    def from_global(self, state):
        """Global (mesh-sharded) state -> the runner's layout (replicated per device for pmap)."""
        return jax_utils.replicate(state) if self.pmap else state

    def to_global(self, state):
        """The runner's layout -> one global copy, for checkpoints and metrics."""
        return jax_utils.unreplicate(state) if self.pmap else state

    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Process-local numpy batch -> device arrays (global jax.Array under jit)."""
        return self._put(batch, None if self.pmap else self._data_sharding)

    def put_train_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Like put_batch, for what train_step takes: with steps_per_dispatch > 1, a stack of
        batches [steps, batch, ...] sharded on its second axis."""
        return self._put(batch, None if self.pmap else self._train_data_sharding)

    def _put(self, batch: dict[str, np.ndarray], data_sharding) -> dict[str, jax.Array]:
        if self.pmap:  # [local devices, per-device batch, ...]; pmap splits the leading axis
            n = jax.local_device_count()
            return jax.tree.map(lambda x: x.reshape((n, -1) + x.shape[1:]), batch)
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(data_sharding, x), batch
        )

    def steps_in(self, batch: dict[str, jax.Array]) -> int:
        """How many steps a batch from put_train_batch covers: the length of its stack (the
        input pipeline aligns stacks to multiples of steps_per_dispatch), or 1."""
        return batch["targets"].shape[0] if self.steps_per_dispatch > 1 else 1

    def step_context(self):
        """Mesh and logical rules active while tracing (a no-op cost after compilation)."""
        if self.pmap:  # pmap maps over its own 'batch' mesh: no context mesh, and no rules, so
            # that the models' logical constraints name no axis of the (data, fsdp, tensor) mesh
            return nn.logical_axis_rules(())
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(self.rules))
        return stack


def prefetch_to_device(batches: Iterator[dict], put, size: int = 2) -> Iterator[dict]:
    """Keeps `size` batches already transferred (device_put is asynchronous), so the step
    never waits for the host-to-device copy."""
    queue = []
    for batch in batches:
        queue.append(put(batch))
        if len(queue) > size:
            yield queue.pop(0)
    yield from queue


def evaluate(runner: Runner, state, datasets, split: str, num_classes: int) -> dict[str, Any]:
    """Runs the eval step over a whole split and turns the sums into metrics."""
    totals = None
    with runner.step_context():
        for batch in datasets.eval_batches(split):
            sums = runner.eval_step(state, runner.put_batch(batch))
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    if runner.pmap:
        totals = jax.tree.map(lambda x: x[0], totals)
    return evaluation_metrics.from_sums(totals, num_classes, datasets.tokenizer)


def _format_eval(split: str, metrics: dict[str, Any]) -> str:
    shown = {k: v for k, v in metrics.items() if np.ndim(v) == 0}
    return f"{split}: " + ", ".join(f"{k}={v:.4f}" for k, v in shown.items())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains `config` in `workdir` (resuming if it holds checkpoints); returns final metrics."""
    config = ml_collections.ConfigDict(config.to_dict())  # own copy; leave the caller's alone
    config_validation.validate(config)
    workdir = os.path.abspath(workdir)
    datasets = input_pipeline.get_datasets(config)
    if datasets.tokenizer is not None:
        config.model.vocab_size = datasets.tokenizer.vocab_size
        if jax.process_index() == 0:
            datasets.tokenizer.save(workdir)
    model = models.build_model(config)
    total_steps = total_train_steps(config, datasets.num_train_examples)
    schedule = optim.learning_rate_schedule(config, total_steps)
    tx = optim.build_optimizer(config, schedule)
    runner = Runner(config, model, tx, schedule, datasets.example_input, datasets.num_classes)

    # ------------------------------------------------------------------ state: resume or create
    if config.restart and (moved := checkpointing.move_aside(workdir)):
        logging.warning("config.restart=True: moved the old checkpoints to %s", moved)
    ckpt = checkpointing.Checkpointer(
        workdir, max_to_keep=config.keep_checkpoints, async_save=config.async_checkpointing
    )
    restored = ckpt.restore_latest(runner.abstract_state)
    if restored is not None:
        state, meta = restored
        start_step = int(meta["step"])
        logging.info("Resuming from the checkpoint at step %d in %s", start_step, ckpt.directory)
        _print(f"Resuming from checkpoint at step {start_step} ({ckpt.directory})")
    else:
        state, start_step = runner.init_state(), 0
        if config.init_from.workdir:
            state = finetune.init_from(config, state, runner.abstract_state)
    state = runner.from_global(state)
    checkpointing.save_config(workdir, config)

    writer = metrics_writer.MetricsWriter(workdir, resume_step=start_step)
    if start_step == 0:
        writer.write_text(0, "config", "```\n" + config.to_json_best_effort(indent=2) + "\n```")
        writer.write_hparams(evaluation_metrics.flat_hparams(config))
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(runner.abstract_state.params))
    logging.info("Model %s: %s parameters; %d steps.", config.model.name, f"{num_params:,}",
                 total_steps)  # fmt: skip
    watcher = preemption.PreemptionWatcher()
    items_per_example = int(np.prod(datasets.example_input.shape[1:])) if config.task == "lm" else 1

    def save(step: int, force: bool = False) -> None:
        ckpt.save(step, runner.to_global(state), {"step": step}, force=force)

    def run_eval(step: int) -> dict[str, dict[str, Any]]:
        results = {}
        for split in datasets.eval_splits:
            results[split] = evaluate(runner, state, datasets, split, datasets.num_classes)
            scalars = {k: v for k, v in results[split].items() if np.ndim(v) == 0}
            # 'train/' is the training loop's own series; an evaluation of the train split
            # (language models) goes to 'train_eval/' so the two never share a tag.
            prefix = "train_eval/" if split == "train" else f"{split}/"
            writer.write_scalars(step, scalars, prefix=prefix)
            _print(f"step {step}: eval " + _format_eval(split, results[split]))
        if config.task == "lm" and config.sample_every_eval:
            params = runner.to_global(state).params
            _log_sample(writer, model, params, datasets.tokenizer, config, step)
        return results

    # ------------------------------------------------------------------ the loop
    # Metrics stay on the device until a log line, a checkpoint or the end needs them; then one
    # transfer fetches them all and checks every step for NaN/Inf. The host thus never waits for
    # a step just to read its loss, and dispatches run at most two ahead of the device.
    host_batches = datasets.train_batches(start_step, runner.steps_per_dispatch, total_steps)
    batches = prefetch_to_device(host_batches, runner.put_train_batch)
    unchecked: list[tuple[int, int, Any]] = []  # (first step number, steps, device metrics)
    window: list[dict[str, float]] = []  # checked per-step metrics since the last log line
    in_flight = []
    t_window, t_start, step = time.perf_counter(), time.perf_counter(), start_step

    def check() -> None:
        window.extend(_fetch_and_check(unchecked, config, runner.pmap))
        unchecked.clear()

    with runner.step_context(), _finish_saves_on_error(ckpt):
        for batch in batches:
            n = runner.steps_in(batch)
            state, metrics = runner.train_step(state, batch)
            unchecked.append((step + 1, n, metrics))
            in_flight.append(metrics)
            if len(in_flight) > 2:
                jax.block_until_ready(in_flight.pop(0))
            step = done = step + n
            if done % config.log_every_steps == 0 or done == total_steps:
                check()
                now = time.perf_counter()
                rate = len(window) / (now - t_window)
                means = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
                means["steps_per_sec"] = rate
                means["examples_per_sec"] = rate * config.batch_size
                if config.task == "lm":
                    means["tokens_per_sec"] = rate * config.batch_size * items_per_example
                writer.write_scalars(done, means, prefix="train/")
                eta = (total_steps - done) / max(rate, 1e-9)
                _print(_progress_line(done, total_steps, means, eta))
                window.clear()
                t_window = time.perf_counter()
            if done % config.eval_every_steps == 0 and done != total_steps:
                run_eval(done)
            if done % config.checkpoint_every_steps == 0 and done != total_steps:
                check()  # never checkpoint a NaN state
                save(done)  # the last step is saved after the final evaluation
            if watcher.should_stop(done):
                check()
                save(done, force=True)
                ckpt.close()
                writer.close()
                _print(f"Preempted: saved a checkpoint at step {done}; rerun to resume.")
                return {"preempted_at_step": done}
    check()
    train_seconds = time.perf_counter() - t_start

    # ------------------------------------------------------------------ final evaluation
    results = run_eval(total_steps)
    save(total_steps, force=True)
    ckpt.close()
    watcher.close()
    final = evaluation_metrics.final_report(config, results, total_steps, num_params)
    final["train_seconds_this_run"] = train_seconds
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
            json.dump(final, f, indent=2)
        evaluation_metrics.log_images(writer, total_steps, results)
    writer.close()
    return final


def _log_sample(writer, model, params, tokenizer, config, step: int) -> None:
    """Logs one short generated text sample to TensorBoard. Every process takes part in the
    (SPMD) generation; only process 0's writer writes."""
    try:
        prompt = np.asarray(tokenizer.encode("\n"), np.int32)[None, :1]
    except ValueError:  # a character vocabulary without a newline
        prompt = np.zeros((1, 0), np.int32)
    if prompt.shape[1] == 0:  # start from token 0 instead
        prompt = np.zeros((1, 1), np.int32)
    max_new_tokens = min(200, int(config.model.block_size) - 1)
    if max_new_tokens <= 0:
        return
    rng = jax.random.fold_in(jax.random.key(config.seed), step)
    # No logical rules: a batch of one cannot follow the data-parallel activation constraints.
    with nn.logical_axis_rules(()):
        tokens = sampling.generate(model, params, prompt, rng, max_new_tokens, 0.8, top_k=200)
    text = tokenizer.decode(checkpointing.to_host(tokens)[0])
    writer.write_text(step, "samples", "```\n" + text + "\n```")


@contextlib.contextmanager
def _finish_saves_on_error(ckpt: checkpointing.Checkpointer) -> Iterator[None]:
    """If the loop raises (NaN loss, Ctrl-C), lets the checkpoint being written commit first."""
    try:
        yield
    except BaseException:
        try:
            ckpt.wait()
        except Exception as e:  # the original error matters more than a failed save
            logging.warning("A checkpoint save failed while stopping: %s", e)
        raise


def _print(message: str) -> None:
    """Progress for humans, from process 0 only (every process would print the same line)."""
    if jax.process_index() == 0:
        print(message, flush=True)


def _fetch_and_check(
    unchecked: list[tuple[int, int, Any]], config: ml_collections.ConfigDict, pmap: bool
) -> list[dict[str, float]]:
    """Fetches queued step metrics in one transfer, as one dict per step; stops the run at the
    first NaN/Inf loss or gradient unless steps are being skipped."""
    rows = []
    for (first, n, _), metrics in zip(unchecked, jax.device_get([m for *_, m in unchecked]),
                                      strict=True):  # fmt: skip
        # pmap: every device returns its own (equal, after pmean) copy; keep the first.
        arrays = {k: (np.asarray(v)[0] if pmap else np.asarray(v)).reshape(n)
                  for k, v in metrics.items()}  # fmt: skip
        for i in range(n):
            values = {k: float(v[i]) for k, v in arrays.items()}
            if not config.skip_nonfinite_steps and not (
                math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])
            ):
                raise NonFiniteLossError(
                    f"Non-finite loss/gradient at step {first + i} (loss={values['loss']}, "
                    f"grad_norm={values['grad_norm']}). The last good checkpoint is kept; lower "
                    "the learning rate, clip gradients (config.grad_clip_norm) or set "
                    "config.skip_nonfinite_steps=True."
                )
            rows.append(values)
    return rows


def _progress_line(step: int, total: int, m: dict[str, float], eta: float) -> str:
    parts = [f"step {step}/{total}", f"loss {m['loss']:.4f}"]
    if "tokens_per_sec" in m:
        parts.append(f"{m['tokens_per_sec']:,.0f} tok/s")
    else:
        parts.append(f"acc {100 * m['accuracy']:.2f}%")
        parts.append(f"{m['examples_per_sec']:,.0f} ex/s")
    parts += [f"{m['steps_per_sec']:.1f} steps/s", f"lr {m['learning_rate']:.2e}"]
    if m.get("skipped_steps"):
        parts.append(f"skipped {int(m['skipped_steps'])}")
    parts.append(f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}")
    return " | ".join(parts)


FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and final metrics.")
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for several hosts.")
flags.DEFINE_integer("num_processes", None, "Number of processes (hosts) in the job.")
flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
flags.DEFINE_integer("cpu_devices", None, "Simulated CPU devices per process (testing).")


def main(argv: list[str]) -> None:
    """absl entry point."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.config is None or FLAGS.workdir is None:
        raise app.UsageError("Both --config=configs/<name>.py and --workdir=<dir> are required.")
    if not FLAGS["verbosity"].present:  # Orbax logs every save at INFO; keep stdout readable
        logging.set_verbosity(logging.WARNING)
    distributed.initialize(
        FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, FLAGS.cpu_devices
    )
    try:
        train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (
        config_validation.ConfigError,
        checkpointing.CheckpointMismatchError,
        data_setup.DatasetUnavailableError,
        FloatingPointError,  # NonFiniteLossError, checkpointing.NonFiniteStateError
    ) as e:
        raise SystemExit(f"ERROR: {e}") from e


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a misspelt --config.<field> reported in one readable line
    (ml_collections raises a bare AttributeError from deep inside the parser)."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:
        inner = e
        while inner.args and isinstance(inner.args[0], BaseException):
            inner = inner.args[0]
        text = str(inner.args[0]) if inner.args else str(inner)
        field, _, hint = text.partition("\n")
        field = field.strip("'\"")
        bad = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.") and field in a]
        raise SystemExit(
            f"ERROR: {bad[0] if bad else '--config'}: the config has no field {field!r}. "
            f"{hint} Every field is defined in configs/base.py (model fields in models/)."
        ) from None


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
