"""jaxlab's full training loop vs the Keras baselines on Fashion-MNIST: examples/s and accuracy.

    .venv/bin/python scripts/compare_keras.py --models=mlp,cnn --epochs=10 --batch_size=128 \
        [--repeats=3]

For each model, runs train.train_and_evaluate (real logging, checkpoints, evaluation) with the
jaxlab config (configs/fashion_mnist_{mlp,cnn}.py at the same batch size and number of epochs),
then scripts/keras_baseline.py in a separate process (so the two never share a CPU thread pool),
and prints steady-state examples/s and test accuracy of each and the ratio, then one JSON line.
With --repeats=N the two alternate N times and the ratio's median and range are printed too.
Steady state: jaxlab's logged windows after the first (which holds compilation); Keras's epochs
after the first (which holds tracing).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from absl import flags  # noqa: E402

from runtime import cli, host_allocator  # noqa: E402

host_allocator.keep_freed_memory_mapped()  # before TensorFlow and jax start threads

CONFIGS = {"mlp": "fashion_mnist_mlp", "cnn": "fashion_mnist_cnn"}


def run_jaxlab(name: str, epochs: int, batch_size: int, workdir: str) -> dict[str, Any]:
    """Trains the jaxlab config for `name` with train_and_evaluate; returns rate and accuracy."""
    import importlib

    import train
    from runtime import metrics_writer

    config = importlib.import_module(f"configs.{CONFIGS[name]}").get_config()
    config.num_epochs = float(epochs)
    config.batch_size = batch_size
    steps_per_epoch = -(-60000 // batch_size)
    k = config.steps_per_dispatch  # a multiple of it keeps every call k steps long
    config.log_every_steps = max(k, steps_per_epoch // 4 // k * k)
    final = train.train_and_evaluate(config, workdir)
    rows = metrics_writer.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    rates = [r["train/examples_per_sec"] for r in rows if "train/examples_per_sec" in r]
    steady = rates[1:] or rates  # the first window includes compilation
    return {
        "model": name,
        "test_accuracy": round(float(final["test_accuracy"]), 4),
        "steady_examples_per_sec": round(statistics.median(steady), 1),
        "train_seconds": round(float(final["train_seconds_this_run"]), 2),
    }


def run_keras(name: str, epochs: int, batch_size: int, timeout: int) -> dict[str, Any]:
    """Runs scripts/keras_baseline.py for one model in its own process; returns its JSON line."""
    script = os.path.join(REPO_ROOT, "scripts", "keras_baseline.py")
    cmd = [sys.executable, script, f"--model={name}", f"--epochs={epochs}",
           f"--batch_size={batch_size}"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"keras_baseline.py failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The script's flags (defined only when run as a script: importing it defines none)."""
    flags.DEFINE_list("models", ["mlp", "cnn"], "comma-separated: mlp, cnn")
    flags.DEFINE_integer("epochs", 10, "Training epochs of each side (at least 2).")
    flags.DEFINE_integer("batch_size", 128, "Training batch size of each side.")
    flags.DEFINE_integer("repeats", 1, "alternating jaxlab/Keras pairs")
    flags.DEFINE_integer("keras_timeout", 3600, "seconds per Keras run")
    flags.DEFINE_string("workdir", None, "parent of the jaxlab run dirs (tmp)")


def main(argv: list[str]) -> int:
    """Runs both sides for each requested model and prints the comparison."""
    del argv
    names = [n for n in FLAGS.models if n]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown or FLAGS.epochs < 2 or FLAGS.repeats < 1:
        raise cli.UserError(
            f"unknown models {unknown}" if unknown else "--epochs must be >= 2, --repeats >= 1."
        )

    results = []
    parent = FLAGS.workdir or tempfile.mkdtemp(prefix="compare_keras_")
    for name in names:
        # Alternating pairs: this machine's speed drifts, so each ratio compares neighbours.
        for repeat in range(FLAGS.repeats):
            workdir = os.path.join(parent, f"{name}_{repeat}")
            jaxlab = run_jaxlab(name, FLAGS.epochs, FLAGS.batch_size, workdir)
            keras = run_keras(name, FLAGS.epochs, FLAGS.batch_size, FLAGS.keras_timeout)
            ratio = jaxlab["steady_examples_per_sec"] / keras["steady_examples_per_sec"]
            results.append({
                "model": name,
                "repeat": repeat,
                "epochs": FLAGS.epochs,
                "batch_size": FLAGS.batch_size,
                "jaxlab_examples_per_sec": jaxlab["steady_examples_per_sec"],
                "keras_examples_per_sec": keras["steady_examples_per_sec"],
                "speedup": round(ratio, 2),
                "jaxlab_test_accuracy": jaxlab["test_accuracy"],
                "keras_test_accuracy": keras["test_accuracy"],
            })  # fmt: skip

    header = f"{'model':6s} {'jaxlab ex/s':>12s} {'keras ex/s':>11s} {'speedup':>8s} "
    header += f"{'jaxlab acc':>11s} {'keras acc':>10s}"
    print(header)
    for r in results:
        print(f"{r['model']:6s} {r['jaxlab_examples_per_sec']:12,.0f} "
              f"{r['keras_examples_per_sec']:11,.0f} {r['speedup']:7.2f}x "
              f"{r['jaxlab_test_accuracy']:11.4f} {r['keras_test_accuracy']:10.4f}")  # fmt: skip
    for name in names:
        ratios = [r["speedup"] for r in results if r["model"] == name]
        print(
            f"{name}: speedup median {statistics.median(ratios):.2f}x, "
            f"range {min(ratios):.2f}-{max(ratios):.2f}x over {len(ratios)} pairs"
        )
    print(json.dumps({"results": results}))
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main)
