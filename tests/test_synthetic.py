"""data/synthetic.py: `config.dataset = "synthetic"` gives random batches of the config's shapes,
each a pure function of (seed, step, process), through the same `build_run(config)` as real data;
a field that cannot describe the data fails before anything compiles, in one line."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import config_validation
import experiment
import input_pipeline
from configs import fashion_mnist_cnn, shakespeare_char_cpu
from data import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lm(**fields):
    config = shakespeare_char_cpu.get_config()
    config.model.update(block_size=16, vocab_size=11, num_layers=1, num_heads=2, embed_dim=32)
    config.update(dataset="synthetic", batch_size=6, eval_batch_size=4, eval_steps=3, **fields)
    return config


def _images(**fields):
    config = fashion_mnist_cnn.get_config()
    config.model.num_classes = 7
    config.synthetic.image_shape = (8, 6, 3)
    config.synthetic.num_eval_examples = 10
    config.update(dataset="synthetic", batch_size=6, eval_batch_size=4, **fields)
    return config


def _take(iterator, n: int) -> list[dict[str, np.ndarray]]:
    return [next(iterator) for _ in range(n)]


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_language_model_batches_have_the_configs_shapes():
    """Tokens int32 [batch, block_size] in [0, vocab_size), targets the inputs shifted by one;
    every token of the vocabulary drawn; eval_steps masked batches of 'train' and 'val'."""
    datasets = input_pipeline.get_datasets(_lm())
    batch = next(datasets.train_batches())
    assert set(batch) == {"inputs", "targets"}
    for x in batch.values():
        assert x.shape == (6, 16) and x.dtype == np.int32
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    tokens = np.concatenate([b["inputs"].ravel() for b in _take(datasets.train_batches(), 5)])
    assert set(tokens.tolist()) == set(range(11))
    spec = datasets.input_spec()
    assert spec.example_input.shape == (1, 16) and spec.example_input.dtype == np.int32
    assert (spec.num_classes, spec.num_train_examples, datasets.tokenizer) == (0, 60_000, None)
    assert datasets.eval_splits == ("train", "val")
    val, train = list(datasets.eval_batches("val")), list(datasets.eval_batches("train"))
    assert len(val) == len(train) == 3
    assert all(b["mask"].dtype == np.float32 and b["mask"].tolist() == [1.0] * 4 for b in val)
    assert not _same(val[0], train[0])  # each split its own windows
    assert _same(next(iter(datasets.eval_batches())), val[0])  # 'val' by default, fixed
    with pytest.raises(ValueError, match="not 'test'"):
        next(iter(datasets.eval_batches("test")))


def test_classifier_batches_have_the_configs_shapes():
    """uint8 images of synthetic.image_shape, int32 labels in [0, model.num_classes); the eval
    split holds num_eval_examples once, its last batch padded and masked."""
    datasets = input_pipeline.get_datasets(_images())
    batch = next(datasets.train_batches())
    assert batch["inputs"].shape == (6, 8, 6, 3) and batch["inputs"].dtype == np.uint8
    assert batch["targets"].shape == (6,) and batch["targets"].dtype == np.int32
    many = _take(datasets.train_batches(), 40)
    assert set(np.concatenate([b["targets"] for b in many]).tolist()) == set(range(7))
    pixels = np.concatenate([b["inputs"].ravel() for b in many])
    assert pixels.min() == 0 and pixels.max() == 255 and abs(pixels.mean() - 127.5) < 3
    spec = datasets.input_spec()
    assert spec.example_input.shape == (1, 8, 6, 3) and spec.num_classes == 7
    assert datasets.eval_splits == ("test",)
    test = list(datasets.eval_batches())
    assert [b["mask"].tolist() for b in test] == [[1.0] * 4, [1.0] * 4, [1.0, 1.0, 0.0, 0.0]]
    assert all(b["inputs"].shape == (4, 8, 6, 3) for b in test)
    assert not _same(test[0], next(iter(datasets.eval_batches("train"))))


def test_batches_are_a_pure_function_of_seed_and_step():
    """The same config gives the same batches; another seed others; starting at step s gives
    step s's batch; stacks of k steps start on multiples of k (the first shorter when resumed
    elsewhere, the last cut at stop_step) and hold the single steps' batches."""
    singles = _take(input_pipeline.get_datasets(_lm()).train_batches(), 8)
    again = _take(input_pipeline.get_datasets(_lm()).train_batches(), 8)
    assert all(_same(a, b) for a, b in zip(singles, again, strict=True))
    assert not _same(singles[0], singles[1])
    other_seed = next(input_pipeline.get_datasets(_lm(seed=1)).train_batches())
    assert not _same(other_seed, singles[0])
    datasets = input_pipeline.get_datasets(_lm())
    assert _same(next(datasets.train_batches(start_step=5)), singles[5])
    stacks = list(datasets.train_batches(start_step=1, steps_per_dispatch=3, stop_step=8))
    assert [s["inputs"].shape[0] for s in stacks] == [2, 3, 2]  # steps 1-2, 3-5, 6-7
    flat = [{k: v[i] for k, v in s.items()} for s in stacks for i in range(len(s["inputs"]))]
    assert all(_same(a, b) for a, b in zip(flat, singles[1:8], strict=True))
    images = input_pipeline.get_datasets(_images())
    stack = next(images.train_batches(0, 4))
    assert stack["inputs"].shape == (4, 6, 8, 6, 3) and stack["targets"].shape == (4, 6)
    assert _same({k: v[2] for k, v in stack.items()}, _take(images.train_batches(), 3)[2])


@pytest.mark.parametrize("make", [_lm, _images], ids=["lm", "classification"])
def test_processes_split_the_global_batch(monkeypatch, make):
    """With 2 processes each gets batch_size // 2 examples; together, process 0's then 1's,
    they are exactly the batch one process sees (training and evaluation alike)."""
    whole = next(input_pipeline.get_datasets(make()).train_batches(3))
    whole_eval = list(input_pipeline.get_datasets(make()).eval_batches())
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    parts, eval_parts = [], []
    for index in (0, 1):
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        datasets = input_pipeline.get_datasets(make())
        parts.append(next(datasets.train_batches(3)))
        eval_parts.append(list(datasets.eval_batches()))
    assert parts[0]["inputs"].shape[0] == 3
    for key in whole:
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
    for i, batch in enumerate(whole_eval):
        for key in batch:
            joined = np.concatenate([eval_parts[0][i][key], eval_parts[1][i][key]])
            np.testing.assert_array_equal(joined, batch[key])


def test_build_run_takes_synthetic_data_like_any_other():
    """experiment.build_run(config) with dataset='synthetic': the model's own vocabulary (no
    tokenizer), the data's shapes in the run's input description, and a train step runs."""
    config = _lm(num_train_steps=2, decay_steps=2, steps_per_dispatch=2)
    run = experiment.build_run(config, devices=jax.devices()[:1])
    assert run.tokenizer is None and run.config.model.vocab_size == 11
    assert run.input_spec.example_input.shape == (1, 16) and run.total_steps == 2
    state = run.init_state()  # outside the mesh context: jit's out_shardings place it
    with run.compiled.context():
        k = run.compiled.steps_per_dispatch  # 2 steps per compiled call: a stack [2, 6, 16]
        batch = run.compiled.put_train_batch(next(run.datasets.train_batches(0, k)))
        _, metrics = run.compiled.train_step(state, batch)
    assert np.all(np.isfinite(np.asarray(metrics["loss"])))  # one loss per step of the call


@pytest.mark.parametrize(
    "make, fields, message",
    [
        (_images, {"synthetic.image_shape": (28, 0, 1)}, "config.synthetic.image_shape="),
        (_images, {"synthetic.image_shape": ()}, "config.synthetic.image_shape=()"),
        (_images, {"model.num_classes": 0}, "config.model.num_classes=0"),
        (_lm, {"synthetic.num_train_examples": 0}, "config.synthetic.num_train_examples=0"),
        (_images, {"synthetic.num_eval_examples": -5}, "config.synthetic.num_eval_examples=-5"),
        (_lm, {"model.vocab_size": 2**31}, "config.model.vocab_size=2147483648"),
    ],
    ids=[
        "zero_dimension",
        "no_dimensions",
        "no_classes",
        "no_examples",
        "negative_eval_examples",
        "vocab_beyond_int32",
    ],  # fmt: skip
)
def test_bad_fields_fail_in_one_line_naming_the_field(make, fields, message):
    """A field that cannot describe the data: config_validation.ConfigError (one ERROR line from
    any command) naming the field, from build_run before anything compiles."""
    config = make()
    for key, value in fields.items():
        group, name = key.split(".")
        config[group][name] = value
    with pytest.raises(config_validation.ConfigError) as error:
        experiment.build_run(config, devices=jax.devices()[:1])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_batch_that_does_not_divide_over_the_processes_is_refused(monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 4)
    with pytest.raises(config_validation.ConfigError, match="config.batch_size=6 does not divide"):
        synthetic.synthetic_datasets(_lm())


def test_no_tensorflow_on_the_synthetic_path():
    """Classifier data too: the synthetic source never imports TensorFlow (it runs in GPU
    images without it, as the floor environment checks)."""
    code = (
        "import sys, input_pipeline; from configs import fashion_mnist_cnn\n"
        "c = fashion_mnist_cnn.get_config(); c.dataset = 'synthetic'\n"
        "next(input_pipeline.get_datasets(c).train_batches())\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('tensorflow', 'tensorflow_datasets')))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_a_language_model_trains_and_evaluates_on_synthetic_tokens(tmp_path):
    """train.py and evaluate.py on synthetic tokens (no tokenizer): the run evaluates in bits
    per token, takes no text sample, and restores for evaluation."""
    workdir = str(tmp_path / "run")
    tiny = ["--config.dataset=synthetic", "--config.model.vocab_size=64",
            "--config.model.num_layers=1", "--config.model.embed_dim=32",
            "--config.model.num_heads=2", "--config.model.block_size=16",
            "--config.batch_size=8", "--config.eval_batch_size=8", "--config.eval_steps=1",
            "--config.num_train_steps=4", "--config.log_every_steps=2",
            "--config.eval_every_steps=4", "--config.checkpoint_every_steps=4",
            "--config.steps_per_dispatch=1", "--config.decay_steps=None"]  # fmt: skip
    train = subprocess.run(
        [sys.executable, "train.py", "--config=configs/shakespeare_char_cpu.py",
         f"--workdir={workdir}", *tiny],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    assert "bits_per_token=" in train.stdout
    evaluate = subprocess.run([sys.executable, "evaluate.py", f"--workdir={workdir}"], cwd=REPO,
                              capture_output=True, text=True, timeout=600)  # fmt: skip
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    assert "bits_per_token=" in evaluate.stdout
