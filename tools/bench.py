"""Performance of a config's training step (and, with --decode, of cached sampling).

    python -m tools.bench --config=configs/shakespeare_char_cpu.py [--config.dtype=bfloat16]
        [--steps=50] [--warmup=5] [--rounds=3] [--decode]
    python -m tools.bench --config=configs/gpt2_small.py --config.dataset=synthetic
        --config.model.vocab_size=50304    # no data: random tokens of the config's shapes

Builds the run exactly as train.py does (experiment.build_run: data, model, optimizer, mesh and
compiled steps; train.prefetch_to_device) and reports: compilation time; steady-state step time
(median over --steps single steps, each waited for with block_until_ready, and the mean over a
pipelined run of --steps steps as the training loop dispatches them, alternated --rounds times
with the real loop, medians); examples and tokens per
second; model FLOPs per step (analytic where the model file defines
`training_flops_per_token(model, seq_len)`: nanoGPT/PaLM 6N + 12LHQT per token for the GPT;
counted matmuls and convolutions of the forward pass x3 for the others) next to XLA's cost
analysis; MFU against the device's peak (measured with a 2048x2048 float32 matmul on CPU, a
datasheet figure on GPU/TPU); peak device memory (memory_stats, or the compiled memory analysis
on CPU); and the share of the real loop's step time lost to input (the real loop's time per step
minus the pipelined time on batches already on the device), with the host CPU time the input
pipeline alone needs per step. With --decode, cached sampling's tokens per second at each
--decode_batch and, on GPUs in HBM_BANDWIDTH, the share of the memory bandwidth it uses. Prints
a table, then one JSON line.
"""

from __future__ import annotations

from runtime import host_allocator

host_allocator.keep_freed_memory_mapped()  # first, before jax and TensorFlow, as in train.py

import functools
import json
import math
import resource
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from flax import linen as nn
from ml_collections import config_flags

import experiment
import models
import train
from runtime import cli

if TYPE_CHECKING:
    import data

# Dense bf16 peak FLOP/s by device_kind substring (first match wins; more specific names first).
PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("A100", 312e12),
    ("L4", 121e12),
    ("V100", 125e12),
    ("TPU v6 lite", 918e12),  # v6e (Trillium)
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
)
# HBM bandwidth (bytes/s) by device_kind substring (datasheets), for decoding's memory ceiling.
HBM_BANDWIDTH = (("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100", 2.0e12))


def time_matmul(size: int, dtype: Any = jnp.float32, repeats: int = 10) -> dict[str, float]:
    """A jitted size x size @ size x size matmul of random `dtype` values (2 size^3 FLOPs):
    the first call's seconds (compilation included), then `repeats` calls, each waited for:
    the best seconds, and the best and median as FLOP/s."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (size, size), dtype)
    b = jax.random.normal(kb, (size, size), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    first, times = times[0], times[1:]
    flops = 2.0 * size**3
    return {
        "first_call_s": first,
        "best_s": min(times),
        "best_flops_per_sec": flops / min(times),
        "median_flops_per_sec": flops / statistics.median(times),
    }


@functools.cache
def measured_cpu_peak_flops(size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a jitted size x size float32 matmul on the CPU (best of `repeats`)."""
    return time_matmul(size, jnp.float32, repeats)["best_flops_per_sec"]


def peak_flops(device: Any) -> tuple[float | None, str]:
    """(peak FLOP/s of one device or None, where the figure comes from)."""
    if device.platform == "cpu":
        return measured_cpu_peak_flops(), "measured 2048x2048 float32 matmul"
    for name, flops in PEAK_FLOPS:
        if name.lower() in device.device_kind.lower():
            return flops, f"datasheet dense bf16 ({name})"
    return None, f"unknown device kind {device.device_kind!r}"


def _subjaxprs(params: dict[str, Any]):
    """The jaxprs nested in an equation's parameters (pjit, remat, scan, cond, custom_vjp...)."""
    for value in params.values():
        for v in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(v, jax.extend.core.ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, jax.extend.core.Jaxpr):
                yield v


def _jaxpr_matmul_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            out = eqn.outvars[0].aval.shape
            total += 2.0 * math.prod(out) * math.prod(lhs[i] for i in lhs_contract)
        elif eqn.primitive.name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
            macs_per_output = math.prod(rhs) / rhs[out_feature_dim]
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * macs_per_output
        else:
            times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
            for sub in _subjaxprs(eqn.params):
                total += times * _jaxpr_matmul_flops(sub)
    return total


def matmul_flops(fn: Callable, *args: Any) -> float:
    """FLOPs (2 x multiply-adds) of every matmul and convolution `fn(*args)` traces to."""
    return _jaxpr_matmul_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def model_flops_per_step(config: ml_collections.ConfigDict, model: nn.Module, example) -> dict:
    """Training FLOPs of one step: analytic, plus the traced-matmul count (3 x forward)."""
    batch = int(config.batch_size)
    variables = jax.eval_shape(
        lambda: nn.unbox(model.init(jax.random.key(0), jnp.asarray(example), train=False))
    )
    inputs = jax.ShapeDtypeStruct((batch,) + example.shape[1:], example.dtype)
    forward = matmul_flops(lambda v, x: model.apply(v, x, train=False), variables, inputs)
    result = {"traced_matmul_flops_per_step": 3.0 * forward}
    name = config.model.name
    analytic = getattr(models.model_module(name), "training_flops_per_token", None)
    if analytic is not None:
        seq = int(example.shape[1])
        result["model_flops_per_step"] = analytic(model, seq) * seq * batch
        result["flops_formula"] = f"models/{name}.py training_flops_per_token (analytic)"
    else:
        result["model_flops_per_step"] = 3.0 * forward
        result["flops_formula"] = "3 x forward matmul/conv FLOPs (2 x MACs)"
    return result


def _memory(compiled: Any, device: Any) -> dict[str, Any]:
    """Peak device memory where the runtime tracks it, else XLA's compiled memory analysis."""
    out: dict[str, Any] = {}
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        out["peak_device_memory_bytes"] = int(stats["peak_bytes_in_use"])
        out["memory_source"] = "device.memory_stats()"
    analysis = compiled.memory_analysis()
    if analysis is not None:
        out["compiled_temp_bytes"] = int(analysis.temp_size_in_bytes)
        out["compiled_argument_bytes"] = int(analysis.argument_size_in_bytes)
        out["compiled_output_bytes"] = int(analysis.output_size_in_bytes)
        out["compiled_alias_bytes"] = int(analysis.alias_size_in_bytes)
        if "peak_device_memory_bytes" not in out:
            out["peak_device_memory_bytes"] = out["compiled_temp_bytes"] + int(
                analysis.argument_size_in_bytes
            )
            out["memory_source"] = "compiled.memory_analysis() temp + arguments"
    return out


def _cost_flops(compiled: Any) -> float | None:
    """XLA's own FLOP count of the compiled step (per device), where the backend gives one."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per computation
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def _block(tree: Any) -> None:
    jax.block_until_ready(tree)


def _process_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def input_pipeline_cost(datasets: data.Datasets, k: int, calls: int) -> dict[str, float]:
    """The training pipeline alone, nothing else running: host CPU seconds (all threads) and
    wall seconds per step, over `calls` stacks of k steps after a few untimed ones. On a CPU
    platform this CPU time is taken from the step's cores."""
    batch_iter = datasets.train_batches(0, k)
    for _ in range(3):
        next(batch_iter)
    cpu, wall = _process_cpu_seconds(), time.perf_counter()
    for _ in range(calls):
        next(batch_iter)
    return {
        "input_cpu_s_per_step": (_process_cpu_seconds() - cpu) / (calls * k),
        "input_wall_s_per_step": (time.perf_counter() - wall) / (calls * k),
    }


def benchmark_training(
    config: ml_collections.ConfigDict,
    steps: int = 50,
    warmup: int = 5,
    rounds: int = 3,
    *,
    measured_peak_flops: float | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Times the training step of `config` and returns every measurement as a flat dict.

    `measured_peak_flops`: a peak the caller measured (FLOP/s per device, e.g. a large bf16
    matmul); adds `mfu_measured` against it beside `mfu` against the datasheet's (on a CPU it
    replaces the 2048^2 float32 matmul measurement). `progress` is called with the figures so far
    once the step has compiled, so that a caller stopped later still has them.
    `--config.dataset=synthetic` times the step on random batches of the config's shapes."""
    run = experiment.build_run(config)
    config, datasets, model, compiled_steps = run.config, run.datasets, run.model, run.compiled
    device = jax.devices()[0]
    example = run.input_spec.example_input
    items_per_example = int(np.prod(example.shape[1:])) if config.task == "lm" else 1
    k = compiled_steps.steps_per_dispatch  # steps per call: every time below is divided by it
    pipeline_cost = input_pipeline_cost(datasets, k, max(steps, 20))
    batch_iter = datasets.train_batches(0, k)
    batches = [compiled_steps.put_train_batch(next(batch_iter)) for _ in range(min(steps, 8))]
    state = compiled_steps.from_global(run.init_state())

    with compiled_steps.context():
        start = time.perf_counter()
        lowered = compiled_steps.train_step.lower(state, batches[0])
        compiled = lowered.compile()
        compile_s = time.perf_counter() - start
        if progress is not None:
            progress({"compile_s": compile_s, "num_params": run.num_params})

        step_fn = compiled  # the executable just compiled: no second compilation
        for i in range(warmup):
            state, metrics = step_fn(state, batches[i % len(batches)])
        _block((state, metrics))

        # Single steps, each waited for: the step time distribution.
        times = []
        for i in range(steps):
            start = time.perf_counter()
            state, metrics = step_fn(state, batches[i % len(batches)])
            _block((state, metrics))
            times.append((time.perf_counter() - start) / k)

        # The real loop structure: prefetching input pipeline, at most two calls in flight,
        # metrics read once at the end (train.py reads them per log window). Its first calls
        # are not timed: they hold tf.data's start-up, which a run pays once, not per step.
        loop_iter = train.prefetch_to_device(
            datasets.train_batches(0, k), compiled_steps.put_train_batch
        )
        for _ in range(warmup):
            state, metrics = step_fn(state, next(loop_iter))
        _block((state, metrics))

        # Pipelined (dispatch all, wait once, batches already on the device) and the real loop,
        # alternated `rounds` times: the machine's speed drifts, and their difference is the
        # input's cost.
        pipelined_times, loop_times, waits = [], [], []
        for _ in range(rounds):
            start = time.perf_counter()
            for i in range(steps):
                state, metrics = step_fn(state, batches[i % len(batches)])
            _block((state, metrics))
            pipelined_times.append((time.perf_counter() - start) / (steps * k))

            wait = 0.0
            in_flight = []
            start = time.perf_counter()
            for _ in range(steps):
                t = time.perf_counter()
                batch = next(loop_iter)
                wait += time.perf_counter() - t
                state, metrics = step_fn(state, batch)
                in_flight.append(metrics)
                if len(in_flight) > 2:
                    _block(in_flight.pop(0))
            jax.device_get(in_flight)
            loop_times.append((time.perf_counter() - start) / (steps * k))
            waits.append(wait / (steps * k))
    final_loss = float(np.asarray(jax.device_get(metrics["loss"])).ravel()[-1])

    step_s = statistics.median(times)
    pipelined, loop_step = statistics.median(pipelined_times), statistics.median(loop_times)
    input_wait = max(0.0, loop_step - pipelined)
    flops = model_flops_per_step(config, model, example)
    xla_flops = _cost_flops(compiled)
    num_devices = jax.device_count()
    if measured_peak_flops and device.platform == "cpu":
        peak, peak_source = measured_peak_flops, "measured by the caller"
    else:
        peak, peak_source = peak_flops(device)
    per_step = flops["model_flops_per_step"]
    result: dict[str, Any] = {
        "config_model": config.model.name,
        "dtype": config.dtype,
        "batch_size": int(config.batch_size),
        "steps_per_dispatch": k,
        "platform": device.platform,
        "device_kind": device.device_kind,
        "num_devices": num_devices,
        "num_params": run.num_params,
        "compile_s": compile_s,
        "step_time_median_s": step_s,
        "step_time_p10_s": float(np.percentile(times, 10)),
        "step_time_p90_s": float(np.percentile(times, 90)),
        "step_time_pipelined_s": pipelined,
        "examples_per_sec": config.batch_size / step_s,
        "examples_per_sec_pipelined": config.batch_size / pipelined,
        "final_loss": final_loss,
        **flops,
        "xla_flops_per_step": None if xla_flops is None else xla_flops * num_devices,
        "achieved_flops_per_sec": per_step / step_s,
        "achieved_flops_per_sec_pipelined": per_step / pipelined,
        "peak_flops_per_sec": peak,
        "peak_source": peak_source,
        "mfu": None if peak is None else per_step / step_s / (peak * num_devices),
        "mfu_pipelined": None if peak is None else per_step / pipelined / (peak * num_devices),
        "loop_step_time_s": loop_step,
        # What the real loop costs beyond the same steps back to back on batches already on the
        # device: waiting for tf.data and the transfer, and host work competing for the cores.
        "input_wait_s_per_step": input_wait,
        "input_wait_fraction": input_wait / loop_step,
        # Time the host spent inside next() (overlapped with the calls already in flight).
        "next_batch_s_per_step": statistics.median(waits),
        **pipeline_cost,
        **_memory(compiled, device),
    }
    if measured_peak_flops:
        result["measured_peak_flops_per_sec"] = measured_peak_flops
        result["mfu_measured"] = per_step / step_s / (measured_peak_flops * num_devices)
    if config.task == "lm":
        result["tokens_per_sec"] = result["examples_per_sec"] * items_per_example
        result["tokens_per_sec_pipelined"] = config.batch_size * items_per_example / pipelined
    return result


def hbm_bandwidth(device: Any) -> float | None:
    """Memory bandwidth (bytes/s) of one device from HBM_BANDWIDTH, or None if unknown."""
    for name, bandwidth in HBM_BANDWIDTH:
        if name.lower() in device.device_kind.lower():
            return bandwidth
    return None


def _tree_bytes(tree: Any) -> int:
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def benchmark_decoding(config: ml_collections.ConfigDict, batch_sizes=(1, 16), repeats: int = 5,
                       progress: Callable[[dict[str, Any]], None] | None = None
                       ) -> dict[str, Any]:  # fmt: skip
    """Cached sampling (sampling.generate: prefill, then a lax.scan over the KV cache) of the
    config's GPT with random weights, block_size - 1 new tokens per row at each batch size:
    compile time, then the median of `repeats` calls as new tokens per second and ms per step.

    Where the device's HBM bandwidth is known (HBM_BANDWIDTH), also the share of it decoding
    uses: the bytes one step must read (the parameters as stored, and the KV cache of the whole
    window, which the masked attention reads entirely) x steps per second / bandwidth;
    `ceiling_tokens_per_sec`, the rate at which those bytes take the whole bandwidth; and
    `compute_weights_bandwidth_share`, gpt-fast's convention: the weights alone, in the compute
    dtype (config.dtype), read once a step. `progress` is
    called with the figures so far after each batch size. Raises cli.UserError for a classifier.
    """
    import sampling

    if config.task != "lm":
        raise cli.UserError(
            "--decode needs a language-model config (config.task='lm'); for a classifier, "
            "drop --decode."
        )
    run = experiment.build_run(config, training=False)
    model, params = run.model, run.init_state().params  # random weights from config.seed
    new_tokens = int(model.block_size) - 1
    param_bytes = _tree_bytes(params)
    bandwidth = hbm_bandwidth(jax.devices()[0])
    out: dict[str, Any] = {
        "decode_new_tokens": new_tokens,
        "decode_attention_impl": getattr(model, "attention_impl", None),
        "decode_param_bytes": param_bytes,
        "hbm_bandwidth_bytes_per_sec": bandwidth,
    }
    compute_bytes = run.num_params * np.dtype(run.config.dtype).itemsize
    for b in batch_sizes:
        prompt = jnp.zeros((b, 1), jnp.int32)
        generate = functools.partial(sampling.generate, model, params, prompt,
                                     max_new_tokens=new_tokens, temperature=1.0)  # fmt: skip
        start = time.perf_counter()
        generate(rng=jax.random.key(0)).block_until_ready()
        out[f"decode_b{b}_compile_s"] = time.perf_counter() - start
        times = []
        for r in range(repeats):
            start = time.perf_counter()
            generate(rng=jax.random.key(r + 1)).block_until_ready()
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        steps_per_sec = new_tokens / seconds
        out[f"decode_b{b}_tokens_per_sec"] = b * steps_per_sec
        out[f"decode_b{b}_ms_per_step"] = 1e3 / steps_per_sec
        cache = jax.eval_shape(lambda b=b: sampling.init_cache(model, b))
        step_bytes = param_bytes + _tree_bytes(cache)
        out[f"decode_b{b}_bytes_per_step"] = step_bytes
        if bandwidth:
            out[f"decode_b{b}_bandwidth_share"] = step_bytes * steps_per_sec / bandwidth
            out[f"decode_b{b}_ceiling_tokens_per_sec"] = b * bandwidth / step_bytes
            share = compute_bytes * steps_per_sec / bandwidth
            out[f"decode_b{b}_compute_weights_bandwidth_share"] = share
        if progress is not None:
            progress(dict(out))
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e6:
            return f"{value:,.4g}"
        return f"{value:.3e}"
    return str(value)


def format_table(result: dict[str, Any]) -> str:
    """Two aligned columns: measurement and value."""
    width = max(len(k) for k in result)
    return "\n".join(f"{k.ljust(width)}  {_fmt(v)}" for k, v in result.items())


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined only when run as a script: importing bench defines none)."""
    config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
    flags.DEFINE_integer("steps", 50, "Timed steps (after warm-up).", lower_bound=1)
    flags.DEFINE_integer("warmup", 5, "Untimed steps after compilation.", lower_bound=1)
    flags.DEFINE_integer(
        "rounds", 3, "Alternations of the pipelined and real-loop timings.", lower_bound=1
    )
    flags.DEFINE_bool("decode", False, "Also time cached sampling (language models).")
    flags.DEFINE_multi_integer("decode_batch", [1, 16], "Batch sizes for --decode.")
    flags.DEFINE_bool("train", True, "Time training (--notrain --decode: sampling only).")
    flags.mark_flag_as_required("config")


def main(argv: list[str]) -> None:
    """absl entry point: prints the table, then the JSON line."""
    del argv
    result: dict[str, Any] = {}
    if FLAGS.train:
        result.update(benchmark_training(FLAGS.config, FLAGS.steps, FLAGS.warmup, FLAGS.rounds))
    if FLAGS.decode:
        result.update(benchmark_decoding(FLAGS.config, tuple(FLAGS.decode_batch)))
    if not result:
        raise cli.UserError("--notrain without --decode measures nothing; add --decode.")
    print(format_table(result), flush=True)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
