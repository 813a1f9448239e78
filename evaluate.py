"""Evaluates a run's checkpoint on one split and writes a report into its workdir.

    python evaluate.py --workdir=runs/cnn                       # latest checkpoint, test split
    python evaluate.py --workdir=runs/cnn --split=train --step=2000 --output=report.json
    python evaluate.py --workdir=runs/shakespeare_char --split=val --eval_steps=200

Classifiers: loss, accuracy, per-class and macro precision / recall / F1, one-vs-rest ROC AUC
(per class and macro, from the softmax probabilities) and the confusion matrix, also drawn as
`eval_<split>_step<N>_confusion.png`; every example of the split is evaluated exactly once.
Language models: loss, perplexity and bits per character / byte / token over `eval_steps`
batches of fixed, seeded windows (the ones training evaluates on).
The report is `<workdir>/eval_<split>_step<N>.json` unless --output names another file; it
names the code that evaluated (`git_commit`, `git_dirty`: runtime/provenance.py) and the commit
the run was trained at (`trained_git_commit`, from the workdir's provenance.json).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags

import config_validation
import evaluation
import experiment
from runtime import cli, provenance


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
    report.update(evaluation.classification_metrics(confusion))
    report.update(evaluation.roc_auc_ovr(np.exp(log_probs), labels))
    return report


def _splits(config: ml_collections.ConfigDict, datasets: Any) -> list[str]:
    if config.task == "classification":
        return ["train", "test"]
    return list(datasets.eval_splits)


def evaluate_restored(
    restored: experiment.Restored, split: str | None = None, **overrides: Any
) -> dict[str, Any]:
    """Metrics of a restored run on `split` (default: 'test' for classifiers, 'val' for language
    models) of its own data, or of the data that config `overrides` name (e.g.
    dataset='tiny_shakespeare', eval_batch_size=500, eval_steps=200). The model stays sharded
    as restored; the compiled steps of the run evaluate it, through evaluation's one loop:
    classifiers by the predict step (`classification_report`, with ROC AUC), language models by
    `evaluation.evaluate`, exactly as training evaluates.

    Raises cli.UserError for a split the data lacks, a vocabulary that differs from the model's
    or a split that gives no batch, config_validation.ConfigError for overrides that do not fit
    the devices."""
    import input_pipeline  # loading data needs tf.data; restoring does not

    run = restored.run
    config = ml_collections.ConfigDict(run.config.to_dict())
    config.update(overrides)
    config_validation.validate(config, num_devices=run.mesh.size, training=False)
    datasets = input_pipeline.get_datasets(config)
    split = split or ("test" if config.task == "classification" else "val")
    available = _splits(config, datasets)
    if split not in available:
        raise cli.UserError(f"split {split!r} is not available for {config.dataset}: {available}.")
    if datasets.tokenizer is not None and datasets.tokenizer != restored.tokenizer:
        raise cli.UserError(
            f"{config.dataset} with config.tokenizer={config.tokenizer!r} gives a "
            f"{datasets.tokenizer.describe()}; the model was trained with a "
            f"{restored.tokenizer.describe()}: its scores would be of other text."
        )
    batches = datasets.eval_batches(split)
    if config.task == "classification":
        return classification_report(*evaluation.predict_log_probs(run, restored.state, batches))
    # Training's own evaluation (the tokenizer is the run's, checked above).
    return evaluation.evaluate(run, restored.state, batches)


def evaluate_checkpoint(
    workdir: str,
    split: str | None = None,
    step: int | None = None,
    output: str | None = None,
    eval_batch_size: int | None = None,
    eval_steps: int | None = None,
) -> dict[str, Any]:
    """Evaluates `workdir`'s checkpoint (latest, or `step`) on `split`; writes and returns the
    report (plus, for classifiers, a confusion-matrix PNG next to it). The report names the
    commit of the code that evaluated (git_commit, git_dirty; 'unknown' and None outside a git
    checkout) and the one the run was trained at (trained_git_commit: the newest attempt in the
    workdir's provenance.json, 'unknown' for a run trained before runs recorded it)."""
    restored = experiment.restore_run(workdir, step)
    config = restored.config
    overrides = {}
    if eval_batch_size:
        overrides["eval_batch_size"] = int(eval_batch_size)
    if eval_steps:
        overrides["eval_steps"] = int(eval_steps)
    split = split or ("test" if config.task == "classification" else "val")
    metrics = evaluate_restored(restored, split, **overrides)
    report = {
        "workdir": os.path.abspath(workdir),
        "step": restored.step,
        "split": split,
        "task": config.task,
        "dataset": config.dataset,
        "model": config.model.name,
        **metrics,
    }
    if jax.process_index() == 0:
        git = provenance.git_state()
        report["git_commit"], report["git_dirty"] = git["commit"], git["dirty"]
        report["trained_git_commit"] = provenance.trained_commit(workdir)
        path = output or os.path.join(workdir, f"eval_{split}_step{restored.step}.json")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
        report["report_path"] = path
        if "confusion_matrix" in metrics:
            confusion = np.array(metrics["confusion_matrix"])
            image = evaluation.confusion_matrix_image(confusion)
            png = os.path.splitext(path)[0] + "_confusion.png"
            import matplotlib.pyplot as plt  # after confusion_matrix_image chose the Agg backend

            plt.imsave(png, image)
            report["confusion_png"] = png
    return report


def format_report(report: dict[str, Any]) -> str:
    """A few readable lines: the headline metrics, then per-class scores for classifiers."""
    head = f"{report['workdir']} step {report['step']}, split {report['split']}"
    if "git_commit" in report:
        dirty = " (uncommitted changes)" if report.get("git_dirty") else ""
        head += f", code at commit {report['git_commit'][:12]}{dirty}"
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
    """The command's flags (defined only when run as a script: importing evaluate defines none)."""
    flags.DEFINE_string("workdir", None, "Training run directory (checkpoints, config.json).")
    flags.DEFINE_string("split", None, "'test' or 'train' (classifiers), 'val' or 'train' (LMs).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest readable one).")
    flags.DEFINE_string(
        "output", None, "Report path (default <workdir>/eval_<split>_step<N>.json)."
    )
    flags.DEFINE_integer("eval_batch_size", None, "Override the run's eval batch size.")
    flags.DEFINE_integer("eval_steps", None, "LMs: number of eval batches (default: the run's).")
    flags.DEFINE_integer("cpu_devices", None, "Simulated CPU devices (testing sharded runs).")
    flags.mark_flag_as_required("workdir")


def main(argv: Sequence[str]) -> None:
    """absl entry point: evaluates, prints the report and where it was written."""
    del argv
    if FLAGS.cpu_devices:
        jax.config.update("jax_num_cpu_devices", FLAGS.cpu_devices)
    report = evaluate_checkpoint(
        FLAGS.workdir,
        FLAGS.split,
        FLAGS.step,
        FLAGS.output,
        FLAGS.eval_batch_size,
        FLAGS.eval_steps,
    )
    if jax.process_index() == 0:
        print(format_report(report))
        written = [report["report_path"], report.get("confusion_png")]
        print("Wrote " + " and ".join(p for p in written if p))


if __name__ == "__main__":
    define_flags()
    cli.run(main)
