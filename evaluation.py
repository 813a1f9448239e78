"""Evaluation: the one loop that runs a run's compiled eval (or predict) step over batches, the
metrics a paper reports from its sums, and the final report.

`eval_sums` / `evaluate` serve training's periodic and final evaluation, `evaluate.py` and the
tools alike (as big_vision's evaluators serve its trainer and its eval-only tool): the same
compiled, sharded `eval_step`, the same placement of batches, the same sums, hence the same
numbers for the same state. `predict_log_probs` is the same loop over the predict step, for the
scores that need every example's probabilities (ROC AUC).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import steps
from runtime import cli, distributed

if TYPE_CHECKING:
    import experiment

_LN2 = math.log(2.0)

HostBatch = dict[str, np.ndarray]  # 'inputs', 'targets' and 'mask' [B] float32 (1 real, 0 pad)


# ----------------------------------------------------------------------------- the loop


def _compiled(run: experiment.Run | steps.CompiledSteps) -> steps.CompiledSteps:
    return run if isinstance(run, steps.CompiledSteps) else run.compiled


def _step_over(
    compiled: steps.CompiledSteps, step: Callable, state: Any, batches: Iterable[HostBatch]
) -> Iterator[tuple[dict[str, jax.Array], Any]]:
    """(placed batch, step output) per host batch, each batch placed as the compiled steps take
    it (a global array split over data x fsdp under 'jit', [devices, ...] under 'pmap'). Iterate
    it inside `compiled.context()`."""
    for batch in batches:
        placed = compiled.put_batch(batch)
        yield placed, step(state, placed)


def eval_sums(
    run: experiment.Run | steps.CompiledSteps, state: Any, batches: Iterable[HostBatch]
) -> dict[str, np.ndarray]:
    """The run's compiled, sharded eval step summed over `batches`, fetched to the host once.

    `state` is in the compiled steps' layout (a restored or trained global state under 'jit';
    `compiled.from_global(state)` under 'pmap'); each batch is process-local host numpy as
    `Datasets.eval_batches` yields it, padded examples masked out. Returns float32 numpy
    {'loss_sum', 'correct', 'count'} scalars (count: real tokens or examples) and, for
    classifiers, 'confusion' [C, C] (true, predicted); summed on the device in float32.

    Raises cli.UserError if `batches` is empty.
    """
    compiled = _compiled(run)
    totals = None
    with compiled.context():
        for _, sums in _step_over(compiled, compiled.eval_step, state, batches):
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if totals is None:
        raise cli.UserError("The split produced no evaluation batches.")
    return compiled.sums_to_host(totals)


def evaluate(run: experiment.Run, state: Any, batches: Iterable[HostBatch]) -> dict[str, Any]:
    """`from_sums` of `eval_sums`: loss, accuracy and num_examples, with the confusion matrix and
    per-class scores for classifiers, perplexity and bits per unit (the run's tokenizer's) for
    language models. Python floats, ints and lists. Raises cli.UserError if `batches` is empty.
    """
    return from_sums(eval_sums(run, state, batches), run.input_spec.num_classes, run.tokenizer)


def predict_log_probs(
    run: experiment.Run | steps.CompiledSteps, state: Any, batches: Iterable[HostBatch]
) -> tuple[np.ndarray, np.ndarray]:
    """(log-probabilities [N, C] float64, labels [N] int64) of the real (unmasked) examples of
    classifier `batches`, in order, by the run's compiled, sharded predict step (state and
    batches as for `eval_sums`). Every process gets all N.

    Raises cli.UserError if `batches` is empty.
    """
    compiled = _compiled(run)
    log_probs, labels = [], []
    with compiled.context():
        for placed, out in _step_over(compiled, compiled.predict_step, state, batches):
            # Whole global batches on the host: small ([batch, classes]); every process sees all.
            out, targets, mask = distributed.to_host((out, placed["targets"], placed["mask"]))
            keep = mask > 0
            log_probs.append(np.asarray(out, np.float64)[keep])
            labels.append(targets[keep])
    if not log_probs:
        raise cli.UserError("The split produced no evaluation batches.")
    return np.concatenate(log_probs), np.concatenate(labels).astype(np.int64)


# ----------------------------------------------------------------------------- the metrics


def classification_metrics(confusion: np.ndarray) -> dict[str, Any]:
    """Per-class and macro precision, recall and F1 from a [true, predicted] confusion matrix."""
    confusion = np.asarray(confusion, np.float64)
    tp = np.diag(confusion)
    predicted, actual = confusion.sum(0), confusion.sum(1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {
        "precision_macro": float(precision.mean()),
        "recall_macro": float(recall.mean()),
        "f1_macro": float(f1.mean()),
        "precision_per_class": precision.tolist(),
        "recall_per_class": recall.tolist(),
        "f1_per_class": f1.tolist(),
        "confusion_matrix": confusion.astype(np.int64).tolist(),
    }


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x, ties sharing their mean rank (as scipy.stats.rankdata)."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # Start of each run of equal values, and the mean of the ranks the run spans.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    mean_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def roc_auc_ovr(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """One-vs-rest ROC AUC per class and their macro mean, from scores [N, C] and labels [N].

    AUC is the Mann-Whitney statistic: the probability that a random positive scores above a
    random negative (ties count half). Classes absent from `labels` (or present in all of them)
    have no AUC (NaN) and are left out of the macro mean.
    """
    scores = np.asarray(probabilities, np.float64)
    labels = np.asarray(labels).astype(np.int64)
    per_class = []
    for c in range(scores.shape[1]):
        positive = labels == c
        n_pos = int(positive.sum())
        n_neg = len(labels) - n_pos
        if n_pos == 0 or n_neg == 0:
            per_class.append(float("nan"))
            continue
        rank_sum = _average_ranks(scores[:, c])[positive].sum()
        per_class.append(float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)))
    defined = [a for a in per_class if not math.isnan(a)]
    macro = float(np.mean(defined)) if defined else float("nan")
    return {"roc_auc_macro": macro, "roc_auc_per_class": per_class}


def lm_metrics(loss: float, tokenizer: Any) -> dict[str, float]:
    """Perplexity and bits per unit; the unit is the tokenizer's (character, byte or token),
    or 'token' for data without a tokenizer (the synthetic source)."""
    return {
        "perplexity": float(math.exp(min(loss, 50.0))),
        f"bits_per_{getattr(tokenizer, 'unit', 'token')}": loss / _LN2,
    }


def from_sums(sums: dict[str, Any], num_classes: int, tokenizer: Any = None) -> dict[str, Any]:
    """Metrics of one split from the eval step's summed loss, correct count and confusion
    (`eval_sums`); `num_classes` 0 for a language model, whose `tokenizer` names the unit."""
    count = float(sums["count"])
    out: dict[str, Any] = {
        "loss": float(sums["loss_sum"]) / count,
        "accuracy": float(sums["correct"]) / count,
        "num_examples": int(round(count)),
    }
    if num_classes:
        out.update(classification_metrics(sums["confusion"]))
    else:
        out.update(lm_metrics(out["loss"], tokenizer))
    return out


def final_report(
    config: ml_collections.ConfigDict, results: dict[str, dict], steps: int, num_params: int
) -> dict[str, Any]:
    """The contents of final_metrics.json: '<split>_<metric>' for every split, and run facts."""
    report: dict[str, Any] = {"step": steps, "num_params": num_params, "model": config.model.name}
    for split, metrics in results.items():
        for name, value in metrics.items():
            report[f"{split}_{name}"] = value
    return report


def flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Scalar config fields, flattened with dots, for TensorBoard's HParams tab."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        for key, value in node.items():
            if isinstance(value, ml_collections.ConfigDict | dict):
                walk(f"{prefix}{key}.", value)
            elif isinstance(value, bool | int | float | str):
                flat[f"{prefix}{key}"] = value
            else:
                flat[f"{prefix}{key}"] = str(value)

    walk("", config)
    return flat


def confusion_matrix_image(confusion: np.ndarray, class_names: list[str] | None = None):
    """Renders a confusion matrix as an RGB uint8 image [H, W, 3] (matplotlib, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    confusion = np.asarray(confusion)
    n = confusion.shape[0]
    names = class_names or [str(i) for i in range(n)]
    fig, ax = plt.subplots(figsize=(6, 5), dpi=100)
    ax.imshow(confusion, cmap="Blues")
    for i in range(n):
        for j in range(n):
            color = "white" if confusion[i, j] > confusion.max() / 2 else "black"
            ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=7, color=color)
    ax.set_xticks(range(n), names, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(n), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    buffer.seek(0)
    return (plt.imread(buffer)[..., :3] * 255).astype(np.uint8)


def log_images(writer: Any, step: int, results: dict[str, dict]) -> None:
    """Writes a confusion-matrix image for each classification split."""
    for split, metrics in results.items():
        if "confusion_matrix" in metrics:
            image = confusion_matrix_image(np.array(metrics["confusion_matrix"]))
            writer.write_image(step, f"{split}/confusion_matrix", image)
