"""Tests for tools/sweep: expanding settings, naming runs, running them, tables and plots."""

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

from tools.sweep import driver, plots, reporting, spec

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
        json.dump({"test_accuracy": acc, "test_loss": 1 - acc, "step": 30, "model": "mlp",
                   "git_commit": "0123456789abcdef", "git_dirty": seed == 1,
                   "goodput": {"goodput": 0.25 + 0.5 * seed, "shares": {}}}, f)
    """
)


@pytest.fixture
def fake_command(tmp_path):
    """A command_fn that runs FAKE_TRAINER instead of train.py."""
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAINER)

    def command(sweep, run, extra=()):
        return [sys.executable, str(script), json.dumps(run.setting), str(run.seed), run.workdir]

    return command


def _calls(run: spec.Run) -> int:
    path = os.path.join(run.workdir, "calls.txt")
    return len(open(path).readlines()) if os.path.exists(path) else 0


def test_grid_expands_to_every_combination_times_seeds(tmp_path):
    """A 2 x 3 grid with 2 seeds gives 12 runs, each with its own workdir."""
    sweep = spec.parse_sweep(
        {
            "config": "configs/fashion_mnist_cnn.py",
            "grid": {"model.conv_features": [(32,), (64,)], "learning_rate": [1e-4, 1e-3, 1e-2]},
            "seeds": [0, 1],
        }
    )
    assert len(sweep.settings) == 6
    assert {(s["model.conv_features"], s["learning_rate"]) for s in sweep.settings} == {
        (w, lr) for w in [(32,), (64,)] for lr in [1e-4, 1e-3, 1e-2]
    }
    assert sweep.fields == ["model.conv_features", "learning_rate"]
    runs = spec.plan_runs(sweep, str(tmp_path))
    assert len(runs) == 12 and len({r.workdir for r in runs}) == 12
    assert all(r.workdir.startswith(str(tmp_path)) for r in runs)


def test_explicit_settings_and_invalid_sweeps():
    """A list of override dicts is taken as is; contradictory sweeps are rejected."""
    sweep = spec.parse_sweep(
        {"config": "c.py", "settings": [{"learning_rate": 0.1}, {"optimizer": "sgd"}]}
    )
    assert sweep.settings == [{"learning_rate": 0.1}, {"optimizer": "sgd"}]
    assert sweep.seeds == [0] and sweep.kind == "settings"
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
            spec.parse_sweep(spec_dict)


def test_random_search_is_seeded_and_stays_in_range():
    """Same seed, same samples; log-uniform values lie in range and spread over decades."""
    params = {
        "learning_rate": spec.log_uniform(1e-4, 1e-1),
        "dropout_rate": spec.uniform(0.0, 0.5),
        "optimizer": spec.choice(["adamw", "sgd"]),
        "batch_size": 64,
    }
    a = spec.sample_random(params, 200, seed=3)
    assert a == spec.sample_random(params, 200, seed=3)
    assert a != spec.sample_random(params, 200, seed=4)
    lrs = np.array([s["learning_rate"] for s in a])
    assert lrs.min() >= 1e-4 * 0.999 and lrs.max() <= 1e-1 * 1.001
    # Log-uniform: about half the samples fall below the geometric mean (uniform: ~3%).
    assert 0.35 < np.mean(lrs < math.sqrt(1e-4 * 1e-1)) < 0.65
    assert all(float(f"{lr:.3g}") == lr for lr in lrs)  # rounded: readable run names
    assert all(0 <= s["dropout_rate"] <= 0.5 for s in a)
    assert {s["optimizer"] for s in a} == {"adamw", "sgd"}
    assert all(s["batch_size"] == 64 for s in a)
    sweep = spec.parse_sweep(
        {"config": "c.py", "random": {"count": 5, "seed": 1, "params": params}, "seeds": [0, 1]}
    )
    assert sweep.kind == "random" and len(sweep.settings) == 5


def test_run_names_are_readable_and_safe(tmp_path):
    """Names read 'field=value,...' (fields sorted); odd characters and long names are tamed."""
    run = spec.Run({"model.conv_features": (64,), "learning_rate": 0.001}, 0, "")
    assert run.name == "learning_rate=0.001,model.conv_features=(64,)/seed=0"
    assert spec.setting_name({"features": (32, 64), "flip": True}) == "features=(32,64),flip=True"
    assert spec.setting_name({}) == "base"
    assert spec.sanitize("dataset=/tmp/my corpus.txt") == "dataset=_tmp_my_corpus.txt"
    long_a, long_b = "x=" + "a" * 300, "x=" + "a" * 299 + "b"
    assert len(spec.sanitize(long_a)) <= 120
    assert spec.sanitize(long_a) != spec.sanitize(long_b)
    sweep = spec.parse_sweep({"config": "c.py", "grid": {"dataset": ["/a/b.txt", "/a/c.txt"]}})
    for r in spec.plan_runs(sweep, str(tmp_path)):
        assert os.path.dirname(os.path.dirname(r.workdir)) == str(tmp_path)


def test_train_command_passes_overrides_that_config_flags_parse(tmp_path):
    """Every setting, fixed field and the seed become --config.<field>=<literal> flags."""
    sweep = spec.parse_sweep(
        {
            "config": "configs/fashion_mnist_cnn.py",
            "settings": [{"model.conv_features": (32, 64), "learning_rate": 3e-4}],
            "fixed": {"num_epochs": 2.0, "augment.random_flip": False},
            "seeds": [7],
        }
    )
    run = spec.plan_runs(sweep, str(tmp_path))[0]
    command = spec.train_command(sweep, run)
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
    cnn = spec.load_sweep(os.path.join(REPO, "configs/sweeps/cnn_width_lr.py"))
    assert len(cnn.settings) == 9 and len(cnn.seeds) == 3
    quick = spec.load_sweep(os.path.join(REPO, "configs/sweeps/cnn_width_lr.py:quick"))
    assert len(quick.settings) == 4 and quick.seeds == [0, 1]
    gpt = spec.load_sweep(os.path.join(REPO, "configs/sweeps/gpt_depth.py:quick"))
    assert gpt.fields == ["model.num_layers"] and gpt.fixed["num_train_steps"] == 300
    for sweep in (cnn, quick, gpt):
        assert os.path.isfile(spec.resolve_config_path(sweep.config))


def test_named_axes_bundle_overrides(tmp_path):
    """A grid axis given as {label: overrides} sweeps bundles: names and tables show the label,
    train.py gets the bundle's fields; bundles that collide with swept or fixed fields are
    refused."""
    sweep = spec.parse_sweep(
        {
            "config": "configs/fashion_mnist_cnn.py",
            "grid": {
                "net": {"small": {"model.conv_features": (8,)}, "base": {}},
                "learning_rate": [1e-3, 3e-3],
            },
            "fixed": {"num_epochs": 1.0},
        }
    )
    assert sweep.fields == ["net", "learning_rate"] and len(sweep.settings) == 4
    assert sweep.config_fields == ["model.conv_features", "learning_rate"]
    assert sweep.settings[0] == {"net": "small", "learning_rate": 1e-3}
    runs = spec.plan_runs(sweep, str(tmp_path))
    assert runs[0].name == "learning_rate=0.001,net=small/seed=0"
    flags = spec.train_command(sweep, runs[0])[3:]
    assert "--config.model.conv_features=(8,)" in flags and "--config.net=small" not in flags
    assert not any("conv_features" in f for f in spec.train_command(sweep, runs[2])[3:])
    spec.check_fields(sweep)  # model.conv_features is a field of the CNN config
    bad = [
        {"grid": {"net": {"a": {"learning_rate": 0.1}}, "learning_rate": [1e-3]}},  # swept too
        {"grid": {"net": {"a": {"num_epochs": 2.0}}}, "fixed": {"num_epochs": 1.0}},  # fixed
        {"grid": {"net": {"a": {"seed": 1}}}},
        {"grid": {"net": {"a": {"x": 1}}, "opt": {"b": {"x": 2}}}},  # two axes set one field
        {"grid": {"net": {"a": 0.1}}},  # not an overrides dict
        {"grid": {"net": {}}},
    ]
    for spec_dict in bad:
        with pytest.raises(ValueError):
            spec.parse_sweep({"config": "c.py", **spec_dict})
    typo = spec.parse_sweep(
        {"config": "configs/fashion_mnist_cnn.py", "grid": {"net": {"a": {"model.conv_feat": 1}}}}
    )
    with pytest.raises(ValueError, match="model.conv_feat .did you mean 'model.conv_features'"):
        spec.check_fields(typo)


def _config_with(base: str, overrides: dict):
    """The config train.py builds from `base` with --config.<field>=<value> overrides."""
    import importlib

    config = importlib.import_module(f"configs.{base}").get_config()
    for field, value in overrides.items():
        *parents, leaf = field.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        assert leaf in node, field  # train.py would refuse an unknown field
        node[leaf] = value
    return config


def test_block_ablation_sweep_blocks_are_the_configs_they_name():
    """configs/sweeps/gpt_block_ablation.py: 3 blocks x AdamW/Muon x 3 seeds; its 'gpt2' block
    on the Llama-style base config is exactly shakespeare_char_cpu.py (every field, every
    parameter), its 'llama' block the preset, and the SwiGLU block is within 1% of GPT-2's
    parameter count."""
    from models import build_model, gpt

    sweep = spec.load_sweep(os.path.join(REPO, "configs/sweeps/gpt_block_ablation.py"))
    assert sweep.fields == ["block", "optimizer"] and sweep.seeds == [0, 1, 2]
    assert {s["optimizer"] for s in sweep.settings} == {"adamw", "muon"}
    assert len(spec.plan_runs(sweep, "/tmp/unused")) == 18
    base = sweep.config.removeprefix("configs/").removesuffix(".py")
    configs = {
        s["block"]: _config_with(base, {**sweep.fixed, **sweep.overrides(s)})
        for s in sweep.settings
        if s["optimizer"] == "adamw"
    }
    reference = _config_with("shakespeare_char_cpu", sweep.fixed)
    reference.optimizer = "adamw"
    gpt2 = configs["gpt2"].to_dict()
    assert gpt2.pop("model") != reference.model.to_dict()  # spelled out, not the defaults
    assert gpt2 == {k: v for k, v in reference.to_dict().items() if k != "model"}
    # The same module: the same parameters from the same key, the same logits.
    import jax
    import numpy as np

    tokens = jax.random.randint(jax.random.key(1), (2, 64), 0, 65)
    (a, pa), (b, pb) = [
        (model, model.init(jax.random.key(0), tokens))
        for model in (build_model(configs["gpt2"]), build_model(reference))
    ]
    assert jax.tree.structure(pa) == jax.tree.structure(pb)
    jax.tree.map(np.testing.assert_array_equal, pa, pb)
    np.testing.assert_array_equal(a.apply(pa, tokens), b.apply(pb, tokens))
    assert configs["llama"].to_dict() == _config_with(base, sweep.fixed).to_dict()
    counts = {block: gpt.num_params(build_model(c)) for block, c in configs.items()}
    assert counts["gpt2"] == gpt.num_params(build_model(reference)) == 804_096
    assert counts["llama"] == 804_224
    assert abs(counts["rmsnorm_swiglu"] / counts["gpt2"] - 1) < 0.01


def test_failures_are_contained_and_finished_runs_skipped(tmp_path, fake_command):
    """A failing run is reported with its log kept; the others finish; a restart skips the
    finished ones and retries only the failed one."""
    sweep = spec.parse_sweep(
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
    summary = driver.run_sweep(
        sweep, str(tmp_path / "sw"), parallel=2, command_fn=fake_command, log=messages.append
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

    summary = driver.run_sweep(sweep, str(tmp_path / "sw"), command_fn=fake_command, log=print)
    for outcome in summary["outcomes"]:
        expected_calls = 2 if outcome.run in failed else 1
        assert _calls(outcome.run) == expected_calls, outcome.run.name
        assert outcome.status == ("failed" if outcome.run in failed else "skipped")


def test_dry_run_runs_nothing(tmp_path, fake_command):
    """--dry_run lists the runs and their commands but starts none."""
    sweep = spec.parse_sweep({"config": "c.py", "grid": {"learning_rate": [0.1, 0.2]}})
    messages = []
    sweep_dir = tmp_path / "sw"
    driver.run_sweep(
        sweep, str(sweep_dir), dry_run=True, command_fn=fake_command, log=messages.append
    )
    assert sum("[new]" in m for m in messages) == 2
    assert not sweep_dir.exists()


def test_tables_report_mean_and_std_over_seeds_and_plots_are_drawn(tmp_path, fake_command):
    """results.md holds mean ± sample std per setting (best in bold); the PNGs are written."""
    sweep = spec.parse_sweep(
        {
            "config": "c.py",
            "grid": {"learning_rate": [0.001, 0.01, 0.03], "model.width": [8, 16]},
            "seeds": [0, 1],
        }
    )
    summary = driver.run_sweep(sweep, str(tmp_path), command_fn=fake_command, log=lambda m: None)
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
    # Each run's goodput and commit, right after its status; per setting, the mean goodput
    # (0.25 and 0.75 over the two seeds) and the commits (seed 1's tree was dirty).
    assert list(rows[0])[4:8] == ["status", "goodput", "git_commit", "git_dirty"]
    assert {r["git_commit"] for r in rows} == {"0123456789abcdef"}
    assert sorted({r["goodput"] for r in rows}) == ["0.25", "0.75"]
    assert "| seeds | goodput | commit |" in table
    assert table.count("| 2/2 | 50% | 0123456789ab, 0123456789ab+dirty |") == 4
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
    steps, values = plots.mean_curve(
        [
            (np.array([10, 20, 30]), np.array([1.0, 2.0, 3.0])),
            (np.array([10, 20]), np.array([3.0, 4.0])),
        ]
    )
    np.testing.assert_array_equal(steps, [10, 20])
    np.testing.assert_allclose(values, [2.0, 3.0])
    assert plots.use_log_x("learning_rate", [1e-3, 3e-3])
    assert not plots.use_log_x("model.num_layers", [2, 4])
    assert plots.use_log_x("batch_size", [8, 1024])
    assert plots.curve_name("test_accuracy") == "test/accuracy"
    assert plots.curve_name("val_loss") == "val/loss"
    assert reporting.higher_is_better("test_accuracy") and not reporting.higher_is_better(
        "val_loss"
    )


def _sweep_command(*args: str, cwd: str, env: dict[str, str] | None = None, timeout: float = 120):
    """Runs `python -m tools.sweep <args>` in `cwd`; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", "tools.sweep", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
    )


def test_sweep_cli_with_real_training(tmp_path, fashion_mnist_ready):
    """python -m tools.sweep end to end on a tiny MLP, started outside the repository (with the
    repository on PYTHONPATH): train.py runs in its workdir, results are gathered, and a second
    invocation skips the finished run."""
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
    args = [f"--sweep={sweep_file}", f"--sweep_dir={sweep_dir}", "--set=learning_rate=0.003"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": REPO}
    for _ in range(2):
        result = _sweep_command(*args, cwd=str(tmp_path), env=env, timeout=300)
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
    assert rows[0]["git_commit"] == metrics["git_commit"]  # 'unknown' outside a checkout
    assert float(rows[0]["goodput"]) == pytest.approx(metrics["goodput"]["goodput"])
    assert 0 < float(rows[0]["goodput"]) < 1
    assert "test_accuracy" in (sweep_dir / "results.md").read_text()
    assert (sweep_dir / "plots" / "learning_curves.png").exists()


def test_a_sweep_whose_runs_failed_exits_1(tmp_path):
    """Every run failing (here: a length train.py refuses) is a failed sweep: exit status 1,
    the failed runs named; a scheduler or a script must not read it as success."""
    sweep_file = tmp_path / "bad_sweep.py"
    sweep_file.write_text(
        textwrap.dedent(
            """
            def get_sweep():
                return {"config": "configs/fashion_mnist_mlp.py",
                        "grid": {"num_train_steps": [-5, -6]}, "seeds": [0]}
            """
        )
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": REPO}
    result = _sweep_command(f"--sweep={sweep_file}", f"--sweep_dir={tmp_path / 'sw'}",
                            cwd=str(tmp_path), env=env, timeout=300)  # fmt: skip
    assert result.returncode == 1, (result.stdout[-2000:], result.stderr[-2000:])
    assert "2 run(s) did not finish: num_train_steps=-5/seed=0, num_train_steps=-6/seed=0" in (
        result.stdout
    )


def test_readme_command_dry_run(tmp_path):
    """The sweep command of README.md, run from the repository root with --dry_run (and another
    sweep_dir), lists the shipped CNN sweep's 27 runs as train.py commands and starts none."""
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    found = re.search(r"`python -m tools\.sweep ([^`\[]+)", readme)
    assert found, "README.md shows no `python -m tools.sweep ...` command"
    args = found.group(1).split()
    sweep_dir = tmp_path / "sw"
    args = [f"--sweep_dir={sweep_dir}" if a.startswith("--sweep_dir=") else a for a in args]
    assert "--sweep=configs/sweeps/cnn_width_lr.py" in args
    result = _sweep_command(*args, "--dry_run", cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("[new] ") == 27
    assert result.stdout.count(os.path.join(REPO, "train.py")) == 27
    assert "learning_rate=0.003,model.conv_features=(64,)/seed=2" in result.stdout
    assert not sweep_dir.exists()


def test_random_sweep_file_dry_run_from_the_command_line(tmp_path):
    """A sweep file imports its distributions from tools.sweep; --dry_run lists the samples."""
    sweep_file = tmp_path / "random_sweep.py"
    sweep_file.write_text(
        textwrap.dedent(
            """
            from tools.sweep import log_uniform

            def get_sweep():
                return {
                    "config": "configs/fashion_mnist_mlp.py",
                    "random": {"count": 3, "seed": 0,
                               "params": {"learning_rate": log_uniform(1e-4, 1e-2)}},
                    "seeds": [0, 1],
                }
            """
        )
    )
    result = _sweep_command(
        f"--sweep={sweep_file}", f"--sweep_dir={tmp_path / 'sw'}", "--dry_run", cwd=REPO
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rates = set(re.findall(r"\[new\] learning_rate=([0-9.e-]+)/seed=\d", result.stdout))
    assert len(rates) == 3 and all(1e-4 <= float(r) <= 1e-2 for r in rates)
    assert result.stdout.count("--config.learning_rate=") == 6
    assert not (tmp_path / "sw").exists()


def test_sweep_file_distributions_are_the_modules_own(tmp_path, monkeypatch):
    """A loaded sweep file's distributions are instances of tools.sweep.spec.Distribution (one
    module, whatever the import path), so the isinstance check samples them; the repository root
    is put on sys.path for the file's imports."""
    sweep_file = tmp_path / "distributions.py"
    sweep_file.write_text(
        textwrap.dedent(
            """
            from tools.sweep import choice, log_uniform
            from tools.sweep.spec import uniform

            PARAMS = {
                "learning_rate": log_uniform(1e-4, 1e-2),
                "weight_decay": uniform(0.0, 0.1),
                "optimizer": choice(["adamw", "sgd"]),
                "batch_size": 64,
            }

            def get_sweep():
                return {"config": "configs/fashion_mnist_mlp.py",
                        "random": {"count": 4, "seed": 1, "params": PARAMS}}
            """
        )
    )
    monkeypatch.setattr(sys, "path", [p for p in sys.path if os.path.abspath(p or ".") != REPO])
    monkeypatch.chdir(tmp_path)
    sweep = spec.load_sweep(str(sweep_file))
    assert REPO in sys.path
    assert sweep.kind == "random" and len(sweep.settings) == 4
    for setting in sweep.settings:
        assert not any(isinstance(v, spec.Distribution) for v in setting.values())
        assert 1e-4 <= setting["learning_rate"] <= 1e-2
        assert 0.0 <= setting["weight_decay"] <= 0.1
        assert setting["optimizer"] in ("adamw", "sgd") and setting["batch_size"] == 64
    # Sampled, not passed through: a distribution would otherwise reach the run names.
    assert all("Distribution" not in spec.setting_name(s) for s in sweep.settings)


def test_command_line_errors_are_one_line(tmp_path):
    """Missing flags, a missing sweep file and a bad --set give one ERROR: line, exit status 1."""
    sweep_dir = f"--sweep_dir={tmp_path / 'sw'}"
    cases = [
        ([sweep_dir], "--sweep=configs/sweeps/<name>.py and --sweep_dir are required"),
        ([f"--sweep={tmp_path / 'nope.py'}", sweep_dir], "not found"),
        (["--sweep=configs/sweeps/cnn_width_lr.py:slow", sweep_dir], "Unknown variant"),
        (["--sweep=configs/sweeps/cnn_width_lr.py", sweep_dir, "--set=oops"], "--set="),
        (
            ["--sweep=configs/sweeps/cnn_width_lr.py", sweep_dir, "--set=learning_rate=0.1"],
            "are swept by",
        ),
    ]
    for args, message in cases:
        result = _sweep_command(*args, "--dry_run", cwd=REPO)
        assert result.returncode == 1, (args, result.stderr[-3000:])
        errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR:")]
        assert len(errors) == 1 and message in errors[0], (args, result.stderr[-3000:])
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "sw").exists()


def test_importing_the_package_defines_no_flags():
    """The flags exist only when the package runs as `python -m tools.sweep`."""
    import importlib

    from absl import flags

    for name in ("tools.sweep", "tools.sweep.__main__", "tools.sweep.driver"):
        importlib.import_module(name)
    for flag in ("sweep", "sweep_dir", "parallel", "dry_run", "run_timeout", "set"):
        assert flag not in flags.FLAGS


def test_a_swept_field_the_config_lacks_is_refused_before_any_run(tmp_path):
    """A misspelt field would make train.py refuse every run: load_sweep says so once, with
    the closest field."""
    path = tmp_path / "typo.py"
    path.write_text(
        "def get_sweep():\n"
        "    return {'config': 'configs/fashion_mnist_cnn.py',\n"
        "            'grid': {'lerning_rate': [1e-3, 3e-3]},\n"
        "            'fixed': {'model.conv_features': (8,)}}\n"
    )
    with pytest.raises(ValueError, match=r"lerning_rate \(did you mean 'learning_rate'\?\)"):
        spec.load_sweep(str(path))


# ----------------------------------------------------------------------------- cluster launchers

TINY_MLP_SWEEP = """
def get_sweep():
    return {
        "config": "configs/fashion_mnist_mlp.py",
        "settings": [
            {"model.features": (16,), "learning_rate": 0.003},
            {"model.features": (32,), "learning_rate": 0.003},
            {"model.features": (16,), "learning_rate": -1.0},  # refused by train.py: fails
        ],
        "seeds": [0, 1],
        "fixed": {"num_train_steps": 10, "batch_size": 32, "warmup_steps": 2,
                  "log_every_steps": 5, "async_checkpointing": False},
    }
"""


def _launch(tmp_path, launcher: str, *args: str, sweep_text: str = TINY_MLP_SWEEP):
    """`python -m tools.sweep --launcher=<launcher> ...` on a sweep file written to tmp_path."""
    sweep_file = tmp_path / "cluster_sweep.py"
    sweep_file.write_text(sweep_text)
    return _sweep_command(
        f"--sweep={sweep_file}", f"--sweep_dir={tmp_path / 'sw'}", f"--launcher={launcher}",
        *args, cwd=REPO,
    )  # fmt: skip


def test_index_ranges_are_slurm_array_syntax():
    """Run indices compress to sbatch's --array syntax."""
    from tools.sweep import launchers

    assert launchers.index_ranges([0, 1, 2, 3]) == "0-3"
    assert launchers.index_ranges([7, 0, 1, 2, 5, 8]) == "0-2,5,7-8"
    assert launchers.index_ranges([4]) == "4"


def test_slurm_array_tasks_run_locally_then_summarize(tmp_path, fashion_mnist_ready):
    """The generated array script, executed by bash with SLURM_ARRAY_TASK_ID=i (no sbatch),
    trains run i with train.py in the local driver's workdir; a failing run exits non-zero with
    its log's tail; a finished task is skipped; --summarize tabulates what finished and lists
    the rest; generating again submits only the unfinished runs."""
    result = _launch(
        tmp_path, "slurm", "--slurm_time=00:30:00", "--slurm_max_concurrent=2",
        "--slurm_sbatch=--qos=low", "--slurm_setup=echo setup ran",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = tmp_path / "sw"
    script = sweep_dir / "slurm_array.sh"
    text = script.read_text()
    header = text.split("\n\n", 1)[0].splitlines()
    # sbatch reads #SBATCH lines only before the first command.
    assert header[0] == "#!/bin/bash" and all(line.startswith("#") for line in header)
    assert "#SBATCH --array=0-5%2" in header and "#SBATCH --time=00:30:00" in header
    assert "#SBATCH --qos=low" in header
    assert f"#SBATCH --output={sweep_dir}/slurm/%A_%a.out" in header
    assert (sweep_dir / "slurm").is_dir() and (sweep_dir / "sweep.json").is_file()
    assert f"sbatch {script}" in result.stdout and "--summarize" in result.stdout

    sweep = spec.load_sweep(str(tmp_path / "cluster_sweep.py"))
    runs = spec.plan_runs(sweep, str(sweep_dir))

    def task(index: int) -> subprocess.CompletedProcess:
        env = {**os.environ, "SLURM_ARRAY_TASK_ID": str(index)}
        return subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env,
                              cwd=str(tmp_path), timeout=300)  # fmt: skip

    for index in (0, 2, 4):  # 4 fails; 1, 3 and 5 are never run
        done = task(index)
        workdir = runs[index].workdir
        assert os.path.exists(os.path.join(workdir, "train.log"))
        with open(os.path.join(workdir, "sweep_run.json")) as f:
            record = json.load(f)
        assert record["name"] == runs[index].name and record["index"] == index
        if index == 4:
            assert done.returncode != 0
            assert "learning_rate" in done.stderr and "ERROR: run 4 exited" in done.stderr
        else:
            assert done.returncode == 0, done.stderr[-3000:]
            metrics = reporting.read_final_metrics(workdir)
            assert metrics["step"] == 10 and 0 < metrics["test_accuracy"] <= 1
            with open(os.path.join(workdir, "config.json")) as f:
                config = json.load(f)
            assert config["seed"] == runs[index].seed
            assert config["model"]["features"] == list(runs[index].setting["model.features"])
    again = task(0)
    assert again.returncode == 0 and "finished already" in again.stdout
    assert again.stdout.startswith("setup ran\n")  # --slurm_setup lines run first
    wrong = task(6)
    assert wrong.returncode == 2 and "not a run of this sweep (0-5)" in wrong.stderr

    # Run 1 stopped early (a curve to step 5 only): it must not cut the plotted seed mean.
    os.makedirs(runs[1].workdir)
    with open(os.path.join(runs[1].workdir, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 5, "train/loss": 9.0}) + "\n")
    summary = _sweep_command(f"--sweep={tmp_path / 'cluster_sweep.py'}",
                             f"--sweep_dir={sweep_dir}", "--summarize", cwd=REPO)  # fmt: skip
    assert summary.returncode == 0, summary.stderr[-3000:]
    assert "2/6 run(s) finished" in summary.stdout
    with open(sweep_dir / "results.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    status = {run.name: rows[run.name]["status"] for run in runs}
    expected = ["finished", "new", "finished", "new", "started", "new"]
    assert [status[r.name] for r in runs] == expected
    accuracy = reporting.read_final_metrics(runs[2].workdir)["test_accuracy"]
    assert float(rows[runs[2].name]["test_accuracy"]) == pytest.approx(accuracy)
    table = (sweep_dir / "results.md").read_text()
    plain = table.replace("**", "")  # the best setting is in bold
    assert "| (32,) | 0.003 |" in plain and "| n/a | 0/2 |" in plain
    assert plain.count(" ± 0.0000 | 1/2 |") == 2  # one seed of two finished: std 0
    assert f"- `{runs[5].name}`: new" in table and f"- `{runs[4].name}`: started" in table
    assert (sweep_dir / "plots" / "learning_curves.png").is_file()
    groups = reporting.group_rows(sweep, reporting.collect_rows(runs))
    curves = plots.finished_curves(groups[0], {r.name: r.workdir for r in runs})
    steps, values, n = plots.seed_mean_curve(curves, "train/loss")
    assert n == 1 and steps[-1] == 10 and 9.0 not in values  # run 0 alone, to its end

    regenerated = _launch(tmp_path, "slurm")
    assert regenerated.returncode == 0, regenerated.stderr[-3000:]
    assert "#SBATCH --array=1,3-5\n" in script.read_text()
    assert "echo setup ran" not in script.read_text()  # flags are not remembered


def test_a_sweep_larger_than_slurms_array_limit_is_submitted_in_parts(tmp_path):
    """SLURM refuses task ids >= MaxArraySize (1001 by default): with --slurm_max_array_size=4
    the 6 runs are two arrays, 0-3 and 0-1 with offset 4, and task 1 of the second trains run 5."""
    result = _launch(tmp_path, "slurm", "--slurm_max_array_size=4", "--slurm_python=echo")
    assert result.returncode == 0, result.stderr[-3000:]
    script = tmp_path / "sw" / "slurm_array.sh"
    text = script.read_text()
    assert "#SBATCH --array=0-3\n" in text
    second = f"sbatch --array=0-1 --export=ALL,SWEEP_INDEX_OFFSET=4 {script}"
    assert f"#   {second}" in text and second in result.stdout
    runs = spec.plan_runs(spec.load_sweep(str(tmp_path / "cluster_sweep.py")), str(tmp_path / "sw"))
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "1", "SWEEP_INDEX_OFFSET": "4"}
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env,
                          cwd=str(tmp_path), timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    with open(os.path.join(runs[5].workdir, "sweep_run.json")) as f:
        assert json.load(f)["index"] == 5


def test_a_kubernetes_sweep_too_large_for_a_pods_command_is_refused(tmp_path):
    """The pods run the task script as one argument of `sh -c`, which Linux caps at 128 KiB:
    a sweep whose script is longer is refused with the reason, not written to fail at exec."""
    grid = [round(1e-4 * (i + 1), 6) for i in range(400)]
    sweep_text = (
        f"def get_sweep():\n    return {{'config': 'configs/fashion_mnist_mlp.py', "
        f"'grid': {{'learning_rate': {grid!r}}}, 'seeds': [0]}}\n"
    )
    result = _launch(tmp_path, "kubernetes", "--k8s_image=img", "--k8s_pvc=runs",
                     sweep_text=sweep_text)  # fmt: skip
    assert result.returncode == 1
    assert "ERROR: The pods' task script for 400 runs is" in result.stderr
    assert "more than one command-line argument may hold on Linux (131,072)" in result.stderr


def test_kubernetes_manifest_is_an_indexed_job_with_one_index_per_run(tmp_path):
    """The manifest parses as YAML: a batch/v1 Job, completionMode Indexed, completions = runs;
    its container's script, run by sh with JOB_COMPLETION_INDEX=i, executes run i's train.py
    command (paths as the pods see them: the volume and the image's repository)."""
    import yaml

    image_repo = tmp_path / "image" / "jaxlab"
    image_repo.mkdir(parents=True)
    mount = tmp_path / "volume"
    result = _launch(
        tmp_path, "kubernetes", "--k8s_image=registry.example/jaxlab:1", "--k8s_pvc=sweeps",
        f"--k8s_mount_path={mount}", f"--k8s_repo_dir={image_repo}", "--k8s_python=echo",
        "--k8s_cpu=4", "--k8s_memory=16Gi", "--k8s_gpus=1", "--k8s_parallelism=2",
        "--k8s_env=XLA_FLAGS=--xla_cpu_multi_thread_eigen=true",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    path = tmp_path / "sw" / "k8s_job.yaml"
    assert f"kubectl apply -f {path}" in result.stdout
    job = yaml.safe_load(path.read_text())
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    assert job["metadata"]["name"] == "sweep-sw"
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == 6 and job["spec"]["parallelism"] == 2
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["volumes"] == [{"name": "runs", "persistentVolumeClaim": {"claimName": "sweeps"}}]
    (container,) = pod["containers"]
    assert container["image"] == "registry.example/jaxlab:1"
    assert container["volumeMounts"] == [{"name": "runs", "mountPath": str(mount)}]
    assert container["resources"] == {
        "requests": {"cpu": "4", "memory": "16Gi"},
        "limits": {"memory": "16Gi", "nvidia.com/gpu": 1},
    }
    assert {"name": "XLA_FLAGS", "value": "--xla_cpu_multi_thread_eigen=true"} in container["env"]
    shell, flag, script = container["command"]
    assert (shell, flag) == ("/bin/sh", "-c")

    sweep = spec.load_sweep(str(tmp_path / "cluster_sweep.py"))
    pod_runs = spec.plan_runs(sweep, str(mount / "sw"))
    for index in (1, 4):
        env = {**os.environ, "JOB_COMPLETION_INDEX": str(index)}
        done = subprocess.run([shell, flag, script], env=env, capture_output=True, text=True,
                              timeout=60)  # fmt: skip
        assert done.returncode == 0, done.stderr
        run = pod_runs[index]
        with open(os.path.join(run.workdir, "train.log")) as f:
            logged = f.read().splitlines()
        echoed = logged[-1].split()  # `echo` stood in for python: it printed train.py's argv
        assert echoed[0] == str(image_repo / "train.py")
        assert echoed[1] == f"--config={image_repo / 'configs' / 'fashion_mnist_mlp.py'}"
        flags = dict(arg.split("=", 1) for arg in echoed[1:])
        assert flags["--workdir"] == run.workdir and flags["--config.seed"] == str(run.seed)
        assert float(flags["--config.learning_rate"]) == run.setting["learning_rate"]
        assert flags["--config.model.features"] == str(run.setting["model.features"])
        assert flags["--config.num_train_steps"] == "10"
        assert "stopped before its end" in done.stdout  # echo wrote no final metrics
    assert len(os.listdir(mount / "sw")) == 2  # two settings' directories, nothing else
    # No local workdirs: the pods' paths are under the volume.
    assert sorted(os.listdir(tmp_path / "sw")) == ["k8s_job.yaml", "sweep.json"]


def test_cluster_launcher_errors_are_one_line(tmp_path):
    """An unknown launcher, invalid resources, a missing image or volume, another launcher's
    flags and summarizing a sweep that never ran: one ERROR: line naming the flag, exit 1."""
    k8s = ["--k8s_image=img", "--k8s_pvc=runs"]
    cases = [
        (["--launcher=sge"], "--launcher='sge' is not one of local, slurm, kubernetes"),
        (["--launcher=slurm", "--slurm_time=2h"], "--slurm_time='2h'"),
        (["--launcher=slurm", "--slurm_mem=lots"], "--slurm_mem='lots'"),
        (["--launcher=slurm", "--slurm_sbatch=qos=high"], "--slurm_sbatch='qos=high'"),
        (["--launcher=kubernetes", "--k8s_pvc=runs"], "--k8s_image is required"),
        (["--launcher=kubernetes", "--k8s_image=img"], "exactly one of --k8s_pvc"),
        (["--launcher=kubernetes", *k8s, "--k8s_job_name=My_Sweep"], "--k8s_job_name='My_Sweep'"),
        (["--launcher=kubernetes", *k8s, "--k8s_sweep_dir=/elsewhere"], "not under"),
        (["--launcher=kubernetes", *k8s, "--k8s_memory=16 GB"], "--k8s_memory='16 GB'"),
        (["--launcher=kubernetes", *k8s, "--slurm_time=01:00:00"], "--slurm_time is for"),
        (["--launcher=slurm", "--parallel=2"], "--parallel is for --launcher=local"),
        (["--launcher=local", "--k8s_image=img"], "--k8s_image is for --launcher=kubernetes"),
        (["--summarize", "--launcher=slurm"], "--summarize runs nothing"),
        (["--summarize"], "does not exist"),
    ]
    sweep_file = tmp_path / "cluster_sweep.py"
    sweep_file.write_text(TINY_MLP_SWEEP)
    for args, message in cases:
        result = _sweep_command(
            f"--sweep={sweep_file}", f"--sweep_dir={tmp_path / 'sw'}", *args, cwd=REPO
        )
        assert result.returncode == 1, (args, result.stderr[-3000:])
        errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR:")]
        assert len(errors) == 1 and message in errors[0], (args, result.stderr[-3000:])
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "sw").exists()


def test_cluster_dry_run_prints_exactly_the_file(tmp_path):
    """`--dry_run > file` gives a file the scheduler takes: the plan's summary is on stderr."""
    import yaml

    common = ["--sweep=configs/sweeps/gpt_block_ablation.py", f"--sweep_dir={tmp_path / 'sw'}"]
    slurm = _sweep_command(*common, "--launcher=slurm", "--dry_run", cwd=REPO)
    assert slurm.returncode == 0, slurm.stderr[-2000:]
    assert slurm.stdout.startswith("#!"), slurm.stdout[:200]
    assert "18 runs" in slurm.stderr
    k8s = _sweep_command(
        *common, "--launcher=kubernetes", "--k8s_image=x:1", "--k8s_pvc=sweeps", "--dry_run",
        cwd=REPO,
    )  # fmt: skip
    assert k8s.returncode == 0, k8s.stderr[-2000:]
    manifest = yaml.safe_load(k8s.stdout)
    assert set(manifest) == {"apiVersion", "kind", "metadata", "spec"}, sorted(manifest)
    assert not (tmp_path / "sw").exists()
