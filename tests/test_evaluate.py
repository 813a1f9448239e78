"""Tests for evaluate.py and the ROC AUC in evaluation."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import evaluate
import evaluation
import experiment
from runtime import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _random_scores(n: int, classes: int, seed: int, decimals: int | None = None):
    """Labels and softmax-like scores that favour the true class, optionally rounded (ties)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    scores = rng.random((n, classes))
    scores[np.arange(n), labels] += rng.random(n)
    if decimals is not None:
        scores = np.round(scores, decimals)
    return scores / scores.sum(1, keepdims=True), labels


@pytest.mark.parametrize("decimals", [None, 1])
def test_roc_auc_matches_sklearn(decimals):
    """Macro and per-class one-vs-rest AUC equal scikit-learn's, with and without tied scores."""
    scores, labels = _random_scores(600, 5, seed=0, decimals=decimals)
    ours = evaluation.roc_auc_ovr(scores, labels)
    expected = roc_auc_score(labels, scores, multi_class="ovr", average="macro")
    assert ours["roc_auc_macro"] == pytest.approx(expected, abs=1e-12)
    for c in range(5):
        expected_c = roc_auc_score(labels == c, scores[:, c])
        assert ours["roc_auc_per_class"][c] == pytest.approx(expected_c, abs=1e-12)


def test_roc_auc_edge_cases():
    """Perfect ranking gives 1, reversed 0; a class absent from the labels is NaN and skipped."""
    labels = np.array([0, 0, 1, 1])
    perfect = np.array([[0.9, 0.1, 0], [0.8, 0.2, 0], [0.3, 0.7, 0], [0.1, 0.9, 0]])
    out = evaluation.roc_auc_ovr(perfect, labels)
    assert out["roc_auc_per_class"][:2] == [1.0, 1.0]
    assert math.isnan(out["roc_auc_per_class"][2]) and out["roc_auc_macro"] == 1.0
    reversed_scores = perfect[:, [1, 0, 2]]
    assert evaluation.roc_auc_ovr(reversed_scores, labels)["roc_auc_macro"] == 0.0


def test_classification_report_counts_and_loss():
    """Accuracy, loss and confusion of a hand-made case."""
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.5, 0.25, 0.25], [0.2, 0.2, 0.6]])
    labels = np.array([0, 1, 1, 2])
    report = evaluate.classification_report(np.log(probs), labels)
    assert report["accuracy"] == 0.75 and report["num_examples"] == 4
    assert report["loss"] == pytest.approx(-np.mean(np.log([0.7, 0.8, 0.25, 0.6])))
    assert report["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert report["recall_per_class"] == [1.0, 0.5, 1.0]
    assert 0 <= report["roc_auc_macro"] <= 1


def test_classifier_checkpoint_report_matches_training(trained_mlp_run):
    """The test split evaluated from the final checkpoint gives training's final accuracy and
    loss; the report and the confusion-matrix PNG land in the workdir."""
    report = evaluate.evaluate_checkpoint(trained_mlp_run, "test")
    with open(os.path.join(trained_mlp_run, "final_metrics.json")) as f:
        final = json.load(f)
    assert report["step"] == 20 and report["num_examples"] == 10_000
    assert report["accuracy"] == pytest.approx(final["test_accuracy"], abs=1e-6)
    assert report["loss"] == pytest.approx(final["test_loss"], rel=1e-4)
    assert report["confusion_matrix"] == final["test_confusion_matrix"]
    assert len(report["f1_per_class"]) == 10 and 0.5 < report["roc_auc_macro"] <= 1
    path = os.path.join(trained_mlp_run, "eval_test_step20.json")
    with open(path) as f:
        assert json.load(f)["accuracy"] == report["accuracy"]
    with open(os.path.join(trained_mlp_run, "eval_test_step20_confusion.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_classifier_train_split_and_older_step(trained_mlp_run, tmp_path):
    """--split=train evaluates all 60,000 training images once; --step picks a checkpoint."""
    output = str(tmp_path / "report.json")
    report = evaluate.evaluate_checkpoint(trained_mlp_run, "train", step=10, output=output)
    assert report["step"] == 10 and report["split"] == "train"
    assert report["num_examples"] == 60_000
    assert np.sum(report["confusion_matrix"]) == 60_000
    assert os.path.exists(output) and os.path.exists(str(tmp_path / "report_confusion.png"))
    with pytest.raises(cli.UserError, match="not available"):
        evaluate.evaluate_checkpoint(trained_mlp_run, "val")
    with pytest.raises(FileNotFoundError, match="No checkpoint at step 7"):
        evaluate.evaluate_checkpoint(trained_mlp_run, "test", step=7)


def test_lm_checkpoint_report(trained_lm_run):
    """An LM's val loss equals training's final one; perplexity and bits per char follow."""
    report = evaluate.evaluate_checkpoint(trained_lm_run)
    with open(os.path.join(trained_lm_run, "final_metrics.json")) as f:
        final = json.load(f)
    assert report["split"] == "val" and report["step"] == 12
    assert report["loss"] == pytest.approx(final["val_loss"], rel=1e-5)
    assert report["perplexity"] == pytest.approx(math.exp(report["loss"]))
    assert report["bits_per_char"] == pytest.approx(report["loss"] / math.log(2))
    assert os.path.exists(os.path.join(trained_lm_run, "eval_val_step12.json"))


@pytest.mark.parametrize("run", ["trained_mlp_run", "trained_lm_run"])
def test_training_and_a_checkpoint_share_one_evaluation(run, request):
    """evaluation.evaluate on the final checkpoint reproduces every split of final_metrics.json
    (training's own final evaluation, the same function over the same compiled eval step)."""
    workdir = request.getfixturevalue(run)
    with open(os.path.join(workdir, "final_metrics.json")) as f:
        final = json.load(f)
    restored = experiment.restore_run(workdir, load_data=True)
    datasets = restored.run.datasets
    assert datasets.eval_splits  # classifiers: ('test',); language models: ('train', 'val')
    for split in datasets.eval_splits:
        metrics = evaluation.evaluate(restored.run, restored.state, datasets.eval_batches(split))
        for name, value in metrics.items():
            np.testing.assert_allclose(value, final[f"{split}_{name}"], rtol=1e-6, err_msg=name)
    # The sums themselves, from the compiled steps alone: host float32 scalars (and [C, C]).
    batches = datasets.eval_batches(datasets.eval_splits[0])
    sums = evaluation.eval_sums(restored.run.compiled, restored.state, batches)
    assert {"loss_sum", "correct", "count"} <= set(sums)
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in sums.values())


def test_no_batches_is_a_user_error(trained_mlp_run):
    """An evaluation over no batch at all (an empty split) stops with a UserError, by either
    step."""
    restored = experiment.restore_run(trained_mlp_run)
    with pytest.raises(cli.UserError, match="no evaluation batches"):
        evaluation.evaluate(restored.run, restored.state, [])
    with pytest.raises(cli.UserError, match="no evaluation batches"):
        evaluation.predict_log_probs(restored.run, restored.state, iter(()))


def test_cli(trained_mlp_run, tmp_path):
    """The absl entry point prints the per-class table and writes --output."""
    output = tmp_path / "cli.json"
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "evaluate.py"),
            f"--workdir={trained_mlp_run}",
            "--split=test",
            "--step=20",
            f"--output={output}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "roc_auc_macro=" in result.stdout and "precision  recall" in result.stdout
    with open(output) as f:
        assert json.load(f)["num_examples"] == 10_000
