"""Tests for fine-tuning (config.init_from): copied and re-initialised parameters, freezing,
and mode='state' continuing the source run's optimizer."""

from __future__ import annotations

import os
import re
import shutil

import jax
import numpy as np
import pytest

import checkpointing
import config_validation
import experiment
import finetune
import train
from runtime import workdir_files


def _source_config(workdir: str):
    """The config the source run was trained with, as train.py saved it."""
    return workdir_files.load_config(workdir)


def _params(workdir: str, step: int | None = None) -> dict:
    return jax.device_get(experiment.restore_run(workdir, step).params)


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


def _train_steps(run: experiment.Run, state, start: int, stop: int):
    batches = run.datasets.train_batches(start)
    with run.compiled.context():
        for _ in range(start, stop):
            state, _ = run.compiled.train_step(state, run.compiled.put_train_batch(next(batches)))
    return state


def test_mode_state_continues_the_optimizer(trained_mlp_run):
    """mode='state' restores the step and the Adam moments: training on from the step-10
    checkpoint reproduces the source run's step-20 parameters; mode='params' does not."""
    config = _finetune_config(trained_mlp_run, steps=20, step=10, mode="state")
    run = experiment.build_run(config)
    state = finetune.init_from(run, run.init_state())
    saved, _ = checkpointing.read_state_as_numpy(trained_mlp_run, 10)
    assert int(state.step) == 10
    for ours, theirs in zip(
        jax.tree.leaves(jax.device_get(state.opt_state)),
        jax.tree.leaves(saved["opt_state"]),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))

    continued = jax.device_get(_train_steps(run, state, 10, 20).params)
    expected = _params(trained_mlp_run, 20)
    for a, b in zip(jax.tree.leaves(continued), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    config.init_from.mode = "params"  # fresh optimizer: step 0, zero moments, warmup again
    run = experiment.build_run(config)
    fresh = finetune.init_from(run, run.init_state())
    assert int(fresh.step) == 0
    restarted = jax.device_get(_train_steps(run, fresh, 10, 20).params)
    assert not np.allclose(restarted["dense_0"]["kernel"], expected["dense_0"]["kernel"])


def test_mode_state_refuses_other_shapes(trained_mlp_run):
    """The optimizer state cannot be carried over to parameters of other shapes."""
    config = _finetune_config(trained_mlp_run, steps=20, mode="state")
    config.model.num_classes = 12
    run = experiment.build_run(config)
    with pytest.raises(config_validation.ConfigError, match="mode='params'"):
        finetune.init_from(run, run.init_state())


def _flip_bytes_in_an_array(workdir: str, step: int) -> None:
    """Overwrites bytes in the middle of the checkpoint's largest data file (Orbax itself reads
    them back without complaint; only the checksums notice)."""
    root = os.path.join(workdir, "checkpoints", str(step), "state")
    files = [os.path.join(path, name) for path, _, names in os.walk(root) for name in names]
    with open(max(files, key=os.path.getsize), "r+b") as f:
        f.seek(os.path.getsize(f.name) // 2)
        f.write(b"\xff" * 64)


def test_init_from_refuses_a_damaged_checkpoint_as_resume_does(trained_mlp_run, tmp_path, caplog):
    """A corrupted array in the source: init_from skips that checkpoint with resume's warning
    and starts from the older, intact one; an explicitly requested damaged step, or a source
    whose checkpoints are all damaged, is refused (resume refuses the same way)."""
    source = str(tmp_path / "source")
    shutil.copytree(trained_mlp_run, source)
    _flip_bytes_in_an_array(source, 20)

    config = _finetune_config(source, steps=20, mode="state")
    run = experiment.build_run(config)
    state = finetune.init_from(run, run.init_state())
    assert "Checkpoint 20" in caplog.text and "checksum mismatch" in caplog.text
    assert int(state.step) == 10  # the newest intact checkpoint
    assert os.path.isdir(os.path.join(source, "checkpoints", "20"))  # a reader moves nothing

    config.init_from.step = 20
    with pytest.raises(checkpointing.CheckpointMismatchError, match="step 20 .* damaged"):
        finetune.init_from(experiment.build_run(config), run.init_state())

    _flip_bytes_in_an_array(source, 10)
    config.init_from.step = None
    with pytest.raises(checkpointing.CheckpointMismatchError, match="could be read"):
        finetune.init_from(experiment.build_run(config), run.init_state())
    with pytest.raises(checkpointing.CheckpointMismatchError, match="could be read"):
        train.train_and_evaluate(_source_config(source), source)  # resume: the same refusal
