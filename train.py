"""Training and evaluation: `train_and_evaluate(config, workdir)` and the absl entry point.

    python train.py --config=configs/fashion_mnist_mlp.py --workdir=runs/mlp
    python train.py --config=configs/shakespeare_char_cpu.py --config.learning_rate=3e-4 ...

The steps and their compilation live in steps.py, the run's parts are built by
experiment.build_run; this file is the loop around them, top to bottom:
build the run (config, data, model, optimizer, mesh, compiled steps) -> sharded state (or
restore) -> loop of (step, log, evaluate, checkpoint) -> final evaluation -> final_metrics.json.
Each attempt appends what made it (commit, libraries, devices) and where its time went (goodput)
to provenance.json (runtime/provenance.py).
"""

from __future__ import annotations

from runtime import host_allocator

# First, before jax and TensorFlow start their threads: reuse freed host memory instead of
# unmapping it after every step (faster XLA:CPU steps; see runtime/host_allocator.py).
host_allocator.keep_freed_memory_mapped()

import contextlib
import json
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags, logging
from flax import linen as nn
from ml_collections import config_flags

import checkpointing
import evaluation
import experiment
import finetune
import sampling
import steps
from runtime import (
    cli,
    distributed,
    metrics_writer,
    preemption,
    profiling,
    provenance,
    tracking,
    workdir_files,
)

# Random numbers that do not depend on how arrays are sharded (same dropout on 1 or 8 devices).
jax.config.update("jax_threefry_partitionable", True)


class NonFiniteLossError(cli.UserError, FloatingPointError):
    """The loss or gradient became NaN or infinite."""


def prefetch_to_device(batches: Iterator[dict], put, size: int = 2) -> Iterator[dict]:
    """Keeps `size` batches already transferred (device_put is asynchronous), so the step
    never waits for the host-to-device copy."""
    queue = []
    for batch in batches:
        queue.append(put(batch))
        if len(queue) > size:
            yield queue.pop(0)
    yield from queue


def _format_eval(split: str, metrics: dict[str, Any]) -> str:
    shown = {k: v for k, v in metrics.items() if np.ndim(v) == 0}
    return f"{split}: " + ", ".join(f"{k}={v:.4f}" for k, v in shown.items())


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, started: float | None = None
) -> dict[str, Any]:
    """Trains `config` in `workdir` (resuming if it holds checkpoints); returns final metrics.

    The run holds the workdir while it trains (workdir_files.claim): a second run started on it
    is refused. Raises cli.UserError subclasses for what the user can fix (the config, the
    workdir, the data) before anything trains. `started`: when this attempt began, as a
    time.perf_counter() value, for its goodput (default: now; the command passes its process's
    start, so that imports count as start-up)."""
    goodput = provenance.Goodput(started)  # where the attempt's time goes (runtime/provenance.py)
    workdir = os.path.abspath(workdir)
    checkpointing.check_path(workdir)
    with workdir_files.claim(workdir):
        return _train_and_evaluate(config, workdir, goodput)


def _train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, goodput: provenance.Goodput
) -> dict[str, Any]:
    _print(distributed.describe_devices())  # a run that fell back to the CPU says so first
    run = experiment.build_run(config)  # validates a copy of `config`, loads the data
    config, datasets, compiled = run.config, run.datasets, run.compiled
    total_steps = run.total_steps

    # ------------------------------------------------------------------ state: resume or create
    # Everything in the workdir describes the run its newest checkpoint belongs to: a restart
    # (or a fresh start over an attempt that saved nothing) moves the old records aside, and a
    # resume must not change what the run is.
    if config.restart and (moved := workdir_files.move_records_aside(workdir)):
        _print(f"config.restart=True: moved the previous run's records to {moved}")
    ckpt = checkpointing.Checkpointer(
        workdir, max_to_keep=config.keep_checkpoints, async_save=config.async_checkpointing
    )
    if ckpt.all_steps():
        latest = ckpt.all_steps()[-1]
        workdir_files.check_resume(workdir, config, run.tokenizer, latest, total_steps)
    elif moved := workdir_files.move_records_aside(workdir, keep=("checkpoints",)):
        _print(f"Moved the records of an earlier attempt that saved no checkpoint to {moved}")
    restored = ckpt.restore_latest(run.abstract_state)
    if restored is not None:
        state, meta = restored
        start_step = int(meta["step"])
        logging.info("Resuming from the checkpoint at step %d in %s", start_step, ckpt.directory)
        _print(f"Resuming from checkpoint at step {start_step} ({ckpt.directory})")
    else:
        state, start_step = run.init_state(), 0
        if config.init_from.workdir:
            state = finetune.init_from(run, state)
    state = compiled.from_global(state)
    workdir_files.save_run_records(workdir, config, run.input_spec, run.tokenizer)
    attempt = provenance.start_attempt(workdir, start_step, goodput)  # code, libraries, devices

    tracker = tracking.start(config, workdir, start_step, attempt)  # None unless config.wandb asks
    writer = metrics_writer.MetricsWriter(workdir, resume_step=start_step, tracker=tracker)
    if start_step == 0:
        writer.write_text(0, "config", "```\n" + config.to_json_best_effort(indent=2) + "\n```")
        writer.write_hparams(evaluation.flat_hparams(config))
    num_params = run.num_params
    logging.info("Model %s: %s parameters; %d steps.", config.model.name, f"{num_params:,}",
                 total_steps)  # fmt: skip
    watcher = preemption.PreemptionWatcher()
    example_input = run.input_spec.example_input
    items_per_example = int(np.prod(example_input.shape[1:])) if config.task == "lm" else 1

    @goodput.phase("checkpointing")
    def save(step: int, force: bool = False) -> None:
        ckpt.save(step, compiled.to_global(state), {"step": step}, force=force)
        provenance.save_goodput(workdir, goodput, step)  # a killed attempt keeps its time

    @goodput.phase("evaluating")
    def run_eval(step: int) -> dict[str, dict[str, Any]]:
        results = {}
        for split in datasets.eval_splits:
            # The one evaluation loop, shared with evaluate.py and the tools.
            results[split] = evaluation.evaluate(run, state, datasets.eval_batches(split))
            scalars = {k: v for k, v in results[split].items() if np.ndim(v) == 0}
            # 'train/' is the training loop's own series; an evaluation of the train split
            # (language models) goes to 'train_eval/' so the two never share a tag.
            prefix = "train_eval/" if split == "train" else f"{split}/"
            writer.write_scalars(step, scalars, prefix=prefix)
            _print(f"step {step}: eval " + _format_eval(split, results[split]))
        if config.task == "lm" and config.sample_every_eval and run.tokenizer is not None:
            params = compiled.to_global(state).params
            _log_sample(writer, run.model, params, run.tokenizer, config, step)
        return results

    # ------------------------------------------------------------------ the loop
    # Metrics stay on the device until a log line, a checkpoint or the end needs them; then one
    # transfer fetches them all and checks every step for NaN/Inf. The host thus never waits for
    # a step just to read its loss, and dispatches run at most two ahead of the device.
    host_batches = datasets.train_batches(start_step, compiled.steps_per_dispatch, total_steps)
    batches = goodput.timed(prefetch_to_device(host_batches, compiled.put_train_batch))
    unchecked: list[tuple[int, int, Any]] = []  # (first step number, steps, device metrics)
    window: list[dict[str, float]] = []  # checked per-step metrics since the last log line
    in_flight = []
    t_window, t_start, step = time.perf_counter(), time.perf_counter(), start_step

    def check() -> None:
        window.extend(_fetch_and_check(unchecked, config, compiled))
        unchecked.clear()

    profiler = profiling.StepProfiler(
        config.profile_steps, os.path.join(workdir, "tensorboard"), step, log=_print
    )
    goodput.enter("training")  # the loop's time, less data waits, evals, saves and compiles
    with compiled.context(), _finish_saves_on_error(ckpt), profiler:
        for batch in batches:
            n = compiled.steps_in(batch)
            profiler.before_call(step, n)
            state, metrics = compiled.train_step(state, batch)
            profiler.after_call(step + n, state)
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
                with goodput.phase("checkpointing"):
                    ckpt.close()
                provenance.save_goodput(workdir, goodput, done)
                writer.close()
                _print(f"Preempted: saved a checkpoint at step {done}; rerun to resume.")
                return {"preempted_at_step": done}
        profiler.stop(step, state)  # a window reaching past the last step ends here
    check()
    train_seconds = time.perf_counter() - t_start
    goodput.enter("other")

    # ------------------------------------------------------------------ final evaluation
    results = run_eval(total_steps)
    save(total_steps, force=True)
    with goodput.phase("checkpointing"):
        ckpt.close()
    watcher.close()
    final = evaluation.final_report(config, results, total_steps, num_params)
    final["train_seconds_this_run"] = train_seconds
    final.update(provenance.finish_attempt(workdir, goodput, total_steps))  # commit, goodput
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
            json.dump(final, f, indent=2)
        evaluation.log_images(writer, total_steps, results)
    writer.write_summary(final)
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
    max_new_tokens = 200  # past block_size, each token conditions on the last block_size
    rng = jax.random.fold_in(jax.random.key(config.seed), step)
    # No logical rules: a batch of one cannot follow the data-parallel activation constraints.
    with nn.logical_axis_rules(()):
        tokens = sampling.generate(model, params, prompt, rng, max_new_tokens, 0.8, top_k=200)
    text = tokenizer.decode(distributed.to_host(tokens)[0])
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
    unchecked: list[tuple[int, int, Any]],
    config: ml_collections.ConfigDict,
    compiled: steps.CompiledSteps,
) -> list[dict[str, float]]:
    """Fetches queued step metrics in one transfer, as one dict per step; stops the run at the
    first NaN/Inf loss or gradient unless steps are being skipped."""
    rows = []
    for (first, n, _), metrics in zip(unchecked, compiled.to_host([m for *_, m in unchecked]),
                                      strict=True):  # fmt: skip
        arrays = {k: np.asarray(v).reshape(n) for k, v in metrics.items()}
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


def define_flags() -> None:
    """The command's flags (defined only when run as a script: importing train defines none)."""
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and final metrics.")
    config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for several hosts.")
    flags.DEFINE_integer("num_processes", None, "Number of processes (hosts) in the job.")
    flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
    flags.DEFINE_integer("cpu_devices", None, "Simulated CPU devices per process (testing).")
    flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    """absl entry point: starts jax.distributed where several processes run, then trains."""
    del argv
    distributed.initialize(
        FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, FLAGS.cpu_devices
    )
    train_and_evaluate(FLAGS.config, FLAGS.workdir, started=provenance.process_start())


if __name__ == "__main__":
    define_flags()
    cli.run(main)
