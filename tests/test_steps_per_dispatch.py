"""Several training steps per compiled call (config.steps_per_dispatch): same results, faster."""

from __future__ import annotations

import os
import shutil

import jax
import numpy as np
import pytest

import checkpointing
import steps
import train
from runtime import metrics_writer


def _logged(workdir: str) -> dict[int, dict[str, float]]:
    rows = metrics_writer.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    return {r["step"]: r for r in rows if "train/loss" in r}


def _params(workdir: str) -> list[np.ndarray]:
    state, _ = checkpointing.read_state_as_numpy(workdir)
    return jax.tree.leaves(state["params"])


def _run(config, workdir: str, k: int, **overrides) -> dict:
    config = config.copy_and_resolve_references()
    config.steps_per_dispatch = k
    config.update(overrides)
    return train.train_and_evaluate(config, workdir)


def test_effective_steps_per_dispatch_divides_every_interval(tiny_mlp_config) -> None:
    """The requested steps per call is lowered to divide the log, eval and checkpoint
    intervals; pmap always steps one batch per call."""
    config = tiny_mlp_config.copy_and_resolve_references()
    config.update({"steps_per_dispatch": 8, "log_every_steps": 4, "eval_every_steps": 8,
                   "checkpoint_every_steps": 12})  # fmt: skip
    assert steps.effective_steps_per_dispatch(config) == 4  # gcd(8, 4, 8, 12)
    config.parallelism = "pmap"
    assert steps.effective_steps_per_dispatch(config) == 1


@pytest.mark.parametrize(
    "start, k, stop, expected",
    [
        (0, 1, 3, [0, 1, 2]),
        (0, 4, 10, [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]),
        (5, 4, 14, [[5, 6, 7], [8, 9, 10, 11], [12, 13]]),
        (6, 3, 7, [[6]]),
        (5, 4, 5, []),
        (5, 1, 5, []),
    ],
)
def test_step_stacks_start_on_multiples_and_cover_each_step_once(start, k, stop, expected):
    """The iterator's stacks, from a make_stack that returns its steps: aligned to multiples of
    k, a shorter first and last stack, nothing at all for an empty range, unstacked for k=1."""
    from data import images

    stacks = images._step_batches(lambda steps: {"steps": steps}, start, k, stop)
    assert [s["steps"].tolist() for s in stacks] == expected


@pytest.mark.parametrize("task", ["classification", "lm"])
def test_several_steps_per_call_equal_one_step_per_call(
    task, tiny_mlp_config, tiny_lm_config, tmp_path
) -> None:
    """13 steps as calls of 4, 4, 4, 1 steps log the same losses and end with the same
    parameters as 13 single-step calls (float32 rounding apart)."""
    config = tiny_mlp_config if task == "classification" else tiny_lm_config
    common = {"num_train_steps": 13, "log_every_steps": 4, "eval_every_steps": 8,
              "checkpoint_every_steps": 8}  # fmt: skip
    one = _run(config, str(tmp_path / "k1"), 1, **common)
    four = _run(config, str(tmp_path / "k4"), 4, **common)
    a, b = _logged(str(tmp_path / "k1")), _logged(str(tmp_path / "k4"))
    assert sorted(a) == sorted(b) == [4, 8, 12, 13]
    for step in a:
        for key in ("train/loss", "train/grad_norm", "train/learning_rate"):
            np.testing.assert_allclose(b[step][key], a[step][key], rtol=1e-5, err_msg=key)
    for x, y in zip(_params(str(tmp_path / "k1")), _params(str(tmp_path / "k4")), strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-6)
    metric = "test_loss" if task == "classification" else "val_loss"
    np.testing.assert_allclose(four[metric], one[metric], rtol=1e-5)


def test_resume_with_another_steps_per_dispatch(tiny_mlp_config, tmp_path) -> None:
    """A run checkpointed at step 5 by single-step calls resumes with 4 steps per call (calls
    of 3, 4, 4, 1 steps) and ends where an uninterrupted run ends."""
    common = {"num_train_steps": 17, "eval_every_steps": 1000}
    _run(tiny_mlp_config, str(tmp_path / "ref"), 1, log_every_steps=1,
         checkpoint_every_steps=1000, **common)  # fmt: skip
    resumed = str(tmp_path / "resumed")
    _run(tiny_mlp_config, resumed, 1, log_every_steps=1, checkpoint_every_steps=5,
         keep_checkpoints=10, **common)  # fmt: skip
    ckpt = checkpointing.Checkpointer(resumed)
    steps, directory = ckpt.all_steps(), ckpt.directory
    ckpt.close()
    assert 5 in steps
    for step in steps:  # as if preempted right after step 5
        if step > 5:
            shutil.rmtree(os.path.join(directory, str(step)))
    final = _run(tiny_mlp_config, resumed, 4, log_every_steps=4, checkpoint_every_steps=8,
                 **common)  # fmt: skip
    assert final["step"] == 17
    for x, y in zip(_params(str(tmp_path / "ref")), _params(resumed), strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-6)
