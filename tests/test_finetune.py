"""Tests for fine-tuning (config.init_from): copied and re-initialised parameters, freezing,
and mode='state' continuing the source run's optimizer."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

import checkpointing
import finetune
import input_pipeline
import models
import optim
import train


def _source_config(workdir: str):
    """The config the source run was trained with, as train.py saved it."""
    return checkpointing.load_config(workdir)


def _params(workdir: str, step: int | None = None) -> dict:
    return jax.device_get(checkpointing.load_for_inference(workdir, step)[1])


def _finetune_config(source: str, steps: int, **init_from):
    config = _source_config(source)
    config.num_train_steps = steps
    config.log_every_steps = steps
    config.steps_per_dispatch = 1  # the test steps one batch at a time
    config.eval_every_steps = 1000
    config.restart = False
    config.init_from.workdir = source
    config.init_from.update(init_from)
    return config


def test_new_head_is_reinitialised_and_reported(trained_mlp_run, tmp_path, capsys):
    """12 classes instead of 10: only the head is re-initialised (and listed); the hidden layer
    starts from the source's weights."""
    config = _finetune_config(trained_mlp_run, steps=1)
    config.model.num_classes = 12
    config.learning_rate = 0.0  # keep the copied weights where they are, to compare them
    config.warmup_steps = 0
    train.train_and_evaluate(config, str(tmp_path))
    out = capsys.readouterr().out
    reported = re.search(r"re-initialised (\d+): \[(.*)\]", out)
    assert reported, out
    assert int(reported.group(1)) == 2
    assert sorted(reported.group(2).replace("'", "").split(", ")) == ["head/bias", "head/kernel"]
    assert "copied 2 parameter arrays" in out

    source, tuned = _params(trained_mlp_run), _params(str(tmp_path))
    np.testing.assert_array_equal(tuned["dense_0"]["kernel"], source["dense_0"]["kernel"])
    np.testing.assert_array_equal(tuned["dense_0"]["bias"], source["dense_0"]["bias"])
    assert tuned["head"]["kernel"].shape == (32, 12) and source["head"]["kernel"].shape == (32, 10)


def test_frozen_parameters_do_not_change(trained_mlp_run, tmp_path):
    """With init_from.freeze=('dense_0',) the hidden layer stays exactly the source's (no update,
    no weight decay) while the head trains."""
    config = _finetune_config(trained_mlp_run, steps=4, freeze=("dense_0",))
    config.learning_rate = 1e-2
    config.weight_decay = 0.1
    train.train_and_evaluate(config, str(tmp_path))
    source, tuned = _params(trained_mlp_run), _params(str(tmp_path))
    np.testing.assert_array_equal(tuned["dense_0"]["kernel"], source["dense_0"]["kernel"])
    np.testing.assert_array_equal(tuned["dense_0"]["bias"], source["dense_0"]["bias"])
    assert not np.allclose(tuned["head"]["kernel"], source["head"]["kernel"])


def _runner(config, num_classes: int = 10, num_train_examples: int = 60_000):
    """train.py's Runner (state layout and compiled steps) for `config`, without loading data."""
    total = train.total_train_steps(config, num_train_examples)
    schedule = optim.learning_rate_schedule(config, total)
    tx = optim.build_optimizer(config, schedule)
    model = models.build_model(config)
    example = input_pipeline.example_input(config)
    return train.Runner(config, model, tx, schedule, example, num_classes)


def _train_steps(runner, state, datasets, start: int, stop: int):
    batches = datasets.train_batches(start)
    with runner.step_context():
        for _ in range(start, stop):
            state, _ = runner.train_step(state, runner.put_train_batch(next(batches)))
    return state


def test_mode_state_continues_the_optimizer(trained_mlp_run):
    """mode='state' restores the step and the Adam moments: training on from the step-10
    checkpoint reproduces the source run's step-20 parameters; mode='params' does not."""
    config = _finetune_config(trained_mlp_run, steps=20, step=10, mode="state")
    runner, datasets = _runner(config), input_pipeline.get_datasets(config)
    state = finetune.init_from(config, runner.init_state(), runner.abstract_state)
    saved, _ = finetune.load_state_as_numpy(trained_mlp_run, 10)
    assert int(state.step) == 10
    for ours, theirs in zip(
        jax.tree.leaves(jax.device_get(state.opt_state)),
        jax.tree.leaves(saved["opt_state"]),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))

    continued = jax.device_get(_train_steps(runner, state, datasets, 10, 20).params)
    expected = _params(trained_mlp_run, 20)
    for a, b in zip(jax.tree.leaves(continued), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    config.init_from.mode = "params"  # fresh optimizer: step 0, zero moments, warmup again
    fresh = finetune.init_from(config, runner.init_state(), runner.abstract_state)
    assert int(fresh.step) == 0
    restarted = jax.device_get(_train_steps(runner, fresh, datasets, 10, 20).params)
    assert not np.allclose(restarted["dense_0"]["kernel"], expected["dense_0"]["kernel"])


def test_mode_state_refuses_other_shapes(trained_mlp_run):
    """The optimizer state cannot be carried over to parameters of other shapes."""
    config = _finetune_config(trained_mlp_run, steps=20, mode="state")
    config.model.num_classes = 12
    runner = _runner(config, num_classes=12)
    with pytest.raises(ValueError, match="mode='params'"):
        finetune.init_from(config, runner.init_state(), runner.abstract_state)
