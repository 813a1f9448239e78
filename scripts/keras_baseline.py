"""Keras Fashion-MNIST baselines (MLP 784-128-64-10 and a small CNN) that jaxlab is compared to.

Example: .venv/bin/python scripts/keras_baseline.py --model=both --epochs=10 --batch_size=128
Prints per-model test accuracy and steady-state training throughput (epochs 2..N), then one JSON
line per model: {"model": ..., "test_accuracy": ..., "steady_examples_per_sec": ...}.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402
from absl import flags  # noqa: E402

from data import sources  # noqa: E402
from runtime import cli  # noqa: E402

MODELS = ("mlp", "cnn")


class EpochTimer(keras.callbacks.Callback):
    """Records the wall-clock duration of every training epoch."""

    def __init__(self) -> None:
        """Starts with no recorded epochs."""
        super().__init__()
        self.durations: list[float] = []
        self._start = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        """Notes the epoch's start time."""
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        """Records the epoch's duration."""
        self.durations.append(time.perf_counter() - self._start)


def load_fashion_mnist(data_dir: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Returns (x_train, y_train, x_test, y_test) from TFDS, images float32 in [0, 1]."""
    sources.prepare_fashion_mnist(data_dir)
    arrays = []
    for split in ("train", "test"):
        ds = tfds.load("fashion_mnist", split=split, data_dir=data_dir, batch_size=-1)
        data = tfds.as_numpy(ds)
        arrays += [data["image"].astype(np.float32) / 255.0, data["label"].astype(np.int32)]
    return arrays[0], arrays[1], arrays[2], arrays[3]


def build_model(name: str) -> keras.Model:
    """Returns the uncompiled Keras model 'mlp' (784-128-64-10 ReLU) or 'cnn'."""
    inputs = keras.Input(shape=(28, 28, 1))
    if name == "mlp":
        x = keras.layers.Flatten()(inputs)
        x = keras.layers.Dense(128, activation="relu")(x)
        x = keras.layers.Dense(64, activation="relu")(x)
    elif name == "cnn":
        x = keras.layers.Conv2D(32, (3, 3), activation="relu")(inputs)
        x = keras.layers.MaxPooling2D((2, 2))(x)
        x = keras.layers.Flatten()(x)
        x = keras.layers.Dense(128, activation="relu")(x)
    else:
        raise ValueError(f"Unknown model {name!r}; choose one of {', '.join(MODELS)}.")
    outputs = keras.layers.Dense(10)(x)
    return keras.Model(inputs, outputs, name=name)


def run_baseline(
    name: str,
    data: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    epochs: int,
    batch_size: int,
    seed: int,
) -> dict[str, Any]:
    """Trains one model with Adam (default lr) and returns its accuracy and throughput."""
    x_train, y_train, x_test, y_test = data
    keras.utils.set_random_seed(seed)
    model = build_model(name)
    model.compile(
        optimizer=keras.optimizers.Adam(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    timer = EpochTimer()
    model.fit(
        x_train,
        y_train,
        batch_size=batch_size,
        epochs=epochs,
        shuffle=True,
        callbacks=[timer],
        verbose=2,
    )
    _, test_accuracy = model.evaluate(x_test, y_test, batch_size=1024, verbose=0)
    # Epoch 1 includes tracing/compilation; steady state is epochs 2..N.
    steady = timer.durations[1:]
    steady_rate = len(x_train) * len(steady) / sum(steady) if steady else None
    return {
        "model": name,
        "test_accuracy": round(float(test_accuracy), 4),
        "steady_examples_per_sec": round(steady_rate, 1) if steady_rate else None,
        "first_epoch_sec": round(timer.durations[0], 2),
        "epochs": epochs,
        "batch_size": batch_size,
        "params": int(model.count_params()),
        "backend": keras.backend.backend(),
    }


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The script's flags (defined only when run as a script: importing it defines none)."""
    flags.DEFINE_enum("model", "both", [*MODELS, "both"], "Which baseline to train.")
    flags.DEFINE_integer("epochs", 10, "Training epochs (the first is not timed).")
    flags.DEFINE_integer("batch_size", 128, "Training batch size.")
    flags.DEFINE_integer("seed", 0, "Keras's random seed.")
    flags.DEFINE_string("data_dir", None, "TFDS data dir (default: data.sources')")


def main(argv: list[str]) -> int:
    """Runs the requested baselines and prints their results."""
    del argv
    if FLAGS.epochs < 1 or FLAGS.batch_size < 1:
        raise cli.UserError("--epochs and --batch_size must be positive.")
    if FLAGS.epochs < 2:
        print("Note: with --epochs=1 there is no steady-state epoch to time.", file=sys.stderr)

    try:
        data = load_fashion_mnist(FLAGS.data_dir or sources.default_data_dir())
    except sources.DatasetUnavailableError as e:
        print(e, file=sys.stderr)
        return 1
    names = MODELS if FLAGS.model == "both" else (FLAGS.model,)
    results = [run_baseline(n, data, FLAGS.epochs, FLAGS.batch_size, FLAGS.seed) for n in names]
    for r in results:
        rate = r["steady_examples_per_sec"]
        print(
            f"{r['model']}: test accuracy {r['test_accuracy']:.4f} after {r['epochs']} epochs; "
            f"steady-state {rate if rate is not None else 'n/a'} examples/s "
            f"(batch {r['batch_size']}, first epoch {r['first_epoch_sec']} s, {r['backend']})"
        )
    for r in results:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main)
