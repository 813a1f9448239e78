"""Tests for sweep.py: expanding settings, naming runs, running them, tables and plots."""

from __future__ import annotations

import ast
import csv
import json
import math
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A stand-in for train.py: writes metrics that depend on the setting and seed, or fails.
FAKE_TRAINER = textwrap.dedent(
    """
    import json, os, sys
    setting, seed, workdir = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "calls.txt"), "a") as f:
        f.write("call\\n")
    if setting.get("fail"):
        print("boom: the loss diverged")
        sys.exit(3)
    acc = 0.5 + 10 * setting["learning_rate"] + 0.01 * seed
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        for step in (10, 20, 30):
            f.write(json.dumps({"step": step, "train/loss": 1.0 / step + seed}) + "\\n")
        f.write(json.dumps({"step": 30, "test/accuracy": acc}) + "\\n")
    with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
        json.dump({"test_accuracy": acc, "test_loss": 1 - acc, "step": 30, "model": "mlp"}, f)
    """
)


@pytest.fixture
def fake_command(tmp_path):
    """A command_fn that runs FAKE_TRAINER instead of train.py."""
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAINER)

    def command(spec, run, extra=()):
        return [sys.executable, str(script), json.dumps(run.setting), str(run.seed), run.workdir]

    return command


def _calls(run: sweep.Run) -> int:
    path = os.path.join(run.workdir, "calls.txt")
    return len(open(path).readlines()) if os.path.exists(path) else 0


def test_grid_expands_to_every_combination_times_seeds(tmp_path):
    """A 2 x 3 grid with 2 seeds gives 12 runs, each with its own workdir."""
    spec = sweep.parse_sweep(
        {
            "config": "configs/fashion_mnist_cnn.py",
            "grid": {"model.conv_features": [(32,), (64,)], "learning_rate": [1e-4, 1e-3, 1e-2]},
            "seeds": [0, 1],
        }
    )
    assert len(spec.settings) == 6
    assert {(s["model.conv_features"], s["learning_rate"]) for s in spec.settings} == {
        (w, lr) for w in [(32,), (64,)] for lr in [1e-4, 1e-3, 1e-2]
    }
    assert spec.fields == ["model.conv_features", "learning_rate"]
    runs = sweep.plan_runs(spec, str(tmp_path))
    assert len(runs) == 12 and len({r.workdir for r in runs}) == 12
    assert all(r.workdir.startswith(str(tmp_path)) for r in runs)


def test_explicit_settings_and_invalid_sweeps():
    """A list of override dicts is taken as is; contradictory sweeps are rejected."""
    spec = sweep.parse_sweep(
        {"config": "c.py", "settings": [{"learning_rate": 0.1}, {"optimizer": "sgd"}]}
    )
    assert spec.settings == [{"learning_rate": 0.1}, {"optimizer": "sgd"}]
    assert spec.seeds == [0] and spec.kind == "settings"
    bad = [
        {"config": "c.py", "grid": {"a": [1]}, "settings": [{}]},  # two kinds
        {"config": "c.py", "grid": {"seed": [1, 2]}},  # seeds belong in 'seeds'
        {"config": "c.py", "grid": {"a": [1]}, "fixed": {"a": 2}},  # swept and fixed
        {"config": "c.py", "grid": {"a": []}},  # empty values
        {"config": "c.py", "settings": [{"a": 1}, {"a": 1}]},  # repeated
        {"config": "c.py", "seeds": [0, 0]},
        {"config": "c.py", "gird": {"a": [1]}},  # misspelt key
        {"grid": {"a": [1]}},  # no base config
    ]
    for spec_dict in bad:
        with pytest.raises(ValueError):
            sweep.parse_sweep(spec_dict)


def test_random_search_is_seeded_and_stays_in_range():
    """Same seed, same samples; log-uniform values lie in range and spread over decades."""
    params = {
        "learning_rate": sweep.log_uniform(1e-4, 1e-1),
        "dropout_rate": sweep.uniform(0.0, 0.5),
        "optimizer": sweep.choice(["adamw", "sgd"]),
        "batch_size": 64,
    }
    a = sweep.sample_random(params, 200, seed=3)
    assert a == sweep.sample_random(params, 200, seed=3)
    assert a != sweep.sample_random(params, 200, seed=4)
    lrs = np.array([s["learning_rate"] for s in a])
    assert lrs.min() >= 1e-4 * 0.999 and lrs.max() <= 1e-1 * 1.001
    # Log-uniform: about half the samples fall below the geometric mean (uniform: ~3%).
    assert 0.35 < np.mean(lrs < math.sqrt(1e-4 * 1e-1)) < 0.65
    assert all(float(f"{lr:.3g}") == lr for lr in lrs)  # rounded: readable run names
    assert all(0 <= s["dropout_rate"] <= 0.5 for s in a)
    assert {s["optimizer"] for s in a} == {"adamw", "sgd"}
    assert all(s["batch_size"] == 64 for s in a)
    spec = sweep.parse_sweep(
        {"config": "c.py", "random": {"count": 5, "seed": 1, "params": params}, "seeds": [0, 1]}
    )
    assert spec.kind == "random" and len(spec.settings) == 5


def test_run_names_are_readable_and_safe(tmp_path):
    """Names read 'field=value,...' (fields sorted); odd characters and long names are tamed."""
    run = sweep.Run({"model.conv_features": (64,), "learning_rate": 0.001}, 0, "")
    assert run.name == "learning_rate=0.001,model.conv_features=(64,)/seed=0"
    assert sweep.setting_name({"features": (32, 64), "flip": True}) == "features=(32,64),flip=True"
    assert sweep.setting_name({}) == "base"
    assert sweep.sanitize("dataset=/tmp/my corpus.txt") == "dataset=_tmp_my_corpus.txt"
    long_a, long_b = "x=" + "a" * 300, "x=" + "a" * 299 + "b"
    assert len(sweep.sanitize(long_a)) <= 120
    assert sweep.sanitize(long_a) != sweep.sanitize(long_b)
    spec = sweep.parse_sweep({"config": "c.py", "grid": {"dataset": ["/a/b.txt", "/a/c.txt"]}})
    for r in sweep.plan_runs(spec, str(tmp_path)):
        assert os.path.dirname(os.path.dirname(r.workdir)) == str(tmp_path)


def test_train_command_passes_overrides_that_config_flags_parse(tmp_path):
    """Every setting, fixed field and the seed become --config.<field>=<literal> flags."""
    spec = sweep.parse_sweep(
        {
            "config": "configs/fashion_mnist_cnn.py",
            "settings": [{"model.conv_features": (32, 64), "learning_rate": 3e-4}],
            "fixed": {"num_epochs": 2.0, "augment.random_flip": False},
            "seeds": [7],
        }
    )
    run = sweep.plan_runs(spec, str(tmp_path))[0]
    command = sweep.train_command(spec, run)
    assert command[1] == os.path.join(REPO, "train.py")
    assert command[2] == f"--config={os.path.join(REPO, 'configs', 'fashion_mnist_cnn.py')}"
    flags = dict(arg.split("=", 1) for arg in command[3:])
    assert ast.literal_eval(flags["--config.model.conv_features"]) == (32, 64)
    assert float(flags["--config.learning_rate"]) == 3e-4
    assert flags["--config.num_epochs"] == "2.0"
    assert flags["--config.augment.random_flip"] == "False"
    assert flags["--config.seed"] == "7"
    assert flags["--workdir"] == run.workdir


def test_example_sweep_files_load():
    """The shipped sweep files parse, full and quick, and point at existing configs."""
    cnn = sweep.load_sweep(os.path.join(REPO, "configs/sweeps/cnn_width_lr.py"))
    assert len(cnn.settings) == 9 and len(cnn.seeds) == 3
    quick = sweep.load_sweep(os.path.join(REPO, "configs/sweeps/cnn_width_lr.py:quick"))
    assert len(quick.settings) == 4 and quick.seeds == [0, 1]
    gpt = sweep.load_sweep(os.path.join(REPO, "configs/sweeps/gpt_depth.py:quick"))
    assert gpt.fields == ["model.num_layers"] and gpt.fixed["num_train_steps"] == 300
    for spec in (cnn, quick, gpt):
        assert os.path.isfile(sweep.resolve_config_path(spec.config))


def test_failures_are_contained_and_finished_runs_skipped(tmp_path, fake_command):
    """A failing run is reported with its log kept; the others finish; a restart skips the
    finished ones and retries only the failed one."""
    spec = sweep.parse_sweep(
        {
            "config": "configs/fashion_mnist_mlp.py",
            "settings": [
                {"learning_rate": 0.01},
                {"learning_rate": 0.02},
                {"learning_rate": 0.03, "fail": True},
            ],
            "seeds": [0, 1],
        }
    )
    messages = []
    summary = sweep.run_sweep(
        spec, str(tmp_path / "sw"), parallel=2, command_fn=fake_command, log=messages.append
    )
    status = {o.run.name: o.status for o in summary["outcomes"]}
    assert sorted(status.values()) == ["failed"] * 2 + ["finished"] * 4
    failed = [o.run for o in summary["outcomes"] if o.status == "failed"]
    for run in failed:
        with open(os.path.join(run.workdir, "train.log")) as f:
            assert "boom: the loss diverged" in f.read()
    assert any("did not finish" in m for m in messages)
    with open(summary["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    assert sum(r["status"] == "finished" for r in rows) == 4

    summary = sweep.run_sweep(spec, str(tmp_path / "sw"), command_fn=fake_command, log=print)
    for outcome in summary["outcomes"]:
        expected_calls = 2 if outcome.run in failed else 1
        assert _calls(outcome.run) == expected_calls, outcome.run.name
        assert outcome.status == ("failed" if outcome.run in failed else "skipped")


def test_dry_run_runs_nothing(tmp_path, fake_command):
    """--dry_run lists the runs and their commands but starts none."""
    spec = sweep.parse_sweep({"config": "c.py", "grid": {"learning_rate": [0.1, 0.2]}})
    messages = []
    sweep_dir = tmp_path / "sw"
    sweep.run_sweep(
        spec, str(sweep_dir), dry_run=True, command_fn=fake_command, log=messages.append
    )
    assert sum("[new]" in m for m in messages) == 2
    assert not sweep_dir.exists()


def test_tables_report_mean_and_std_over_seeds_and_plots_are_drawn(tmp_path, fake_command):
    """results.md holds mean ± sample std per setting (best in bold); the PNGs are written."""
    spec = sweep.parse_sweep(
        {
            "config": "c.py",
            "grid": {"learning_rate": [0.001, 0.01, 0.03], "model.width": [8, 16]},
            "seeds": [0, 1],
        }
    )
    summary = sweep.run_sweep(spec, str(tmp_path), command_fn=fake_command, log=lambda m: None)
    assert summary["metric"] == "test_accuracy"
    with open(summary["markdown"]) as f:
        table = f.read()
    # lr 0.03: accuracies 0.8 and 0.81 -> mean 0.805, std 0.00707; it is the best, so bold.
    assert "| **0.03** | **8** | **0.8050 ± 0.0071** |" in table
    assert "| 0.001 | 16 | 0.5150 ± 0.0071 |" in table
    assert table.count("**0.8050 ± 0.0071**") == 2  # both widths tie for best
    with open(summary["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and {"learning_rate", "model.width", "seed", "test_accuracy"} <= set(
        rows[0]
    )
    names = sorted(os.path.basename(p) for p in summary["plots"])
    assert names == [
        "learning_curves.png",
        "test_accuracy_vs_learning_rate.png",
        "test_accuracy_vs_model.width.png",
    ]
    for path in summary["plots"]:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_curves_are_seed_averaged_on_common_steps():
    """Seeds are averaged at the steps they all logged."""
    steps, values = sweep.mean_curve(
        [
            (np.array([10, 20, 30]), np.array([1.0, 2.0, 3.0])),
            (np.array([10, 20]), np.array([3.0, 4.0])),
        ]
    )
    np.testing.assert_array_equal(steps, [10, 20])
    np.testing.assert_allclose(values, [2.0, 3.0])
    assert sweep.use_log_x("learning_rate", [1e-3, 3e-3])
    assert not sweep.use_log_x("model.num_layers", [2, 4])
    assert sweep.use_log_x("batch_size", [8, 1024])
    assert sweep.curve_name("test_accuracy") == "test/accuracy"
    assert sweep.curve_name("val_loss") == "val/loss"
    assert sweep.higher_is_better("test_accuracy") and not sweep.higher_is_better("val_loss")


def test_sweep_cli_with_real_training(tmp_path, fashion_mnist_ready):
    """sweep.py end to end on a tiny MLP: train.py runs in its workdir, results are gathered,
    and a second invocation skips the finished run."""
    sweep_file = tmp_path / "tiny_sweep.py"
    sweep_file.write_text(
        textwrap.dedent(
            """
            def get_sweep():
                return {
                    "config": "configs/fashion_mnist_mlp.py",
                    "grid": {"model.features": [(16,)]},
                    "seeds": [0],
                    "fixed": {"num_train_steps": 10, "batch_size": 32, "warmup_steps": 2,
                              "log_every_steps": 5, "async_checkpointing": False},
                }
            """
        )
    )
    sweep_dir = tmp_path / "sw"
    command = [
        sys.executable,
        os.path.join(REPO, "sweep.py"),
        f"--sweep={sweep_file}",
        f"--sweep_dir={sweep_dir}",
        "--set=learning_rate=0.003",
    ]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    for _ in range(2):
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=300, cwd=str(tmp_path), env=env
        )
        assert result.returncode == 0, result.stderr[-3000:]
    assert "Skipping 1 finished run(s)." in result.stdout
    workdir = sweep_dir / "model.features=(16,)" / "seed=0"
    metrics = json.loads((workdir / "final_metrics.json").read_text())
    assert metrics["step"] == 10 and 0 < metrics["test_accuracy"] <= 1
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"]["features"] == [16] and config["learning_rate"] == 0.003
    with open(sweep_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["finished"]
    assert float(rows[0]["test_accuracy"]) == pytest.approx(metrics["test_accuracy"])
    assert "test_accuracy" in (sweep_dir / "results.md").read_text()
    assert (sweep_dir / "plots" / "learning_curves.png").exists()


def test_random_sweep_file_dry_run_from_the_command_line(tmp_path):
    """A sweep file may `import sweep` for its distributions; --dry_run lists the samples."""
    sweep_file = tmp_path / "random_sweep.py"
    sweep_file.write_text(
        textwrap.dedent(
            """
            import sweep

            def get_sweep():
                return {
                    "config": "configs/fashion_mnist_mlp.py",
                    "random": {"count": 3, "seed": 0,
                               "params": {"learning_rate": sweep.log_uniform(1e-4, 1e-2)}},
                    "seeds": [0, 1],
                }
            """
        )
    )
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "sweep.py"),
            f"--sweep={sweep_file}",
            f"--sweep_dir={tmp_path / 'sw'}",
            "--dry_run",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rates = set(re.findall(r"\[new\] learning_rate=([0-9.e-]+)/seed=\d", result.stdout))
    assert len(rates) == 3 and all(1e-4 <= float(r) <= 1e-2 for r in rates)
    assert result.stdout.count("--config.learning_rate=") == 6
    assert not (tmp_path / "sw").exists()
