"""The GPU check: one command that measures what jaxlab does on a GPU.

    python3 scripts/gpu_check.py --corpus=PATH/input.txt --exported=DIR --out=$OUT
    python scripts/gpu_check.py --dry_run [--out=DIR]   # the same parts on the CPU, tiny shapes
    python scripts/gpu_check.py --prepare_export=DIR    # (on the CPU) the artifact --exported runs

Writes `gpu_check.json` (every figure, per part, and a summary with its targets) and
`gpu_check.log` (everything the parts printed) into --out (default: $OUT, else ./gpu_check_out),
rewritten after every part so that a command stopped early still leaves what it measured.

The parts, in order (docs/gpu.md says what each measures and how):
  env          versions, the device, nvidia-smi
  matmul       the measured bf16 matmul peak (8192^3, best of several)
  checks       attention 'xla' = 'cudnn' = 'plain' on a tiny GPT (outputs and gradients);
               cached decoding = the full forward pass; a bf16 train step keeps float32
               parameters and optimizer state
  exported     an artifact exported on the CPU (tools.export, every platform) run on this device
  bench_cudnn  the 124M GPT-2 (configs/gpt2_small.py, vocabulary 50304) train step in bf16 at
  bench_xla    sequence 1024, cuDNN's or XLA's attention: step time, tokens/s, MFU against the
               datasheet peak and the measured one (tools.bench's timing, synthetic tokens)
  decode       cached decoding tokens/s at batch 1 and 64, and its share of the memory-bandwidth
               ceiling
  baby_gpt     configs/shakespeare_char.py (nanoGPT's GPU config), 5000 iterations through
               train.train_and_evaluate on --corpus, with the wall time at which validation loss
               first reaches 1.47

Each part runs in its own process (a crash, a hung kernel or an exhausted GPU loses that part
alone), timed, and killed at its limit; the limits share one budget (--budget_s, 450 s: the whole
check fits in 8 minutes), each later part keeping a reserve. Nothing here imports TensorFlow,
TFDS or ml_collections at the top: the parts import the project's modules themselves (which need
ml_collections: carry its wheel, docs/gpu.md), and a part that turns out to need TensorFlow
reports "skipped: needs TensorFlow (...)". `--dry_run` runs every part on the CPU with tiny shapes
(tests/test_gpu_check.py runs it, so the script cannot rot).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from absl import flags  # noqa: E402

import data  # noqa: E402
from runtime import cli  # noqa: E402  (absl only: no JAX, no ml_collections)

RESULT_FILE, LOG_FILE = "gpu_check.json", "gpu_check.log"
# (part, time limit in seconds, reserve: seconds kept for it while earlier parts run)
PARTS = (
    ("env", 60, 10),
    ("matmul", 60, 15),
    ("checks", 150, 40),
    ("exported", 60, 15),
    ("bench_cudnn", 180, 60),
    ("bench_xla", 180, 60),
    ("decode", 150, 45),
    ("baby_gpt", 300, 120),
)
DATASHEET_BF16_FLOPS = 989e12  # H100 SXM / H200 dense bf16 (NVIDIA datasheets)
# HBM bandwidth by device_kind substring (bytes/s; datasheets), for the decoding ceiling.
HBM_BANDWIDTH = (("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100", 2.0e12))
BABY_TARGET_LOSS = 1.47  # nanoGPT's shakespeare_char best validation loss is 1.4697
EXPORT_MODEL_FILE, EXPORT_META_FILE = "model.stablehlo", "export.json"  # tools/export.py's
EXPORT_REFERENCE_FILE = "reference.npz"  # inputs and the CPU's outputs, beside the artifact


# ----------------------------------------------------------------------------- parts


class Part:
    """What a part writes into: `report` (its figures), saved to `path` by `save()` as it goes,
    so that a part killed at its limit still leaves what it had measured."""

    def __init__(self, name: str, path: str, dry_run: bool, options: dict[str, Any]):
        self.name, self.path, self.dry_run, self.options = name, path, dry_run, options
        self.report: dict[str, Any] = {}

    def save(self) -> None:
        with open(self.path + ".tmp", "w") as f:
            json.dump(self.report, f, indent=1, default=_jsonable)
        os.replace(self.path + ".tmp", self.path)


def _jsonable(value: Any) -> Any:
    """numpy scalars and arrays, dtypes, anything else as its str()."""
    for method in ("item", "tolist"):
        if hasattr(value, method):
            with contextlib.suppress(Exception):
                return getattr(value, method)()
    return str(value)


def _on_gpu() -> bool:
    import jax

    return jax.default_backend() == "gpu"


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(fn()'s result, seconds), waiting for any device arrays it returns."""
    import jax

    start = time.perf_counter()
    result = jax.block_until_ready(fn())
    return result, time.perf_counter() - start


def part_env(part: Part) -> None:
    """Versions, the devices JAX sees, the GPU as nvidia-smi describes it."""
    import jax

    r = part.report
    r["python"] = sys.version.split()[0]
    dists = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax",
             "orbax-checkpoint", "numpy", "tensorboard", "ml-collections", "absl-py")  # fmt: skip
    versions = {}
    for dist in dists:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    r["versions"] = versions
    r["tensorflow_installed"] = importlib.util.find_spec("tensorflow") is not None
    devices = jax.devices()
    r["backend"] = jax.default_backend()
    r["device_count"] = len(devices)
    r["device_kind"] = devices[0].device_kind
    r["platform"] = devices[0].platform
    with contextlib.suppress(Exception):
        from jax.extend import backend

        r["platform_version"] = backend.get_backend().platform_version
    with contextlib.suppress(Exception):
        stats = devices[0].memory_stats() or {}
        r["device_memory_bytes"] = stats.get("bytes_limit")
    if shutil.which("nvidia-smi"):
        query = "name,driver_version,memory.total,clocks.max.sm,power.limit"
        proc = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)  # fmt: skip
        r["nvidia_smi"] = proc.stdout.strip() or proc.stderr.strip()
    if not part.dry_run and r["backend"] != "gpu":
        raise RuntimeError(f"JAX sees no GPU (backend {r['backend']!r}): nothing to measure.")


def part_matmul(part: Part) -> None:
    """bf16 matmul FLOP/s: n x n @ n x n, best (and median) of several timed calls."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    n, repeats = (256, 3) if part.dry_run else (8192, 20)
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    matmul = jax.jit(lambda x, y: x @ y)
    _, compile_s = _timed(lambda: matmul(a, b))
    times = [_timed(lambda: matmul(a, b))[1] for _ in range(repeats)]
    flops = 2.0 * n**3
    part.report.update(
        size=n,
        dtype="bfloat16",
        repeats=repeats,
        first_call_s=compile_s,
        best_s=min(times),
        best_flops_per_sec=flops / min(times),
        median_flops_per_sec=flops / float(np.median(times)),
        datasheet_flops_per_sec=DATASHEET_BF16_FLOPS if _on_gpu() else None,
    )


def _tiny_gpt_kwargs(part: Part) -> dict[str, Any]:
    if part.dry_run:
        return dict(vocab_size=65, block_size=32, num_layers=1, num_heads=2, embed_dim=32)
    return dict(vocab_size=65, block_size=128, num_layers=2, num_heads=4, embed_dim=256)


def _precision(dtype: str) -> contextlib.AbstractContextManager:
    """float32 comparisons at full matmul precision (a GPU's default may be TF32)."""
    import jax

    return (
        jax.default_matmul_precision("highest") if dtype == "float32" else contextlib.nullcontext()
    )


def _max_abs(a: Any, b: Any) -> float:
    import numpy as np

    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def _relative_tree_diff(a: Any, b: Any) -> float:
    """|a - b| / |b| over every leaf of two pytrees (global norms)."""
    import jax
    import numpy as np

    diff = sum(float(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))  # fmt: skip
    norm = sum(float(np.sum(np.asarray(y, np.float64) ** 2)) for y in jax.tree.leaves(b))
    return (diff / max(norm, 1e-30)) ** 0.5


def check_attention(part: Part) -> dict[str, Any]:
    """The three attention implementations on the same parameters and tokens: logits and
    gradients of the loss against 'plain' (the explicit reference). float32 (at 'highest'
    matmul precision) for 'xla'; bf16, cuDNN's only precision here, for 'xla' and 'cudnn'."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import linen as nn

    from models.gpt import GPT

    kwargs = _tiny_gpt_kwargs(part)
    tokens = jax.random.randint(jax.random.key(1), (4, kwargs["block_size"]), 0, 65)
    base = GPT(**kwargs, attention_impl="plain")
    params = nn.unbox(jax.jit(base.init)(jax.random.key(0), tokens)["params"])

    def loss_and_logits(params, model):
        logits = model.apply({"params": params}, tokens)
        targets = jnp.roll(tokens, -1, axis=1)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean(), logits

    out: dict[str, Any] = {}
    tolerances = {"float32": (1e-4, 1e-4), "bfloat16": (0.05, 0.05)}  # logits abs, grads rel
    for dtype, impls in (("float32", ("xla",)), ("bfloat16", ("xla", "cudnn"))):
        results = {}
        with _precision(dtype):
            for impl in ("plain", *impls):
                if impl == "cudnn" and not _on_gpu():
                    out[f"{dtype}_{impl}"] = "skipped: cuDNN attention needs a CUDA GPU"
                    continue
                model = base.clone(attention_impl=impl, dtype=jnp.dtype(dtype))
                grad_fn = jax.jit(jax.value_and_grad(loss_and_logits, has_aux=True),
                                  static_argnums=1)  # fmt: skip
                (_, logits), grads = grad_fn(params, model)
                results[impl] = (np.asarray(logits), jax.device_get(grads))
        logit_tol, grad_tol = tolerances[dtype]
        for impl in impls:
            if impl not in results:
                continue
            logits_diff = _max_abs(results[impl][0], results["plain"][0])
            grads_diff = _relative_tree_diff(results[impl][1], results["plain"][1])
            out[f"{dtype}_{impl}"] = {
                "max_abs_logit_diff_vs_plain": logits_diff,
                "relative_grad_diff_vs_plain": grads_diff,
                "passed": logits_diff <= logit_tol and grads_diff <= grad_tol,
            }
    return out


def check_cached_decoding(part: Part) -> dict[str, Any]:
    """Prefill + one token at a time through the KV cache reproduces the full forward pass's
    logits (as tests/test_gpt.py checks on the CPU), for each attention implementation."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    import sampling
    from models.gpt import GPT

    kwargs = _tiny_gpt_kwargs(part)
    length = min(24, kwargs["block_size"])
    base = GPT(**kwargs, attention_impl="plain")
    tokens = jax.random.randint(jax.random.key(2), (2, length), 0, base.vocab_size)
    params = nn.unbox(jax.jit(base.init)(jax.random.key(0), tokens)["params"])
    out: dict[str, Any] = {}
    cases = (("xla", "float32", 1e-4), ("plain", "float32", 1e-4), ("auto", "bfloat16", 0.1),
             ("cudnn", "bfloat16", 0.1))  # fmt: skip
    for impl, dtype, tolerance in cases:
        name = f"{dtype}_{impl}"
        if impl == "cudnn" and not _on_gpu():
            out[name] = "skipped: cuDNN attention needs a CUDA GPU"
            continue
        if part.dry_run and impl == "plain":
            out[name] = "skipped in the dry run: 'auto' is 'plain' on the CPU"
            continue
        model = base.clone(attention_impl=impl, dtype=jnp.dtype(dtype))
        decoder = model.clone(decode=True)

        def step(params, cache, chunk, decoder=decoder):
            return decoder.apply({"params": params, "cache": cache}, chunk, mutable=["cache"])

        with _precision(dtype):
            full = jax.jit(lambda p, t, m=model: m.apply({"params": p}, t))(params, tokens)
            step = jax.jit(step)
            cache = sampling.init_cache(model, tokens.shape[0])
            pieces = []
            for chunk in [tokens[:, :4]] + [tokens[:, t : t + 1] for t in range(4, length)]:
                logits, state = step(params, cache, chunk)
                cache = state["cache"]
                pieces.append(logits)
            diff = _max_abs(jnp.concatenate(pieces, axis=1), full)
        out[name] = {"max_abs_logit_diff": diff, "passed": diff <= tolerance}
    return out


def _lm_config(name: str, **overrides: Any):
    """A config file's config (configs/<name>.py) with `overrides` (dotted model.* keys)."""
    import importlib

    config = importlib.import_module(f"configs.{name}").get_config()
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def _build_without_data(config, training: bool = True):
    """experiment.build_run on a description of the data (int32 tokens [1, block]): no corpus;
    the vocabulary stays config.model.vocab_size."""
    import numpy as np

    import experiment

    block = int(config.model.block_size)
    spec = data.InputSpec(np.zeros((1, block), np.int32), 0, 10**9)
    return experiment.build_run(config, input_spec=spec, training=training)


def _random_batches(run, count: int, seed: int = 0) -> list[dict[str, Any]]:
    """`count` global train batches of uniformly random tokens, on the devices."""
    import numpy as np

    config = run.config
    rng = np.random.default_rng(seed)
    shape = (int(config.batch_size), int(config.model.block_size))
    vocab = int(config.model.vocab_size)
    return [
        run.compiled.put_train_batch({
            "inputs": rng.integers(0, vocab, shape).astype(np.int32),
            "targets": rng.integers(0, vocab, shape).astype(np.int32),
        })
        for _ in range(count)
    ]  # fmt: skip


def check_bf16_train_step(part: Part) -> dict[str, Any]:
    """config.dtype='bfloat16' through experiment.build_run and the compiled train step: bf16 in
    the program, float32 parameters and optimizer state after three steps, losses within 2% of
    a float32 run's."""
    import jax
    import numpy as np

    layers, width, block = (1, 32, 32) if part.dry_run else (2, 64, 64)
    model = {"model.num_layers": layers, "model.num_heads": 4, "model.embed_dim": width,
             "model.block_size": block, "model.vocab_size": 65,
             "model.dropout_rate": 0.0}  # fmt: skip
    # cuDNN's attention takes bf16 (or fp16) only: the float32 reference uses XLA's on a GPU.
    impls = {"float32": "xla" if _on_gpu() else "auto",
             "bfloat16": "cudnn" if _on_gpu() else "auto"}  # fmt: skip
    out: dict[str, Any] = {"attention_impl": impls}
    losses = {}
    # The float32 reference run only on the device (the dry run checks the bf16 path alone).
    for dtype in ("bfloat16",) if part.dry_run else ("float32", "bfloat16"):
        config = _lm_config("shakespeare_char", dtype=dtype, batch_size=8,
                            num_train_steps=10, steps_per_dispatch=1,
                            **{"model.attention_impl": impls[dtype]}, **model)  # fmt: skip
        run = _build_without_data(config)
        compiled = run.compiled
        state = compiled.from_global(run.init_state())
        batches = _random_batches(run, 3)
        losses[dtype] = []
        with compiled.context(), jax.default_matmul_precision("highest"):
            lowered = compiled.train_step.lower(state, batches[0])
            if dtype == "bfloat16":
                out["bf16_in_program"] = "bf16" in lowered.as_text()
            step_fn = lowered.compile()
            for batch in batches:
                state, metrics = step_fn(state, batch)
                losses[dtype].append(float(metrics["loss"]))
        floating = [x for x in jax.tree.leaves((state.params, state.opt_state))
                    if np.issubdtype(x.dtype, np.floating)]  # fmt: skip
        out[f"{dtype}_state_dtypes"] = sorted({str(x.dtype) for x in floating})
    out["losses"] = losses
    reference = losses.get("float32", losses["bfloat16"])
    close = bool(np.allclose(losses["bfloat16"], reference, rtol=0.02))
    out["passed"] = (out["bf16_in_program"] and out["bfloat16_state_dtypes"] == ["float32"]
                     and close and all(np.isfinite(losses["bfloat16"])))  # fmt: skip
    return out


def part_checks(part: Part) -> None:
    """The GPU-relevant correctness checks, each in its own try."""
    checks = (("attention", check_attention), ("cached_decoding", check_cached_decoding),
              ("bf16_train_step", check_bf16_train_step))  # fmt: skip
    failed = []
    for name, check in checks:
        start = time.perf_counter()
        try:
            part.report[name] = check(part)
        except Exception as e:
            part.report[name] = {"error": _error_text(e), "passed": False}
        part.report[name + "_s"] = time.perf_counter() - start
        part.save()
        results = part.report[name]
        entries = results.values() if "passed" not in results else [results]
        failed += [name for v in entries if isinstance(v, dict) and v.get("passed") is False]
    part.report["passed"] = not failed
    if failed:
        part.report["failed_checks"] = sorted(set(failed))


def prepare_export(directory: str) -> dict[str, Any]:
    """A tiny GPT (random weights) exported by tools.export for every platform, with inputs and
    this machine's outputs beside it (reference.npz): run on the CPU, carried to the GPU."""
    import jax
    import numpy as np
    from flax import linen as nn

    from models.gpt import GPT
    from tools import export

    model = GPT(vocab_size=65, block_size=64, num_layers=2, num_heads=4, embed_dim=128)
    example = np.zeros((1, 64), np.int32)
    variables = jax.device_get(nn.unbox(model.init(jax.random.key(0), example)))
    exported = export.export_forward(export.portable_model(model), variables, example)
    inputs = np.random.default_rng(0).integers(0, 65, (3, 64)).astype(np.int32)
    outputs = np.asarray(exported.call(inputs))
    expected = np.asarray(jax.jit(model.apply)(variables, inputs))
    if not np.allclose(outputs, expected, atol=1e-4):
        raise AssertionError("The exported model's CPU outputs differ from the model's.")
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, EXPORT_MODEL_FILE), "wb") as f:
        f.write(exported.serialize())
    meta = {
        "model": "gpt (2 layers, 4 heads, 128 wide, block 64, vocabulary 65; random weights)",
        "input_shape": ["batch", 64],
        "input_dtype": "int32",
        "platforms": list(exported.platforms),
        "exported_on": jax.default_backend(),
        "jax": jax.__version__,
        "format": "jax.export serialized StableHLO",
    }
    with open(os.path.join(directory, EXPORT_META_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    np.savez(os.path.join(directory, EXPORT_REFERENCE_FILE), inputs=inputs, outputs=outputs)
    return meta


def part_exported(part: Part) -> None:
    """Loads --exported (jax.export alone: no model code) and runs it here; compares with the
    outputs of the machine that exported it where reference.npz is there."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import export as jax_export

    directory = part.options.get("exported")
    if not directory:
        part.report["skipped"] = "no --exported=DIR given"
        return
    r = part.report
    with open(os.path.join(directory, EXPORT_MODEL_FILE), "rb") as f:
        exported = jax_export.deserialize(bytearray(f.read()))
    with open(os.path.join(directory, EXPORT_META_FILE)) as f:
        meta = json.load(f)
    r["platforms"] = list(exported.platforms)
    r["exported_on"] = meta.get("exported_on", "cpu")
    reference = os.path.join(directory, EXPORT_REFERENCE_FILE)
    if os.path.exists(reference):
        data = np.load(reference)
        inputs, expected = data["inputs"], data["outputs"]
    else:  # any tools.export artifact: random inputs of its declared shape
        shape = [3 if d == "batch" else int(d) for d in meta["input_shape"]]
        inputs = np.random.default_rng(0).integers(0, 2, shape).astype(meta["input_dtype"])
        expected = None
    args = jnp.asarray(inputs, exported.in_avals[0].dtype)
    outputs, first_s = _timed(lambda: exported.call(args))
    r["first_call_s"] = first_s
    r["call_s"] = _timed(lambda: exported.call(args))[1]
    r["ran_on"] = sorted({d.platform for d in outputs.devices()})
    r["output_shape"] = list(outputs.shape)
    finite = bool(np.all(np.isfinite(np.asarray(outputs))))
    r["passed"] = finite and r["ran_on"] == [jax.default_backend()]
    if expected is not None:
        # float32 matmuls on a GPU may use TF32: compare relative to the outputs' scale.
        diff = _max_abs(outputs, expected)
        r["max_abs_diff_vs_exporting_machine"] = diff
        r["passed"] = r["passed"] and diff <= 1e-2 * max(1.0, float(np.max(np.abs(expected))))


def _datasheet_peak(device_kind: str) -> float | None:
    try:
        from tools.bench import PEAK_FLOPS
    except Exception:  # the table only: fall back to the H100/H200 datasheet figure on a GPU
        return DATASHEET_BF16_FLOPS if _on_gpu() else None
    for name, value in PEAK_FLOPS:
        if name.lower() in device_kind.lower():
            return value
    return None


def _peak_memory(device: Any) -> int | None:
    with contextlib.suppress(Exception):
        return (device.memory_stats() or {}).get("peak_bytes_in_use")
    return None


def bench_training(part: Part, attention_impl: str) -> None:
    """tools.bench's timing of the 124M GPT-2 train step (compile; median of single steps, each
    waited for; mean of a pipelined run) on synthetic tokens, bf16, sequence 1024."""
    import jax
    import numpy as np

    import models

    r = part.report
    if attention_impl == "cudnn" and not _on_gpu():
        r["skipped"] = "cuDNN attention needs a CUDA GPU"
        return
    overrides: dict[str, Any] = {"model.vocab_size": 50304, "model.attention_impl": attention_impl,
                                 "dtype": "bfloat16", "num_train_steps": 1000}  # fmt: skip
    steps, warmup = 20, 3
    if part.dry_run:
        overrides.update({"model.num_layers": 2, "model.num_heads": 4, "model.embed_dim": 64,
                          "model.block_size": 64, "model.vocab_size": 512})  # fmt: skip
        steps, warmup = 3, 1
    overrides["batch_size"] = part.options.get("gpt2_batch") or (4 if part.dry_run else 32)
    config = _lm_config("gpt2_small", **overrides)
    run = _build_without_data(config)
    config, model, compiled = run.config, run.model, run.compiled
    r.update(attention_impl=attention_impl, dtype=config.dtype, batch_size=int(config.batch_size),
             seq_len=int(config.model.block_size), vocab_size=int(config.model.vocab_size),
             num_params=run.num_params, num_layers=int(config.model.num_layers))  # fmt: skip
    state = compiled.from_global(run.init_state())
    batches = _random_batches(run, 4)
    device = jax.devices()[0]
    with compiled.context():
        start = time.perf_counter()
        step_fn = compiled.train_step.lower(state, batches[0]).compile()
        r["compile_s"] = time.perf_counter() - start
        part.save()
        for i in range(warmup):
            state, metrics = step_fn(state, batches[i % len(batches)])
        jax.block_until_ready((state, metrics))
        times = []
        for i in range(steps):
            start = time.perf_counter()
            state, metrics = step_fn(state, batches[i % len(batches)])
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        for i in range(steps):
            state, metrics = step_fn(state, batches[i % len(batches)])
        jax.block_until_ready((state, metrics))
        pipelined = (time.perf_counter() - start) / steps
    step_s = float(np.median(times))
    seq = int(config.model.block_size)
    per_token = models.model_module("gpt").training_flops_per_token(model, seq)
    flops = per_token * seq * int(config.batch_size)
    datasheet = _datasheet_peak(device.device_kind)
    measured = part.options.get("measured_peak_flops")
    achieved = flops / step_s
    r.update(
        device_kind=device.device_kind,
        step_time_median_s=step_s,
        step_time_p10_s=float(np.percentile(times, 10)),
        step_time_p90_s=float(np.percentile(times, 90)),
        step_time_pipelined_s=pipelined,
        tokens_per_sec=int(config.batch_size) * seq / step_s,
        tokens_per_sec_pipelined=int(config.batch_size) * seq / pipelined,
        model_flops_per_step=flops,
        flops_formula="models/gpt.py training_flops_per_token: 6N + 12LHQT (nanoGPT, PaLM)",
        achieved_flops_per_sec=achieved,
        achieved_flops_per_sec_pipelined=flops / pipelined,
        datasheet_peak_flops_per_sec=datasheet,
        mfu_datasheet=None if datasheet is None else achieved / datasheet,
        mfu_datasheet_pipelined=None if datasheet is None else flops / pipelined / datasheet,
        measured_peak_flops_per_sec=measured,
        mfu_measured=None if not measured else achieved / measured,
        final_loss=float(np.asarray(metrics["loss"])),
        peak_device_memory_bytes=_peak_memory(device),
    )
    with contextlib.suppress(Exception):
        cost = step_fn.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        r["xla_flops_per_step"] = float(cost["flops"])


def part_bench_cudnn(part: Part) -> None:
    bench_training(part, "cudnn")


def part_bench_xla(part: Part) -> None:
    bench_training(part, "xla")


def _bandwidth(device_kind: str) -> float | None:
    for name, value in HBM_BANDWIDTH:
        if name.lower() in device_kind.lower():
            return value
    return None


def part_decode(part: Part) -> None:
    """Cached decoding (sampling.generate: prefill, then a lax.scan over the KV cache) of the
    124M GPT-2 in bf16, random weights, block_size - 1 new tokens per row, at batch 1 and 64:
    tokens/s, and the bytes one decoding step must read (parameters as stored, float32; the
    bf16 KV cache of the whole window, as the masked attention reads it) against the HBM
    bandwidth."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    import sampling

    overrides: dict[str, Any] = {"model.vocab_size": 50304, "dtype": "bfloat16"}
    batch_sizes, repeats = (1, 64), 3
    if part.dry_run:
        overrides.update({"model.num_layers": 2, "model.num_heads": 4, "model.embed_dim": 64,
                          "model.block_size": 64, "model.vocab_size": 512})  # fmt: skip
        batch_sizes, repeats = (2,), 1
    config = _lm_config("gpt2_small", **overrides)
    run = _build_without_data(config, training=False)
    model, params = run.model, run.init_state().params
    device = jax.devices()[0]
    new_tokens = int(model.block_size) - 1
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    num_params = sum(x.size for x in jax.tree.leaves(params))
    bandwidth = _bandwidth(device.device_kind)
    r = part.report
    r.update(device_kind=device.device_kind, new_tokens=new_tokens, num_params=num_params,
             param_bytes=param_bytes, attention_impl=model.attention_impl,
             hbm_bandwidth_bytes_per_sec=bandwidth)  # fmt: skip
    itemsize = jnp.dtype(config.dtype).itemsize
    for b in batch_sizes:
        prompt = jnp.zeros((b, 1), jnp.int32)
        generate = functools.partial(sampling.generate, model, params, prompt,
                                     max_new_tokens=new_tokens, temperature=1.0)  # fmt: skip
        _, compile_s = _timed(lambda g=generate: g(rng=jax.random.key(0)))
        times = [_timed(lambda g=generate, i=i: g(rng=jax.random.key(i + 1)))[1]
                 for i in range(repeats)]  # fmt: skip
        seconds = float(np.median(times))
        steps_per_sec = new_tokens / seconds
        kv_bytes = 2 * model.num_layers * b * model.block_size * model.embed_dim * itemsize
        entry = {
            "compile_s": compile_s,
            "seconds": seconds,
            "tokens_per_sec": b * steps_per_sec,
            "ms_per_step": 1e3 / steps_per_sec,
            "bytes_per_step": param_bytes + kv_bytes,
        }
        if bandwidth:
            entry["bandwidth_share"] = (param_bytes + kv_bytes) * steps_per_sec / bandwidth
            entry["ceiling_tokens_per_sec"] = b * bandwidth / (param_bytes + kv_bytes)
            # gpt-fast's convention: the weights in the compute dtype, read once per step.
            entry["bf16_weights_bandwidth_share"] = num_params * 2 * steps_per_sec / bandwidth
        r[f"batch_{b}"] = entry
        part.save()


def part_baby_gpt(part: Part) -> None:
    """configs/shakespeare_char.py trained by train.train_and_evaluate on --corpus, recording
    the wall time of every evaluation (seconds since train_and_evaluate was called) and the
    first one whose validation loss reaches BABY_TARGET_LOSS."""
    import numpy as np

    r = part.report
    corpus = part.options.get("corpus")
    workdir = tempfile.mkdtemp(prefix="gpu_check_baby_")
    os.environ.setdefault("JAXLAB_TOKENS_DIR", os.path.join(workdir, "tokens"))
    if not corpus:
        if not part.dry_run:
            r["skipped"] = "no --corpus=PATH (Tiny Shakespeare's input.txt) given"
            return
        corpus = os.path.join(workdir, "corpus.txt")
        rng = np.random.default_rng(0)
        words = ["the", "king", "and", "thou", "art", "my", "lord", "speak", "of", "love"]
        with open(corpus, "w") as f:
            f.write("\n".join(" ".join(rng.choice(words, 8)) for _ in range(400)) + "\n")
    import train
    from runtime import metrics_writer

    overrides: dict[str, Any] = {"dataset": os.path.abspath(corpus),
                                 "dtype": part.options.get("baby_dtype") or "bfloat16"}  # fmt: skip
    if part.options.get("baby_steps_per_dispatch"):
        overrides["steps_per_dispatch"] = part.options["baby_steps_per_dispatch"]
    if part.dry_run:
        overrides.update({"model.num_layers": 1, "model.num_heads": 2, "model.embed_dim": 32,
                          "model.block_size": 32, "batch_size": 8, "num_train_steps": 20,
                          "decay_steps": 20, "warmup_steps": 2, "eval_every_steps": 10,
                          "eval_steps": 2, "eval_batch_size": 8, "log_every_steps": 5,
                          "checkpoint_every_steps": 10, "sample_every_eval": False})  # fmt: skip
    config = _lm_config("shakespeare_char", **overrides)
    fields = ("dtype", "batch_size", "num_train_steps", "eval_every_steps", "eval_steps",
              "steps_per_dispatch")  # fmt: skip
    r.update(config={k: config[k] for k in fields},
             model=config.model.to_dict(), target_val_loss=BABY_TARGET_LOSS,
             val_curve=[], reached_target_wall_s=None, reached_target_step=None)  # fmt: skip
    start = time.perf_counter()
    train_logs: list[tuple[int, float]] = []
    original = metrics_writer.MetricsWriter.write_scalars

    def recording(self, step, scalars, prefix=""):
        original(self, step, scalars, prefix)
        now = time.perf_counter() - start
        if prefix == "train/" and len(train_logs) < 2:
            train_logs.append((int(step), now))
        if prefix == "val/" and "loss" in scalars:
            loss = float(np.asarray(scalars["loss"]))
            r["val_curve"].append([int(step), round(now, 3), loss])
            if r["reached_target_step"] is None and loss <= BABY_TARGET_LOSS:
                r["reached_target_step"], r["reached_target_wall_s"] = int(step), now
            r["best_val_loss"] = min(loss, r.get("best_val_loss", np.inf))
            part.save()

    metrics_writer.MetricsWriter.write_scalars = recording
    try:
        final = train.train_and_evaluate(config, os.path.join(workdir, "run"))
    finally:
        metrics_writer.MetricsWriter.write_scalars = original
    r["total_wall_s"] = time.perf_counter() - start
    r["final_metrics"] = {k: v for k, v in final.items() if np.ndim(v) == 0}
    if len(train_logs) == 2:
        # Start-up (data preparation, compilation) = the first log's time less its steps at the
        # pace of the second log window.
        (s1, t1), (s2, t2) = train_logs
        per_step = (t2 - t1) / (s2 - s1)
        r["startup_s_estimate"] = t1 - s1 * per_step
        r["train_step_s_estimate"] = per_step
        if r["reached_target_wall_s"] is not None:
            r["reached_target_training_s"] = r["reached_target_wall_s"] - r["startup_s_estimate"]
    rows = metrics_writer.read_jsonl(os.path.join(workdir, "run", "metrics.jsonl"))
    rates = [row["train/tokens_per_sec"] for row in rows if "train/tokens_per_sec" in row]
    r["tokens_per_sec_median"] = float(np.median(rates)) if rates else None
    shutil.rmtree(workdir, ignore_errors=True)


PART_FUNCTIONS: dict[str, Callable[[Part], None]] = {
    "env": part_env,
    "matmul": part_matmul,
    "checks": part_checks,
    "exported": part_exported,
    "bench_cudnn": part_bench_cudnn,
    "bench_xla": part_bench_xla,
    "decode": part_decode,
    "baby_gpt": part_baby_gpt,
}


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e)[:2000]}"


def _missing_module_note(e: ModuleNotFoundError) -> str | None:
    """'skipped: needs TensorFlow (...)' for TensorFlow/TFDS, a hint for ml_collections."""
    name = (e.name or "").split(".")[0]
    if name in ("tensorflow", "tensorflow_datasets"):
        frames = traceback.extract_tb(e.__traceback__)
        ours = [f for f in frames if f.filename.startswith(REPO)]
        where = ours[-1] if ours else frames[-1]
        return (f"skipped: needs TensorFlow ({name} imported by "
                f"{os.path.relpath(where.filename, REPO)}:{where.lineno})")  # fmt: skip
    return None


def run_part(name: str, result_path: str, dry_run: bool, options: dict[str, Any]) -> int:
    """Runs one part in this process; its report goes to `result_path`. Exit status 1 if it
    raised."""
    part = Part(name, result_path, dry_run, options)
    start = time.perf_counter()
    status = 0
    try:
        if dry_run:  # the CPU, whatever this machine has
            import jax

            jax.config.update("jax_platforms", "cpu")
        import jax

        jax.config.update("jax_threefry_partitionable", True)  # as train.py
        PART_FUNCTIONS[name](part)
    except ModuleNotFoundError as e:
        note = _missing_module_note(e)
        if note is None:
            part.report["error"] = _error_text(e)
            if (e.name or "").startswith("ml_collections"):
                part.report["error"] += " (carry the ml-collections wheel: docs/gpu.md)"
            status = 1
        else:
            part.report["skipped"] = note
        part.report["traceback"] = traceback.format_exc()[-4000:]
    except Exception as e:
        part.report["error"] = _error_text(e)
        if isinstance(e, ImportError) and "flatbuffers" in str(e):  # jax.export's serializer
            part.report["error"] += " (carry the flatbuffers wheel: docs/gpu.md)"
        part.report["traceback"] = traceback.format_exc()[-4000:]
        status = 1
    part.report["seconds"] = time.perf_counter() - start
    part.report["tensorflow_imported"] = "tensorflow" in sys.modules
    part.save()
    traceback_text = part.report.get("traceback")
    if traceback_text:
        print(traceback_text, file=sys.stderr, flush=True)
    return status


# ----------------------------------------------------------------------------- the driver


class Driver:
    """Runs the parts one after another, each in a child process, within one time budget."""

    def __init__(self, out: str, budget_s: float, dry_run: bool, options: dict[str, Any]):
        self.out, self.dry_run, self.options = out, dry_run, dict(options)
        self.deadline = time.monotonic() + budget_s
        os.makedirs(out, exist_ok=True)
        self.log_path = os.path.join(out, LOG_FILE)
        self.result: dict[str, Any] = {
            "command": " ".join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]),
            "dry_run": dry_run,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "budget_s": budget_s,
            "parts": {},
        }
        self.scratch = tempfile.mkdtemp(prefix="gpu_check_")
        open(self.log_path, "w").close()

    def log(self, message: str) -> None:
        print(message, flush=True)
        with open(self.log_path, "a") as f:
            f.write(message + "\n")

    def write(self) -> None:
        self.result["summary"] = summarize(self.result["parts"], self.dry_run)
        path = os.path.join(self.out, RESULT_FILE)
        with open(path + ".tmp", "w") as f:
            json.dump(self.result, f, indent=2, default=_jsonable)
        os.replace(path + ".tmp", path)

    def child(self, args: list[str], timeout: float) -> tuple[int | None, float]:
        """Runs this script with `args` in its own process group; (exit status or None if it
        was killed at `timeout`, seconds)."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.dry_run:
            # The CPU, and XLA's quickest compilation: the dry run tests the script, not speed.
            env["JAX_PLATFORMS"] = "cpu"
            flags_ = env.get("XLA_FLAGS", "")
            env["XLA_FLAGS"] = f"{flags_} --xla_backend_optimization_level=0".strip()
        start = time.monotonic()
        with open(self.log_path, "a") as log:
            proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *args],
                                    cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # fmt: skip
            try:
                status = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the child's own group: it and its helpers
                proc.wait()
                status = None
        return status, time.monotonic() - start

    def run(self, names: list[str]) -> None:
        if self.dry_run and not self.options.get("exported") and "exported" in names:
            directory = os.path.join(self.scratch, "exported")
            self.log(f"== prepare_export (dry run: exported on the CPU into {directory})")
            status, _ = self.child([f"--prepare_export={directory}"], 120)
            if status == 0:
                self.options["exported"] = directory
        selected = [p for p in PARTS if p[0] in names]
        for i, (name, limit, _) in enumerate(selected):
            reserve = sum(r for _, _, r in selected[i + 1 :])
            left = self.deadline - time.monotonic()
            timeout = min(limit, left - reserve)
            if timeout < 10:
                self.result["parts"][name] = {
                    "status": "skipped",
                    "skipped": f"out of time: {left:.0f} s of the budget left",
                }
                self.log(f"== {name}: skipped (out of time)")
                self.write()
                continue
            self.log(f"== {name} (limit {timeout:.0f} s)")
            self.result["parts"][name] = self.run_one(name, timeout)
            report = self.result["parts"][name]
            self.log(f"== {name}: {report['status']} in {report['wall_s']:.1f} s"
                     + (f" ({report.get('error') or report.get('skipped')})"
                        if report["status"] != "ok" else ""))  # fmt: skip
            if name == "matmul" and report.get("best_flops_per_sec"):
                self.options["measured_peak_flops"] = report["best_flops_per_sec"]
            self.write()
        shutil.rmtree(self.scratch, ignore_errors=True)

    def run_one(self, name: str, timeout: float) -> dict[str, Any]:
        path = os.path.join(self.scratch, f"{name}.json")
        args = [f"--part={name}", f"--result_file={path}"] + _option_flags(self.options)
        if self.dry_run:
            args.append("--dry_run")
        status, wall = self.child(args, timeout)
        report: dict[str, Any] = {}
        if os.path.exists(path):
            with open(path) as f:
                report = json.load(f)
        if status is None:
            report["status"] = "timed_out"
            report["error"] = f"killed at its limit of {timeout:.0f} s (figures up to then kept)"
        elif report.get("skipped"):
            report["status"] = "skipped"
        elif status != 0 or "error" in report:
            report["status"] = "failed"
            report.setdefault("error", f"exit status {status}, no report (see {LOG_FILE})")
        else:
            report["status"] = "ok"
        report["wall_s"] = wall
        report["limit_s"] = timeout
        return report


OPTION_FLAGS = ("corpus", "exported", "gpt2_batch", "baby_dtype", "baby_steps_per_dispatch",
                "measured_peak_flops")  # fmt: skip


def _option_flags(options: dict[str, Any]) -> list[str]:
    return [f"--{k}={options[k]}" for k in OPTION_FLAGS if options.get(k) not in (None, "")]


def summarize(parts: dict[str, Any], dry_run: bool) -> dict[str, Any]:
    """The headline figures and the targets, from the parts' reports."""

    def get(part: str, *keys: str) -> Any:
        node: Any = parts.get(part, {})
        for key in keys:
            if not isinstance(node, dict):
                return None
            node = node.get(key)
        return node

    s: dict[str, Any] = {
        "device_kind": get("env", "device_kind"),
        "jax": get("env", "versions", "jax"),
        "status": {name: report.get("status") for name, report in parts.items()},
        "matmul_bf16_tflops": _scaled(get("matmul", "best_flops_per_sec"), 1e-12),
        "checks_passed": get("checks", "passed"),
        "exported_ran_on": get("exported", "ran_on"),
        "exported_passed": get("exported", "passed"),
    }
    for impl in ("cudnn", "xla"):
        s[f"gpt2_124m_{impl}"] = {
            "mfu_datasheet": get(f"bench_{impl}", "mfu_datasheet"),
            "mfu_measured_peak": get(f"bench_{impl}", "mfu_measured"),
            "tokens_per_sec": get(f"bench_{impl}", "tokens_per_sec"),
            "step_time_median_s": get(f"bench_{impl}", "step_time_median_s"),
        }
    s["baby_gpt"] = {
        "reached_1.47_wall_s": get("baby_gpt", "reached_target_wall_s"),
        "reached_1.47_training_s": get("baby_gpt", "reached_target_training_s"),
        "reached_1.47_step": get("baby_gpt", "reached_target_step"),
        "best_val_loss": get("baby_gpt", "best_val_loss"),
        "total_wall_s": get("baby_gpt", "total_wall_s"),
    }
    decode = parts.get("decode", {})
    s["decode"] = {
        key: {k: v.get(k) for k in ("tokens_per_sec", "bandwidth_share")}
        for key, v in decode.items()
        if key.startswith("batch_") and isinstance(v, dict)
    }
    mfus = [m for impl in ("cudnn", "xla") if (m := s[f"gpt2_124m_{impl}"]["mfu_datasheet"])]
    reached = s["baby_gpt"]["reached_1.47_wall_s"]
    s["targets"] = {
        "gpt2_124m_mfu_at_least_50pct_of_989": (max(mfus) >= 0.5) if mfus else None,
        "baby_gpt_1.47_within_60s_wall": None if reached is None else reached <= 60,
    }
    if dry_run:
        s["note"] = "dry run on the CPU with tiny shapes: the figures test the script only"
    return s


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


# ----------------------------------------------------------------------------- the command

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined only when run as a script)."""
    flags.DEFINE_string("out", None, "Directory for gpu_check.json and gpu_check.log (default: "
                        "$OUT, else ./gpu_check_out).")  # fmt: skip
    flags.DEFINE_bool("dry_run", False, "Every part on the CPU with tiny shapes (seconds).")
    flags.DEFINE_string("corpus", None, "Tiny Shakespeare's input.txt, for the baby GPT.")
    flags.DEFINE_string("exported", None, "A tools.export artifact (or --prepare_export's) to run.")
    flags.DEFINE_string("prepare_export", None, "Export a tiny GPT for every platform into this "
                        "directory (with reference inputs and outputs) and exit.")  # fmt: skip
    flags.DEFINE_list("parts", [p[0] for p in PARTS], "Parts to run, in the script's order.")
    flags.DEFINE_float("budget_s", 450.0, "Seconds all parts together may take.")
    flags.DEFINE_integer("gpt2_batch", None, "Global batch of the GPT-2 bench (default 32).")
    flags.DEFINE_string("baby_dtype", "bfloat16", "Compute dtype of the baby GPT (nanoGPT's GPU "
                        "runs autocast to bf16).")  # fmt: skip
    flags.DEFINE_integer("baby_steps_per_dispatch", None, "Override the baby GPT's "
                         "steps_per_dispatch (default: its config's, 1).")  # fmt: skip
    flags.DEFINE_float("measured_peak_flops", None, "(set by the driver) The matmul part's peak.")
    flags.DEFINE_string("part", None, "(internal) Run this one part in this process.")
    flags.DEFINE_string("result_file", None, "(internal) Where --part writes its report.")


def main(argv: list[str]) -> int:
    """absl entry point: one part (--part), the export (--prepare_export), or the whole check."""
    del argv
    options = {k: FLAGS[k].value for k in OPTION_FLAGS}
    for key in ("corpus", "exported"):  # the parts run from the repository root
        if options[key]:
            options[key] = os.path.abspath(options[key])
    if FLAGS.part:
        if FLAGS.part not in PART_FUNCTIONS:
            raise cli.UserError(f"--part={FLAGS.part!r}: use one of {sorted(PART_FUNCTIONS)}.")
        return run_part(FLAGS.part, FLAGS.result_file, FLAGS.dry_run, options)
    if FLAGS.prepare_export:
        if FLAGS.dry_run or os.environ.get("JAX_PLATFORMS") is None:
            import jax

            jax.config.update("jax_platforms", "cpu")  # exported on the CPU: that is the point
        print(json.dumps(prepare_export(FLAGS.prepare_export)), flush=True)
        return 0
    unknown = sorted(set(FLAGS.parts) - set(PART_FUNCTIONS))
    if unknown:
        raise cli.UserError(f"--parts: unknown {unknown}; the parts are {list(PART_FUNCTIONS)}.")
    if FLAGS.corpus and not os.path.isfile(FLAGS.corpus):
        raise cli.UserError(f"--corpus={FLAGS.corpus}: no such file.")
    if FLAGS.exported and not os.path.isfile(os.path.join(FLAGS.exported, EXPORT_MODEL_FILE)):
        raise cli.UserError(f"--exported={FLAGS.exported}: no {EXPORT_MODEL_FILE} there.")
    out = FLAGS.out or os.environ.get("OUT") or "gpu_check_out"
    driver = Driver(out, FLAGS.budget_s, FLAGS.dry_run, options)
    start = time.monotonic()
    driver.run(list(FLAGS.parts))
    parts = driver.result["parts"]
    driver.result["wall_s"] = time.monotonic() - start
    driver.write()
    driver.log(json.dumps(driver.result["summary"]))
    driver.log(f"Wrote {os.path.join(out, RESULT_FILE)} and {os.path.join(out, LOG_FILE)}.")
    return int(any(p["status"] in ("failed", "timed_out") for p in parts.values()))


if __name__ == "__main__":
    define_flags()
    cli.run(main)
