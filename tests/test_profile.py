"""config.profile_steps: a jax.profiler trace of chosen training steps in the run's TensorBoard
directory, with training unchanged."""

from __future__ import annotations

import glob
import gzip
import json
import os

import pytest

import train
from runtime import metrics_writer

# Per-step figures that depend on the clock, not on the training.
TIMINGS = ("steps_per_sec", "examples_per_sec", "tokens_per_sec")


def _history(workdir: str) -> list[dict]:
    rows = metrics_writer.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    return [{k: v for k, v in row.items() if k.split("/")[-1] not in TIMINGS} for row in rows]


def test_profile_written_and_training_unchanged(tiny_lm_config, tmp_path, capsys) -> None:
    """Steps 3-4 with 2 steps per compiled call: the calls of steps 2-3 and 4-5 are traced
    into tensorboard/plugins/profile/<run>/ (XPlane for TensorBoard/XProf, a Perfetto trace
    naming the train step), and every logged metric equals the unprofiled run's."""
    tiny_lm_config.update({"steps_per_dispatch": 2, "num_train_steps": 8, "decay_steps": 8,
                           "eval_every_steps": 8, "checkpoint_every_steps": 8,
                           "sample_every_eval": False})  # fmt: skip
    plain = train.train_and_evaluate(tiny_lm_config, str(tmp_path / "plain"))
    tiny_lm_config.profile_steps = (3, 2)
    profiled = train.train_and_evaluate(tiny_lm_config, str(tmp_path / "profiled"))
    assert "Profiled steps 2-5 into" in capsys.readouterr().out

    runs = glob.glob(str(tmp_path / "profiled" / "tensorboard" / "plugins" / "profile" / "*"))
    assert len(runs) == 1
    xplanes = glob.glob(os.path.join(runs[0], "*.xplane.pb"))
    assert len(xplanes) == 1 and os.path.getsize(xplanes[0]) > 0
    (perfetto,) = glob.glob(os.path.join(runs[0], "*.trace.json.gz"))
    with gzip.open(perfetto) as f:
        events = json.load(f)["traceEvents"]
    assert any("train" in str(e.get("name", "")) for e in events)
    assert not glob.glob(str(tmp_path / "plain" / "tensorboard" / "plugins"))

    assert _history(str(tmp_path / "profiled")) == _history(str(tmp_path / "plain"))
    for key in ("train_loss", "val_loss"):
        assert profiled[key] == plain[key]


def test_profile_never_includes_the_compiling_call(tiny_lm_config, tmp_path, capsys) -> None:
    """A window inside the first compiled call (steps 0-1, which compiles the step) is not
    traced: it says so instead of profiling the compiler."""
    tiny_lm_config.update({"steps_per_dispatch": 2, "num_train_steps": 4, "decay_steps": 4,
                           "eval_every_steps": 4, "checkpoint_every_steps": 4,
                           "sample_every_eval": False, "profile_steps": (1, 1)})  # fmt: skip
    train.train_and_evaluate(tiny_lm_config, str(tmp_path / "run"))
    assert "nothing traced" in capsys.readouterr().out
    assert not glob.glob(str(tmp_path / "run" / "tensorboard" / "plugins"))


def test_a_window_past_the_end_of_the_run_says_nothing_was_traced(
    tiny_lm_config, tmp_path, capsys
) -> None:
    """profile_steps beyond the last step (a shortened run) is reported, not silently dropped."""
    tiny_lm_config.update({"num_train_steps": 4, "decay_steps": 4, "eval_every_steps": 4,
                           "checkpoint_every_steps": 4, "sample_every_eval": False,
                           "profile_steps": (100, 5)})  # fmt: skip
    train.train_and_evaluate(tiny_lm_config, str(tmp_path / "run"))
    out = capsys.readouterr().out
    assert "config.profile_steps=(100, 5): the run ended at step 4" in out, out[-2000:]
    assert not glob.glob(str(tmp_path / "run" / "tensorboard" / "plugins"))


@pytest.mark.parametrize("value", [(0, 3), (5,), (2, 0), ("a", 1)])
def test_bad_profile_steps_fail_in_one_line(tiny_lm_config, value) -> None:
    import config_validation

    tiny_lm_config.profile_steps = value
    with pytest.raises(config_validation.ConfigError, match=r"config\.profile_steps=.*first_step"):
        config_validation.validate(tiny_lm_config)
