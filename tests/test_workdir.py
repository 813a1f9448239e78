"""A workdir is one run's faithful record: a live run holds it, a rerun
cannot change what the run is, a restart leaves only the new run's records, a path the storage
cannot round-trip is refused, and options that select by name fail when the name matches
nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import checkpointing
import config_validation
import experiment
import finetune
import train
from runtime import metrics_writer, workdir_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _copy(run: str, tmp_path) -> str:
    workdir = str(tmp_path / "run")
    shutil.copytree(run, workdir)
    return workdir


# ----------------------------------------------------------------------------- the claim


def test_a_live_run_holds_its_workdir(tiny_mlp_config, tmp_path):
    """While a run holds the workdir, another start on it is refused, naming the holder; after
    it ends, the workdir is free again."""
    workdir = str(tmp_path / "run")
    in_use = rf"in use by .*process {os.getpid()}"
    with workdir_files.claim(workdir), pytest.raises(workdir_files.WorkdirError, match=in_use):
        train.train_and_evaluate(tiny_mlp_config, workdir)
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))
    train.train_and_evaluate(tiny_mlp_config, workdir)  # free again
    with open(os.path.join(workdir, workdir_files.CLAIM_FILE)) as f:
        assert f.read() == ""  # a finished run leaves no claim


def _listdir(path: str) -> list[str]:
    return os.listdir(path) if os.path.isdir(path) else []


def _train_command(workdir: str, steps: int, checkpoint_every: int = 10) -> list[str]:
    overrides = {"num_train_steps": steps, "batch_size": 32, "log_every_steps": 10,
                 "eval_every_steps": 10**6, "checkpoint_every_steps": checkpoint_every,
                 "async_checkpointing": False, "model.features": "(32,)"}  # fmt: skip
    flags = [f"--config.{k}={v}" for k, v in overrides.items()]
    return [sys.executable, "train.py", "--config=configs/fashion_mnist_mlp.py",
            f"--workdir={workdir}", *flags]  # fmt: skip


def test_second_process_is_refused_and_a_killed_runs_claim_is_taken_over(
    tmp_path, fashion_mnist_ready
):
    """Two train.py processes on one workdir: the second exits 1 naming the first's pid. The
    first is then killed (SIGKILL: its claim stays in the file, its lock dies with it); the
    command reruns (to 10 steps past its last checkpoint), takes the claim over and resumes."""
    workdir = str(tmp_path / "run")
    log_path = tmp_path / "first.log"
    with open(log_path, "w") as log:
        first = subprocess.Popen(_train_command(workdir, 10**6), cwd=REPO, stdout=log, stderr=log)
    try:
        deadline = time.time() + 300
        while not any(name.isdigit() for name in _listdir(os.path.join(workdir, "checkpoints"))):
            assert first.poll() is None and time.time() < deadline, log_path.read_text()
            time.sleep(0.5)
        second = subprocess.run(_train_command(workdir, 10**6), cwd=REPO, capture_output=True,
                                text=True, timeout=300)  # fmt: skip
        assert second.returncode == 1, second.stderr[-2000:]
        assert f"in use by another run (process {first.pid} on" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    with open(os.path.join(workdir, workdir_files.CLAIM_FILE)) as f:
        assert json.load(f)["pid"] == first.pid  # the dead run's claim is still written there
    latest = max(int(n) for n in _listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
    rerun = subprocess.run(_train_command(workdir, latest + 10), cwd=REPO, capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"Resuming from checkpoint at step {latest}" in rerun.stdout


# ----------------------------------------------------------------------------- consistency


def test_a_shorter_run_length_than_the_step_reached_is_refused(trained_mlp_run, tmp_path):
    """A workdir at step 20 rerun with num_train_steps=10 would label step-20 state as step 10:
    refused, naming both numbers; nothing in the workdir changes."""
    workdir = _copy(trained_mlp_run, tmp_path)
    config = workdir_files.load_config(workdir)
    config.num_train_steps = 10
    before = sorted(os.listdir(workdir))
    with pytest.raises(workdir_files.WorkdirError, match="reached step 20, past .* of 10 steps"):
        train.train_and_evaluate(config, workdir)
    assert sorted(os.listdir(workdir)) == before
    with open(os.path.join(workdir, "final_metrics.json")) as f:
        assert json.load(f)["step"] == 20


def _shifted(text: str) -> str:
    """The same text with every letter replaced by another letter (a bijection on a-z): the
    same number of distinct characters, other characters."""
    table = str.maketrans("abcdefghijklmnopqrstuvwxyz", "bcdefghijklmnopqrstuvwxyza")
    return text.translate(table)


def test_resuming_on_other_characters_is_refused(tiny_lm_config, tmp_path):
    """A character run whose corpus file was replaced by text of as many other characters: the
    resume is refused (its checkpoints would decode to other text), and the workdir's
    tokenizer is left as it was."""
    corpus = tmp_path / "corpus.txt"
    shutil.copy(tiny_lm_config.dataset, corpus)
    config = tiny_lm_config
    config.dataset = str(corpus)
    config.num_train_steps = 6
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "tokenizer.json")) as f:
        saved = f.read()
    corpus.write_text(_shifted(corpus.read_text()))
    config.num_train_steps = 12
    with pytest.raises(workdir_files.WorkdirError, match="decode to other text"):
        train.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "tokenizer.json")) as f:
        assert f.read() == saved


def test_init_from_another_vocabulary_does_not_copy_its_rows(trained_lm_run, tmp_path, capsys):
    """Fine-tuning a character model on a corpus of other characters (same vocabulary size),
    with `init_from.reinit=('wte',)`: the embedding rows start afresh and the reason is printed;
    the rest is copied. (Without reinit it is refused: tests/test_finetune.py.)"""
    source_config = workdir_files.load_config(trained_lm_run)
    corpus = tmp_path / "other.txt"
    with open(source_config.dataset) as f:
        corpus.write_text(_shifted(f.read()))
    config = workdir_files.load_config(trained_lm_run)
    config.dataset = str(corpus)
    config.init_from.workdir = trained_lm_run
    config.init_from.reinit = ("wte",)
    run = experiment.build_run(config)
    state = finetune.init_from(run, run.init_state())
    out = capsys.readouterr().out
    assert "re-initialised 1: ['wte/embedding'] (named by config.init_from.reinit)" in out
    source = experiment.restore_run(trained_lm_run)
    assert not (state.params["wte"]["embedding"] == source.params["wte"]["embedding"]).all()
    assert (state.params["ln_f"]["scale"] == source.params["ln_f"]["scale"]).all()


def test_a_path_the_checkpoint_library_reads_as_a_pattern_is_refused(tiny_mlp_config, tmp_path):
    """'[' and ']' in the workdir: saving works but restoring finds nothing, so it is refused
    before anything is written."""
    workdir = str(tmp_path / "runs[1]" / "run")
    with pytest.raises(checkpointing.CheckpointPathError, match=r"contains \[ \]"):
        train.train_and_evaluate(tiny_mlp_config, workdir)
    assert not os.path.exists(workdir)


def test_a_fresh_start_moves_a_dead_attempts_records_aside(tiny_mlp_config, tmp_path):
    """Records of an attempt that saved no checkpoint (here: metrics and a config) are moved to
    previous_runs/ when the run starts from step 0, so metrics.jsonl is this run's alone."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text('{"step": 999, "train/loss": 1.0}\n')
    (workdir / "config.json").write_text("{}")
    train.train_and_evaluate(tiny_mlp_config, str(workdir))
    (old,) = os.listdir(workdir / workdir_files.PREVIOUS_RUNS)
    assert sorted(os.listdir(workdir / workdir_files.PREVIOUS_RUNS / old)) == [
        "config.json",
        "metrics.jsonl",
    ]
    steps = [row["step"] for row in metrics_writer.read_jsonl(str(workdir / "metrics.jsonl"))]
    assert max(steps) == 20


# ----------------------------------------------------------------------------- names that match


@pytest.mark.parametrize(
    "freeze",
    [("dense_0,head",), ("(dense_0, head)",), ("['dense_0', 'head/']",), ("dense_0", "head")],
)
def test_freeze_accepts_the_forms_typed_on_a_command_line(freeze, tiny_mlp_config):
    """A comma list, a tuple, brackets and quotes: all name the same two prefixes."""
    import optim

    tiny_mlp_config.init_from.freeze = freeze
    assert optim.freeze_prefixes(tiny_mlp_config) == ("dense_0", "head")


def test_freeze_that_matches_nothing_is_refused(trained_mlp_run, tiny_mlp_config, tmp_path):
    """A typo ('dense0') would freeze nothing: refused before compiling, listing what exists;
    'dense_0,head' on the command line freezes both."""
    tiny_mlp_config.model.features = (32,)
    tiny_mlp_config.init_from.workdir = trained_mlp_run
    tiny_mlp_config.init_from.freeze = ("dense0",)
    with pytest.raises(
        config_validation.ConfigError, match=r"\['dense0'\] match no parameter.*'dense_0'"
    ):
        train.train_and_evaluate(tiny_mlp_config, str(tmp_path / "typo"))
    command = _train_command(str(tmp_path / "cli"), 4) + [
        f"--config.init_from.workdir={trained_mlp_run}", "--config.init_from.freeze=dense_0,head"
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    source = experiment.restore_run(trained_mlp_run).params
    tuned = experiment.restore_run(str(tmp_path / "cli")).params
    for name in ("dense_0", "head"):
        assert (source[name]["kernel"] == tuned[name]["kernel"]).all()


@pytest.mark.parametrize(
    "rules, message",
    [
        ((("embedd", None),), "names the logical axis 'embedd', which no model uses. Did you mean"),
        ((("embed", "fsdpp"),), "maps 'embed' to 'fsdpp', not a mesh axis"),
        (("embed",), "must be a pair"),
    ],
)
def test_logical_axis_rules_that_match_nothing_are_refused(rules, message, tiny_mlp_config):
    tiny_mlp_config.logical_axis_rules = rules
    with pytest.raises(config_validation.ConfigError, match=message):
        config_validation.validate(tiny_mlp_config)


def _logged_steps(workdir: str, tag: str) -> list[int]:
    """Every step at which any event file in workdir/tensorboard holds `tag` (raw records: no
    reader-side purging)."""
    from tensorboard.backend.event_processing import event_file_loader
    from tensorboard.compat.proto import event_pb2

    directory = os.path.join(workdir, "tensorboard")
    steps = []
    for name in sorted(os.listdir(directory)):
        for record in event_file_loader.RawEventFileLoader(os.path.join(directory, name)).Load():
            event = event_pb2.Event.FromString(record)
            steps += [event.step for value in event.summary.value if value.tag == tag]
    return sorted(steps)


def test_a_resumed_run_keeps_one_record_per_step(trained_mlp_run, tmp_path):
    """A run that logged steps 15 and 20 but was killed before its step-20 checkpoint resumes
    at 10: metrics.jsonl and the TensorBoard events then hold each step once, the resumed
    run's."""
    workdir = _copy(trained_mlp_run, tmp_path)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "20"))
    os.remove(os.path.join(workdir, "final_metrics.json"))
    assert _logged_steps(workdir, "train/loss") == [5, 10, 15, 20]
    train.train_and_evaluate(workdir_files.load_config(workdir), workdir)
    assert _logged_steps(workdir, "train/loss") == [5, 10, 15, 20]
    rows = metrics_writer.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in rows if "train/loss" in r] == [5, 10, 15, 20]
