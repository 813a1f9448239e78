"""Evaluates a run's checkpoint on one split and writes a report into its workdir.

    python evaluate.py --workdir=runs/cnn                       # latest checkpoint, test split
    python evaluate.py --workdir=runs/cnn --split=train --step=2000 --output=report.json
    python evaluate.py --workdir=runs/shakespeare_char --split=val --eval_steps=200

Classifiers: loss, accuracy, per-class and macro precision / recall / F1, one-vs-rest ROC AUC
(per class and macro, from the softmax probabilities) and the confusion matrix, also drawn as
`eval_<split>_step<N>_confusion.png`; every example of the split is evaluated exactly once.
Language models: loss, perplexity and bits per character / byte / token over `eval_steps`
batches of fixed, seeded windows (the ones training evaluates on).
The report is `<workdir>/eval_<split>_step<N>.json` unless --output names another file.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging

import checkpointing
import evaluation_metrics
import input_pipeline
import models
import steps
import train_state


def classifier_log_probs(
    model: Any, variables: dict[str, Any], batches: Iterable[dict[str, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
    """(log-probabilities [N, C], labels [N]) over the real (unmasked) examples of `batches`."""
    forward = jax.jit(lambda v, x: jax.nn.log_softmax(model.apply(v, x, train=False), -1))
    log_probs, labels = [], []
    for batch in batches:
        keep = np.asarray(batch["mask"]) > 0
        out = np.asarray(forward(variables, jnp.asarray(batch["inputs"])), np.float64)
        log_probs.append(out[keep])
        labels.append(np.asarray(batch["targets"])[keep])
    return np.concatenate(log_probs), np.concatenate(labels).astype(np.int64)


def classification_report(log_probs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Every classifier metric from log-probabilities [N, C] and labels [N]."""
    n, num_classes = log_probs.shape
    predicted = log_probs.argmax(-1)
    confusion = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    report: dict[str, Any] = {
        # The same loss as training's evaluation: cross-entropy without label smoothing.
        "loss": float(-log_probs[np.arange(n), labels].mean()),
        "accuracy": float((predicted == labels).mean()),
        "num_examples": int(n),
    }
    report.update(evaluation_metrics.classification_metrics(confusion))
    report.update(evaluation_metrics.roc_auc_ovr(np.exp(log_probs), labels))
    return report


def lm_report(
    model: Any, variables: dict[str, Any], batches: Iterable[dict[str, np.ndarray]], tokenizer: Any
) -> dict[str, Any]:
    """Loss, accuracy, perplexity and bits per unit, with training's own eval step."""
    eval_step = jax.jit(functools.partial(steps.eval_step, model=model, num_classes=0))

    # eval_step reads only .params and .model_state; no optimizer state needed.
    state = train_state.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        opt_state=(),
        model_state={k: v for k, v in variables.items() if k != "params"},
    )
    totals = None
    for batch in batches:
        sums = eval_step(state, jax.tree.map(jnp.asarray, batch))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if totals is None:
        raise ValueError("The split produced no evaluation batches.")
    return evaluation_metrics.from_sums(jax.device_get(totals), 0, tokenizer)


def _splits(config: ml_collections.ConfigDict, datasets: input_pipeline.Datasets) -> list[str]:
    if config.task == "classification":
        return ["train", "test"]
    return list(datasets.eval_splits)


def evaluate_variables(
    config: ml_collections.ConfigDict, variables: dict[str, Any], split: str | None = None
) -> dict[str, Any]:
    """Metrics of `variables` ({'params': ..., 'batch_stats': ...}) on `split` of the data that
    `config` names (default: 'test' for classifiers, 'val' for language models)."""
    datasets = input_pipeline.get_datasets(config)
    split = split or ("test" if config.task == "classification" else "val")
    available = _splits(config, datasets)
    if split not in available:
        raise ValueError(f"split {split!r} is not available for {config.dataset}: {available}.")
    if datasets.tokenizer is not None and datasets.tokenizer.vocab_size != config.model.vocab_size:
        raise ValueError(
            f"{config.dataset} with config.tokenizer={config.tokenizer!r} has a vocabulary of "
            f"{datasets.tokenizer.vocab_size}, the model {config.model.vocab_size}."
        )
    if jax.device_count() > 1:  # evaluation runs on one device: gather the (small) variables
        variables = jax.device_put(jax.device_get(variables), jax.devices()[0])
    model = models.build_model(config)
    batches = datasets.eval_batches(split)
    if config.task == "classification":
        return classification_report(*classifier_log_probs(model, variables, batches))
    return lm_report(model, variables, batches, datasets.tokenizer)


def evaluate_checkpoint(
    workdir: str,
    split: str | None = None,
    step: int | None = None,
    output: str | None = None,
    eval_batch_size: int | None = None,
    eval_steps: int | None = None,
) -> dict[str, Any]:
    """Evaluates `workdir`'s checkpoint (latest, or `step`) on `split`; writes and returns the
    report (plus, for classifiers, a confusion-matrix PNG next to it)."""
    config, state, ckpt_step = checkpointing.load_state_for_inference(workdir, step)
    if eval_batch_size:
        config.eval_batch_size = int(eval_batch_size)
    if eval_steps:
        config.eval_steps = int(eval_steps)
    split = split or ("test" if config.task == "classification" else "val")
    variables = {"params": state.params, **state.model_state}
    metrics = evaluate_variables(config, variables, split)
    report = {
        "workdir": os.path.abspath(workdir),
        "step": ckpt_step,
        "split": split,
        "task": config.task,
        "dataset": config.dataset,
        "model": config.model.name,
        **metrics,
    }
    path = output or os.path.join(workdir, f"eval_{split}_step{ckpt_step}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    report["report_path"] = path
    if "confusion_matrix" in metrics:
        image = evaluation_metrics.confusion_matrix_image(np.array(metrics["confusion_matrix"]))
        png = os.path.splitext(path)[0] + "_confusion.png"
        import matplotlib.pyplot as plt  # after confusion_matrix_image chose the Agg backend

        plt.imsave(png, image)
        report["confusion_png"] = png
    return report


def format_report(report: dict[str, Any]) -> str:
    """A few readable lines: the headline metrics, then per-class scores for classifiers."""
    head = f"{report['workdir']} step {report['step']}, split {report['split']}"
    scalars = {k: v for k, v in report.items() if isinstance(v, float)}
    lines = [head, "  " + ", ".join(f"{k}={v:.4f}" for k, v in scalars.items())]
    if "f1_per_class" in report:
        lines.append("  class  precision  recall     f1  roc_auc")
        for c, (p, r, f, a) in enumerate(
            zip(
                report["precision_per_class"],
                report["recall_per_class"],
                report["f1_per_class"],
                report["roc_auc_per_class"],
                strict=True,
            )
        ):
            lines.append(f"  {c:5d}  {p:9.4f}  {r:6.4f}  {f:5.4f}  {a:7.4f}")
    return "\n".join(lines)


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the command-line flags (only when run as a script: importing this module must
    not clash with train.py's flags of the same names)."""
    flags.DEFINE_string("workdir", None, "Training run directory (checkpoints, config.json).")
    flags.DEFINE_string("split", None, "'test' or 'train' (classifiers), 'val' or 'train' (LMs).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest readable one).")
    flags.DEFINE_string(
        "output", None, "Report path (default <workdir>/eval_<split>_step<N>.json)."
    )
    flags.DEFINE_integer("eval_batch_size", None, "Override the run's eval batch size.")
    flags.DEFINE_integer("eval_steps", None, "LMs: number of eval batches (default: the run's).")


def main(argv: Sequence[str]) -> None:
    """absl entry point."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not FLAGS.workdir:
        raise app.UsageError("--workdir=<training run directory> is required.")
    if not FLAGS["verbosity"].present:  # Orbax and TFDS log every step at INFO
        logging.set_verbosity(logging.WARNING)
    try:
        report = evaluate_checkpoint(
            FLAGS.workdir,
            FLAGS.split,
            FLAGS.step,
            FLAGS.output,
            FLAGS.eval_batch_size,
            FLAGS.eval_steps,
        )
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"ERROR: {e}") from e
    print(format_report(report))
    written = [report["report_path"], report.get("confusion_png")]
    print("Wrote " + " and ".join(p for p in written if p))


if __name__ == "__main__":
    define_flags()
    app.run(main)
