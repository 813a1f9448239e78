"""provenance.json: every attempt of a run records its code, libraries, devices and hosts, and
where its wall time went; final_metrics.json, evaluate.py's report and the sweep table name the
commit and the goodput."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest

import evaluate
import train
from runtime import provenance, workdir_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _head() -> str | None:
    """`git rev-parse HEAD` of the repository, or None without git or a checkout."""
    try:
        result = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=30, check=False)  # fmt: skip
    except OSError:
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def _attempts(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, provenance.PROVENANCE_FILE)) as f:
        return json.load(f)["attempts"]


def _final(workdir: str) -> dict:
    with open(os.path.join(workdir, "final_metrics.json")) as f:
        return json.load(f)


def test_a_run_records_what_made_it_and_a_resume_appends(tiny_mlp_config, tmp_path):
    """The first attempt records the commit (HEAD of this checkout), a dirty flag, the versions,
    the devices and the host; final_metrics.json names the commit and the goodput, whose shares
    sum to 1; a resume appends its own entry, with its start-up counted as restarting."""
    workdir = str(tmp_path / "run")
    heads = {_head()}  # another commit may land while the run trains
    train.train_and_evaluate(tiny_mlp_config, workdir)
    heads.add(_head())

    (first,) = _attempts(workdir)
    git = first["git"]
    if None in heads:  # no git here: the record says so
        assert git["commit"] == "unknown"
    else:
        assert git["commit"] in heads
        assert isinstance(git["dirty"], bool) and ("diff_sha256" in git) == git["dirty"]
    assert first["start_step"] == 0 and first["resumed"] is False
    assert first["argv"] == sys.argv
    versions = first["versions"]
    assert versions["jax"] == jax.__version__ and versions["python"].startswith("3.")
    for name in ("jaxlib", "flax", "optax", "orbax-checkpoint"):
        assert versions[name], name
    devices = first["devices"]
    assert devices["platform"] == jax.devices()[0].platform
    assert devices["device_count"] == jax.device_count() and devices["process_count"] == 1
    assert devices["device_kind"] == jax.devices()[0].device_kind
    assert first["hosts"] == [socket.gethostname()]
    timing = first["goodput"]
    assert timing["step"] == 20 and timing["finished"] is True

    final = _final(workdir)
    assert final["git_commit"] == git["commit"] and final["git_dirty"] == git["dirty"]
    goodput = final["goodput"]
    shares = goodput["shares"]
    assert set(shares) == set(provenance.BUCKETS)
    assert 0.999 <= sum(shares.values()) <= 1 + 1e-9
    assert goodput["seconds"]["training"] > 0 and goodput["goodput"] == shares["training"]
    assert goodput["seconds"]["compiling"] > 0 and goodput["seconds"]["startup"] > 0
    assert goodput["seconds"]["restarting"] == 0 and goodput["attempts"] == 1

    # Pretend the run died after its checkpoint at step 10, then resume it.
    shutil.rmtree(os.path.join(workdir, "checkpoints", "20"))
    os.remove(os.path.join(workdir, "final_metrics.json"))
    train.train_and_evaluate(tiny_mlp_config, workdir)
    first_again, second = _attempts(workdir)
    assert first_again == first  # the earlier attempt is kept as it was
    assert second["start_step"] == 10 and second["resumed"] is True
    assert second["goodput"]["seconds"]["restarting"] > 0
    assert second["goodput"]["seconds"]["startup"] == 0
    goodput = _final(workdir)["goodput"]
    assert goodput["attempts"] == 2 and goodput["untimed_attempts"] == 0
    for bucket in provenance.BUCKETS:  # summed over the attempts
        expected = first["goodput"]["seconds"][bucket] + second["goodput"]["seconds"][bucket]
        assert goodput["seconds"][bucket] == pytest.approx(expected)
    assert sum(goodput["shares"].values()) <= 1 + 1e-9


def test_evaluate_names_the_commit(trained_mlp_run, tmp_path):
    """evaluate.py's JSON report names the code that evaluated and the commit the run was
    trained at."""
    heads = {_head()}
    output = str(tmp_path / "report.json")
    evaluate.evaluate_checkpoint(trained_mlp_run, "test", output=output)
    heads.add(_head())
    with open(output) as f:
        report = json.load(f)
    assert report["trained_git_commit"] == _attempts(trained_mlp_run)[-1]["git"]["commit"]
    if None in heads:
        assert report["git_commit"] == "unknown"
    else:
        assert report["git_commit"] in heads and isinstance(report["git_dirty"], bool)
    assert "code at commit" in evaluate.format_report(report)


def test_outside_a_git_checkout_the_record_says_unknown(tiny_mlp_config, tmp_path, monkeypatch):
    """No git repository around the code (or no git at all): the commit is 'unknown', the dirty
    flag None, and training runs as ever."""
    outside = tmp_path / "not_a_checkout"
    outside.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # git looks no higher up
    assert provenance.git_state(str(outside)) == {
        "commit": "unknown",
        "dirty": None,
        "untracked_files": None,
    }
    monkeypatch.setattr(provenance, "GIT", str(tmp_path / "no_such_git"))
    assert provenance.git_state()["commit"] == "unknown"

    monkeypatch.setattr(provenance, "REPO_ROOT", str(outside))
    tiny_mlp_config.num_train_steps = 10
    workdir = str(tmp_path / "run")
    final = train.train_and_evaluate(tiny_mlp_config, workdir)
    assert final["step"] == 10
    (attempt,) = _attempts(workdir)
    assert attempt["git"]["commit"] == "unknown" and attempt["git"]["dirty"] is None
    on_disk = _final(workdir)
    assert on_disk["git_commit"] == "unknown" and on_disk["git_dirty"] is None
    assert on_disk["goodput"]["seconds"]["training"] > 0


def test_goodput_puts_each_second_in_one_bucket():
    """Phases, the timed iterator and the background bucket tile the wall time; compilation is
    taken out of the phase it happened in; a resume's start-up is restarting."""
    goodput = provenance.Goodput()
    time.sleep(0.02)  # start-up
    goodput.enter("training")
    batches = list(goodput.timed(_slow_batches(3)))
    assert batches == [0, 1, 2]

    @goodput.phase("evaluating")
    def evaluate_once(x: float) -> jax.Array:
        # A function of its own: compiled here, in this phase.
        return jax.jit(lambda y: jnp.sin(y) * 3.0 + x)(jnp.arange(7.0)).block_until_ready()

    evaluate_once(0.5)
    with goodput.phase("checkpointing"):
        time.sleep(0.01)
    seconds = goodput.seconds()
    wall = time.perf_counter() - goodput.start
    assert sum(seconds.values()) == pytest.approx(wall, abs=1e-3)
    assert seconds["startup"] >= 0.02 and seconds["restarting"] == 0
    assert seconds["data_wait"] >= 0.03
    assert seconds["checkpointing"] >= 0.01
    assert seconds["compiling"] > 0 and seconds["evaluating"] >= 0

    goodput.resumed = True
    resumed = goodput.seconds()
    assert resumed["startup"] == 0 and resumed["restarting"] >= 0.02
    report = goodput.report(step=5)
    training, wall = report["seconds"]["training"], report["wall_seconds"]
    assert report["goodput"] == pytest.approx(training / wall)

    summary = provenance.summarize([{"goodput": report}, {"goodput": report}, {"git": {}}])
    assert summary["attempts"] == 3 and summary["untimed_attempts"] == 1
    assert summary["wall_seconds"] == pytest.approx(2 * report["wall_seconds"])
    assert sum(summary["shares"].values()) == pytest.approx(1.0)


def _slow_batches(n: int):
    for i in range(n):
        time.sleep(0.01)
        yield i


def test_a_restart_moves_the_provenance_aside(tmp_path):
    """provenance.json belongs to its run: config.restart (or a fresh start over a dead
    attempt) moves it to previous_runs/ with the other records."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / provenance.PROVENANCE_FILE).write_text('{"attempts": []}')
    moved = workdir_files.move_records_aside(str(workdir))
    assert os.listdir(moved) == [provenance.PROVENANCE_FILE]
    assert provenance.load(str(workdir)) == []
