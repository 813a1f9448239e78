"""Measures jaxlab on an NVIDIA GPU in one command: the bf16 matmul peak, GPT-2 124M's training
step time and MFU, cached decoding against the memory bandwidth, and the wall time for the baby
GPT to reach nanoGPT's validation loss.

    python3 scripts/gpu_check.py --corpus=PATH/input.txt --exported=DIR --out=$OUT
    python scripts/gpu_check.py --dry_run [--out=DIR]   # the same parts on the CPU, tiny shapes
    python scripts/gpu_check.py --prepare_export=DIR    # (on the CPU) the artifact --exported runs

Writes `gpu_check.json` (every figure, per part, and a summary with its targets) and
`gpu_check.log` (everything the parts printed) into --out (default: $OUT, else ./gpu_check_out),
rewritten after every part so that a command stopped early still leaves what it measured.

The parts, in order (docs/gpu.md says what each measures and how):
  env          versions, the device, nvidia-smi
  matmul       the measured bf16 matmul peak (8192^3, best of several)
  exported     an artifact exported on the CPU (tools.export, every platform) run on this device
  bench_cudnn  the 124M GPT-2 (configs/gpt2_small.py, vocabulary 50304) train step in bf16 at
  bench_xla    sequence 1024 on synthetic tokens (config.dataset='synthetic'), cuDNN's or XLA's
               attention, timed by tools.bench.benchmark_training: step time, tokens/s, MFU
               against the datasheet peak and the measured one
  decode       tools.bench.benchmark_decoding of the same model: cached decoding tokens/s at
               batch 1 and 64, and its share of the memory-bandwidth ceiling
  baby_gpt     configs/shakespeare_char.py (nanoGPT's GPU config), 5000 iterations through
               train.train_and_evaluate on --corpus, with the wall time at which validation loss
               first reaches 1.47

Correctness on the GPU (the attention implementations agree, cached decoding equals the forward
pass, bf16 compute keeps float32 state) is tested rather than measured: `python -m pytest
tests/test_gpt.py` on the GPU machine runs those tests there, cuDNN's cases included.

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

from runtime import cli  # noqa: E402  (absl only: no JAX, no ml_collections)

RESULT_FILE, LOG_FILE = "gpu_check.json", "gpu_check.log"
# (part, time limit in seconds, reserve: seconds kept for it while earlier parts run)
PARTS = (
    ("env", 60, 10),
    ("matmul", 60, 15),
    ("exported", 60, 15),
    ("bench_cudnn", 180, 60),
    ("bench_xla", 180, 60),
    ("decode", 150, 45),
    ("baby_gpt", 300, 120),
)
DATASHEET_BF16_FLOPS = 989e12  # H100 SXM / H200 dense bf16 (NVIDIA datasheets)
BABY_TARGET_LOSS = 1.47  # nanoGPT's shakespeare_char best validation loss is 1.4697
EXPORT_MODEL_FILE = "model.stablehlo"  # tools/export.py's MODEL_FILE (no JAX import here)


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
    """bf16 matmul FLOP/s (tools.bench.time_matmul): n x n @ n x n, best and median of
    several timed calls; the best is the measured peak the bench parts' MFU divides by."""
    import jax.numpy as jnp

    from tools import bench

    n, repeats = (256, 3) if part.dry_run else (8192, 20)
    part.report.update(size=n, dtype="bfloat16", repeats=repeats)
    part.report.update(bench.time_matmul(n, jnp.bfloat16, repeats))
    part.report["datasheet_flops_per_sec"] = DATASHEET_BF16_FLOPS if _on_gpu() else None


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


def part_exported(part: Part) -> None:
    """tools.export.check_exported on --exported: an artifact exported on another machine (a
    CPU) run here, its outputs against that machine's where it left a reference."""
    directory = part.options.get("exported")
    if not directory:
        part.report["skipped"] = "no --exported=DIR given"
        return
    from tools import export

    part.report.update(export.check_exported(directory))


# The 124M GPT-2 in bf16 on synthetic tokens; the dry run's tiny stand-in.
GPT2_OVERRIDES = {"dataset": "synthetic", "model.vocab_size": 50304, "dtype": "bfloat16"}
DRY_RUN_GPT = {"model.num_layers": 2, "model.num_heads": 4, "model.embed_dim": 64,
               "model.block_size": 64, "model.vocab_size": 512}  # fmt: skip


def bench_training(part: Part, attention_impl: str) -> None:
    """tools.bench.benchmark_training of the 124M GPT-2 train step (compile; median of single
    steps, each waited for; mean of a pipelined run; the real loop) on synthetic tokens, bf16,
    sequence 1024; MFU against the datasheet peak and the matmul part's measured one."""
    from tools import bench

    r = part.report
    if attention_impl == "cudnn" and not _on_gpu():
        r["skipped"] = "cuDNN attention needs a CUDA GPU"
        return
    overrides = {**GPT2_OVERRIDES, "model.attention_impl": attention_impl, "num_train_steps": 1000}
    steps, warmup = 20, 3
    if part.dry_run:
        overrides.update(DRY_RUN_GPT)
        steps, warmup = 3, 1
    overrides["batch_size"] = part.options.get("gpt2_batch") or (4 if part.dry_run else 32)
    config = _lm_config("gpt2_small", **overrides)
    r.update(attention_impl=attention_impl, seq_len=int(config.model.block_size),
             vocab_size=int(config.model.vocab_size),
             num_layers=int(config.model.num_layers))  # fmt: skip

    def progress(figures: dict[str, Any]) -> None:  # the compile time, kept if killed later
        r.update(figures)
        part.save()

    peak = part.options.get("measured_peak_flops")
    r.update(bench.benchmark_training(config, steps, warmup, rounds=1, progress=progress,
                                      measured_peak_flops=peak))  # fmt: skip
    datasheet = r["peak_source"].startswith("datasheet")
    r.update(
        datasheet_peak_flops_per_sec=r["peak_flops_per_sec"] if datasheet else None,
        mfu_datasheet=r["mfu"] if datasheet else None,
        mfu_datasheet_pipelined=r["mfu_pipelined"] if datasheet else None,
    )


def part_bench_cudnn(part: Part) -> None:
    bench_training(part, "cudnn")


def part_bench_xla(part: Part) -> None:
    bench_training(part, "xla")


def part_decode(part: Part) -> None:
    """tools.bench.benchmark_decoding of the 124M GPT-2 in bf16 (random weights, block_size - 1
    new tokens per row) at batch 1 and 64: tokens/s, and the bytes one decoding step must read
    against the HBM bandwidth; reported per batch as `batch_<b>`."""
    from tools import bench

    overrides: dict[str, Any] = dict(GPT2_OVERRIDES)
    batch_sizes, repeats = (1, 64), 3
    if part.dry_run:
        overrides.update(DRY_RUN_GPT)
        batch_sizes, repeats = (2,), 1
    config = _lm_config("gpt2_small", **overrides)
    r = part.report
    r["device_kind"] = _device_kind()

    def progress(figures: dict[str, Any]) -> None:
        for key, value in figures.items():
            if key.startswith("decode_b"):  # decode_b64_tokens_per_sec -> batch_64.tokens_per_sec
                batch, name = key[len("decode_b") :].split("_", 1)
                r.setdefault(f"batch_{batch}", {})[name] = value
            else:
                r[key.removeprefix("decode_")] = value
        part.save()

    bench.benchmark_decoding(config, batch_sizes, repeats, progress=progress)


def _device_kind() -> str:
    import jax

    return jax.devices()[0].device_kind


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
        from tools import export

        print(json.dumps(export.export_reference(FLAGS.prepare_export)), flush=True)
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
