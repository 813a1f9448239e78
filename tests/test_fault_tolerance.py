"""Fault tolerance and exact reproducibility: kills, preemption, damaged checkpoints, other meshes,
NaNs, bad configs and mismatched checkpoints, on a tiny MLP over Fashion-MNIST.

Runs that must reproduce one another are compared bitwise (the whole saved train state, every
logged training metric, the final metrics). The module doubles as the driver of the subprocesses
that need several simulated devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/test_fault_tolerance.py '<json>'
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import checkpointing  # noqa: E402
import config_validation  # noqa: E402
import experiment  # noqa: E402
import train  # noqa: E402
from data import images, sources  # noqa: E402
from runtime import metrics_writer, preemption, workdir_files  # noqa: E402

# The run the tests reproduce: 60 steps, each logged, checkpointed (asynchronously) every 10.
RUN = {
    "num_train_steps": 60,
    "batch_size": 32,
    "warmup_steps": 4,
    "eval_batch_size": 1000,
    "log_every_steps": 1,
    "eval_every_steps": 10_000,
    "checkpoint_every_steps": 10,
    "keep_checkpoints": 2,
    "async_checkpointing": True,
}
SUBPROCESS_TIMEOUT = 300  # seconds; every subprocess is bounded

pytestmark = pytest.mark.usefixtures("fashion_mnist_ready")


def make_config(**overrides: Any):
    """The tiny MLP config of RUN, with `overrides` (nested groups as dicts) applied last."""
    from configs import fashion_mnist_mlp

    config = fashion_mnist_mlp.get_config()
    for key, value in {**RUN, **overrides}.items():
        if isinstance(value, dict):
            config[key].update(value)
        else:
            config[key] = tuple(value) if isinstance(value, list) else value
    return config


def train_command(workdir: str, **overrides: Any) -> list[str]:
    """The command line that trains make_config(**overrides) (flat overrides only) in workdir."""
    flags = [f"--config.{k}={v}" for k, v in {**RUN, **overrides}.items()]
    return [sys.executable, "train.py", "--config=configs/fashion_mnist_mlp.py",
            f"--workdir={workdir}", *flags]  # fmt: skip


def launch(command: list[str], log_path: str, devices: int = 1) -> subprocess.Popen:
    """Starts a subprocess in the repo with `devices` simulated CPU devices, output to log_path."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    with open(log_path, "w") as log:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, log_path: str) -> tuple[int, str]:
    """Waits (bounded) for the subprocess; returns (exit code, its output)."""
    try:
        process.wait(timeout=SUBPROCESS_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    with open(log_path) as f:
        return process.returncode, f.read()


def progress(log_path: str) -> int:
    """The last step a run reported in its own output ('step 12/60 | ...'; 0 before any)."""
    with open(log_path) as f:
        steps = re.findall(r"^step (\d+)/", f.read(), flags=re.MULTILINE)
    return int(steps[-1]) if steps else 0


def wait_until(predicate, process: subprocess.Popen, what: str) -> None:
    """Polls `predicate` every 10 ms while `process` runs; fails the test if it never holds."""
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    while not predicate():
        assert process.poll() is None, f"the run ended (exit {process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def train_rows(workdir: str, prefix: str = "") -> dict[int, dict[str, float]]:
    """metrics.jsonl by step (names starting with `prefix`), without the wall-clock rates (the
    only fields allowed to differ between runs)."""
    rows: dict[int, dict[str, float]] = {}
    for row in metrics_writer.read_jsonl(os.path.join(workdir, "metrics.jsonl")):
        names = [k for k in row if k.startswith(prefix) and k != "step"]
        values = {k: row[k] for k in names if not k.endswith("_per_sec")}
        assert not set(values) & set(rows.get(row["step"], {})), f"step {row['step']} logged twice"
        rows.setdefault(row["step"], {}).update(values)
    return rows


def final_metrics(workdir: str) -> dict[str, Any]:
    """final_metrics.json without the run's wall-clock time (its seconds and goodput) and
    provenance (the commit it ran at)."""
    with open(os.path.join(workdir, "final_metrics.json")) as f:
        final = json.load(f)
    return {k: v for k, v in final.items()
            if "seconds" not in k and k != "goodput" and not k.startswith("git_")}  # fmt: skip


def assert_same_state(workdir_a: str, workdir_b: str) -> None:
    """The newest saved train states (step, parameters, optimizer state) are bitwise equal."""
    a, step_a = checkpointing.read_state_as_numpy(workdir_a)
    b, step_b = checkpointing.read_state_as_numpy(workdir_b)
    assert step_a == step_b
    leaves_a = jax.tree_util.tree_leaves_with_path(a)
    leaves_b = jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b]
    for (path, x), (_, y) in zip(leaves_a, leaves_b, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
        assert x.tobytes() == y.tobytes(), f"{jax.tree_util.keystr(path)} differs"


def assert_same_run(workdir: str, reference: str, prefix: str = "") -> None:
    """Bitwise the same training: every logged metric (starting with `prefix`), the final metrics
    and the saved state."""
    assert train_rows(workdir, prefix) == train_rows(reference, prefix)
    assert final_metrics(workdir) == final_metrics(reference)
    assert_same_state(workdir, reference)


def stop_at(monkeypatch, step: int) -> None:
    """Makes the run act as if a preemption notice arrived at `step` (in this process)."""
    monkeypatch.setattr(preemption.PreemptionWatcher, "should_stop", lambda self, s: s == step)


@pytest.fixture(scope="module", autouse=True)
def _load_each_image_split_once():
    """Speed only: this module trains a dozen times in-process; read the TFDS splits once."""
    original = images._load_image_split
    images._load_image_split = functools.lru_cache(maxsize=4)(original)
    yield
    images._load_image_split = original


@pytest.fixture(scope="module")
def reference(tmp_path_factory, fashion_mnist_ready) -> str:
    """The workdir of one uninterrupted run of RUN."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    train.train_and_evaluate(make_config(), workdir)
    return workdir


# ----------------------------------------------------------------------------- determinism


def test_same_config_and_seed_give_bitwise_identical_runs(reference, tmp_path):
    train.train_and_evaluate(make_config(), str(tmp_path))
    assert sorted(train_rows(reference)) == list(range(1, RUN["num_train_steps"] + 1))
    assert_same_run(str(tmp_path), reference)


def test_preempted_in_process_then_resumed_matches_uninterrupted(reference, tmp_path, monkeypatch):
    stop_at(monkeypatch, 23)  # not a checkpoint step: the preemption save is the only one there
    assert train.train_and_evaluate(make_config(), str(tmp_path)) == {"preempted_at_step": 23}
    assert checkpointing.Checkpointer(str(tmp_path)).all_steps()[-1] == 23
    monkeypatch.undo()
    train.train_and_evaluate(make_config(), str(tmp_path))
    assert_same_run(str(tmp_path), reference)


# ----------------------------------------------------------------------------- kills


def test_sigkill_during_a_save_then_sigterm_then_rerun_matches_uninterrupted(reference, tmp_path):
    """The same command, run three times: killed with SIGKILL (while an asynchronous save is being
    written, if the poll catches one; one checkpoint is kept), preempted with SIGTERM, finished."""
    workdir = str(tmp_path / "run")
    # keep_checkpoints=1 is the harshest keep-N. Evaluating every 10 steps changes no numbers
    # (the reference does not) but makes the loop last long enough to be signalled mid-way.
    command = train_command(workdir, keep_checkpoints=1, eval_every_steps=10)
    checkpoints = os.path.join(workdir, "checkpoints")
    logs = [str(tmp_path / f"{i}.log") for i in (1, 2, 3)]

    def saving_after_step_20() -> bool:
        unfinished = checkpointing.unfinished_saves(checkpoints)
        saving = any(int(n.split(".")[0]) >= 20 for n in unfinished)
        return saving or progress(logs[0]) >= 35

    # 1. SIGKILL: no chance to clean up. A complete checkpoint must survive it.
    process = launch(command, logs[0])
    wait_until(saving_after_step_20, process, "a save after step 20")
    process.send_signal(signal.SIGKILL)
    code, _ = finish(process, logs[0])
    assert code == -signal.SIGKILL
    params = experiment.restore_run(workdir).params  # restorable, checksums verified
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
    survivor = checkpointing.Checkpointer(workdir).all_steps()[-1]
    assert survivor >= 10

    # 2. SIGTERM (a preemption notice): saves at the current step and exits cleanly.
    process = launch(command, logs[1])
    wait_until(lambda: progress(logs[1]) >= 41, process, "step 41")
    process.send_signal(signal.SIGTERM)
    code, output = finish(process, logs[1])
    assert code == 0, output[-3000:]
    assert f"Resuming from checkpoint at step {survivor}" in output
    assert "Preempted: saved a checkpoint at step" in output
    stopped = int(output.split("Preempted: saved a checkpoint at step ")[1].split(";")[0])
    assert 41 <= stopped < RUN["num_train_steps"]
    assert checkpointing.Checkpointer(workdir).all_steps() == [stopped]

    # 3. The same command again finishes the run: bitwise what an uninterrupted run gives.
    process = launch(command, logs[2])
    code, output = finish(process, logs[2])
    assert code == 0, output[-3000:]
    assert f"Resuming from checkpoint at step {stopped}" in output
    assert_same_run(workdir, reference, prefix="train/")


# ----------------------------------------------------------------------------- damaged checkpoints


def test_damaged_and_unfinished_checkpoints_are_named_and_skipped(reference, tmp_path, caplog):
    """Newest first: a cut-off save (tmp dir), flipped bytes (which Orbax itself reads back without
    complaint: caught by the checksums), a truncated and a deleted data file. The run names each,
    sets the damaged ones aside and resumes from step 20, the newest valid one."""
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(make_config(keep_checkpoints=5), workdir)
    directory = os.path.join(workdir, "checkpoints")
    assert checkpointing.Checkpointer(workdir).all_steps() == [20, 30, 40, 50, 60]

    def biggest_data_file(step: int) -> str:
        root = os.path.join(directory, str(step), "state")
        files = [os.path.join(path, name) for path, _, names in os.walk(root) for name in names]
        return max(files, key=os.path.getsize)  # the arrays' data, not the small metadata

    shutil.copytree(
        os.path.join(directory, "60"), os.path.join(directory, "70.orbax-checkpoint-tmp")
    )
    with open(biggest_data_file(60), "r+b") as f:  # overwrite bytes in the middle
        f.seek(os.path.getsize(f.name) // 2)
        f.write(b"\xff" * 64)
    with open(biggest_data_file(50), "r+b") as f:  # truncate
        f.truncate(100)
    os.remove(biggest_data_file(40))
    with open(os.path.join(directory, "30", "state", "_METADATA"), "w") as f:
        f.write("{not json")
    os.remove(os.path.join(workdir, "final_metrics.json"))

    train.train_and_evaluate(make_config(keep_checkpoints=5), workdir)
    warnings = caplog.text
    assert "70.orbax-checkpoint-tmp" in warnings
    for step in (60, 50, 40, 30):
        assert f"Checkpoint {step} in {directory} is damaged" in warnings
    assert "checksum mismatch" in warnings  # how the flipped bytes were found
    assert sorted(os.listdir(os.path.join(workdir, "damaged_checkpoints")))[0].startswith("30-")
    assert_same_run(workdir, reference)


def test_a_damaged_newest_checkpoint_never_silently_restarts(reference, tmp_path):
    """With every checkpoint unreadable, the run refuses to start over on top of them."""
    workdir = str(tmp_path / "run")
    shutil.copytree(reference, workdir)
    for step in checkpointing.Checkpointer(workdir).all_steps():
        os.remove(os.path.join(workdir, "checkpoints", str(step), "state", "_METADATA"))
    with pytest.raises(checkpointing.CheckpointMismatchError, match="could be read"):
        train.train_and_evaluate(make_config(), workdir)


# ----------------------------------------------------------------------------- other meshes


def _driver_cases(cases: list[dict[str, Any]], devices: int, log_path: str) -> subprocess.Popen:
    command = [sys.executable, os.path.abspath(__file__), json.dumps(cases)]
    return launch(command, log_path, devices=devices)


def _losses(workdir: str) -> np.ndarray:
    rows = train_rows(workdir)
    return np.array([rows[s]["train/loss"] for s in sorted(rows) if "train/loss" in rows[s]])


def test_checkpoint_from_8_devices_resumes_on_4_and_on_1(tmp_path, capsys):
    """A checkpoint of fsdp=8 on 8 simulated devices (step 10 of 20) resumed with fsdp=4, with
    data=2 x tensor=2 and on one device: the losses after resuming equal the uninterrupted 8-device
    run's to float32 rounding (the reduction order differs with the mesh)."""
    short = {"num_train_steps": 20}
    ref8 = str(tmp_path / "ref8")
    fsdp8 = {**short, "mesh_shape": {"data": 1, "fsdp": 8, "tensor": 1}}
    process = _driver_cases([{"workdir": ref8, "overrides": fsdp8}], 8, str(tmp_path / "8.log"))
    code, output = finish(process, str(tmp_path / "8.log"))
    assert code == 0, output[-3000:]
    assert "'fsdp': 8" in output
    assert checkpointing.Checkpointer(ref8).all_steps() == [10, 20]
    cut8 = str(tmp_path / "cut8")  # as if the 8-device run had died after its step-10 checkpoint
    shutil.copytree(ref8, cut8)
    shutil.rmtree(os.path.join(cut8, "checkpoints", "20"))
    os.remove(os.path.join(cut8, "final_metrics.json"))
    meshes = {
        "fsdp4": {"data": 1, "fsdp": 4, "tensor": 1},
        "data2_tensor2": {"data": 2, "fsdp": 1, "tensor": 2},
        "one": {"data": 1, "fsdp": 1, "tensor": 1},
    }
    for name in meshes:
        shutil.copytree(cut8, str(tmp_path / name))
    cases = [{"workdir": str(tmp_path / name), "overrides": {**short, "mesh_shape": meshes[name]}}
             for name in ("fsdp4", "data2_tensor2")]  # fmt: skip
    process = _driver_cases(cases, 4, str(tmp_path / "4.log"))
    # Meanwhile, this (one-device) process resumes the third copy.
    train.train_and_evaluate(make_config(**short, mesh_shape=meshes["one"]), str(tmp_path / "one"))
    assert "Resuming from checkpoint at step 10" in capsys.readouterr().out
    code, output = finish(process, str(tmp_path / "4.log"))
    assert code == 0, output[-3000:]
    meshes_built = [line.split(": mesh ")[1] for line in output.splitlines() if ": mesh " in line]
    assert any("'data': 2" in m and "'tensor': 2" in m for m in meshes_built), meshes_built
    assert any("'fsdp': 4" in m for m in meshes_built), meshes_built
    assert output.count("Resuming from checkpoint at step 10") == 2  # checksums verified too
    reference_losses = _losses(ref8)
    reference_final = final_metrics(ref8)
    for name in meshes:
        workdir = str(tmp_path / name)
        np.testing.assert_allclose(_losses(workdir), reference_losses, rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(
            final_metrics(workdir)["test_loss"], reference_final["test_loss"], rtol=1e-5
        )
        a, _ = checkpointing.read_state_as_numpy(workdir)
        b, _ = checkpointing.read_state_as_numpy(ref8)
        for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"]), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6, err_msg=name)


# ----------------------------------------------------------------------------- NaN / Inf


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    # An honest blow-up: a learning rate of 1e30 (after a 4-step warmup) overflows the weights.
    config = make_config(learning_rate=1e30, checkpoint_every_steps=1, keep_checkpoints=2)
    with pytest.raises(train.NonFiniteLossError, match=r"at step (\d+)") as error:
        train.train_and_evaluate(config, str(tmp_path))
    bad_step = int(error.value.args[0].split("at step ")[1].split(" ")[0])
    assert 2 <= bad_step < 10
    steps = checkpointing.Checkpointer(str(tmp_path)).all_steps()
    assert steps and steps[-1] == bad_step - 1  # the last finite state, never the NaN one
    params = experiment.restore_run(str(tmp_path)).params
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_skip_nonfinite_steps_continues_and_counts_them(tmp_path, capsys):
    config = make_config(learning_rate=1e30, num_train_steps=12, skip_nonfinite_steps=True)
    final = train.train_and_evaluate(config, str(tmp_path))
    assert final["step"] == 12
    rows = train_rows(str(tmp_path))
    skipped = [rows[s]["train/skipped_steps"] for s in sorted(rows) if "train/loss" in rows[s]]
    assert skipped[0] == 0 and skipped[-1] > 0 and skipped == sorted(skipped)
    assert f"skipped {int(skipped[-1])}" in capsys.readouterr().out
    state, _ = checkpointing.read_state_as_numpy(str(tmp_path))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"lerning_rate": 0.1}, "lerning_rate. Did you mean 'learning_rate'"),
        ({"model": {"featurs": (8,)}}, "featurs is not a field of the 'mlp' model"),
        ({"batch_size": "32"}, "config.batch_size='32' has type str; expected int"),
        ({"learning_rate": "fast"}, "config.learning_rate='fast' has type str; expected float"),
        ({"batch_size": 0}, "config.batch_size=0 must be positive"),
        ({"learning_rate": -1.0}, "config.learning_rate=-1.0 must not be negative"),
        ({"z_loss": -1.0}, "config.z_loss=-1.0 must not be negative"),
        ({"mesh_shape": {"data": 3}}, "mesh_shape"),
        ({"grad_accum_steps": 3}, "grad_accum_steps=3"),
        ({"optimizer": "adamm"}, "config.optimizer='adamm': choose one of"),
        ({"num_train_steps": 0}, "config.num_train_steps=0 must be positive (or unset: None)"),
        ({"init_from": {"step": -1}}, "config.init_from.step=-1 must be a step >= 0"),
        ({"model": {"name": "mpl"}}, "is not a model file in models/; choose one of"),
        ({"model": {"name": "layers"}}, "models/layers.py defines no `Model = "),
        ({"task": "lm"}, "is a model for task 'classification' (models/mlp.py), but"),
    ],
)
def test_bad_configs_fail_clearly_before_anything_runs(overrides, message, tmp_path):
    # Built from a dict (as config.json is read back): ConfigDict would refuse a wrong type itself.
    fields = make_config().to_dict()
    for key, value in overrides.items():
        if isinstance(value, dict):
            fields[key].update(value)
        else:
            fields[key] = value
    config = ml_collections.ConfigDict(fields)
    with pytest.raises(config_validation.ConfigError) as error:
        train.train_and_evaluate(config, str(tmp_path))
    assert message in str(error.value)
    assert not os.path.exists(tmp_path / "checkpoints")


def test_a_batch_that_does_not_divide_over_the_devices_is_refused():
    config = make_config(batch_size=36, eval_batch_size=1000)
    with pytest.raises(config_validation.ConfigError, match="multiple of 8"):
        config_validation.validate(config, num_devices=8)


def test_a_missing_dataset_says_how_to_get_it(tmp_path):
    config = make_config(dataset="no_such_dataset_anywhere", data_dir=str(tmp_path / "tfds"))
    with pytest.raises(sources.DatasetUnavailableError, match="no_such_dataset_anywhere") as e:
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert "fashion_mnist" in str(e.value)  # what to use instead
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_a_misspelt_flag_on_the_command_line_fails_readably(tmp_path):
    command = [sys.executable, "train.py", "--config=configs/fashion_mnist_mlp.py",
               f"--workdir={tmp_path}", "--config.lerning_rate=1"]  # fmt: skip
    code, output = finish(launch(command, str(tmp_path / "cli.log")), str(tmp_path / "cli.log"))
    assert code != 0
    assert "--config.lerning_rate" in output and 'Did you mean "learning_rate"' in output
    assert "Traceback" not in output


# ----------------------------------------------------------------------------- mismatches


def test_resuming_with_other_model_shapes_is_refused_unless_restart(reference, tmp_path):
    """Another model (and a run length short of the step reached) is refused, naming the
    fields; restart=True moves every record of the old run aside (nothing lost) and what
    remains in the workdir describes the new run only."""
    workdir = str(tmp_path / "run")
    shutil.copytree(reference, workdir)
    narrower = {"model": {"features": (32,)}, "num_train_steps": 10}
    changed = r"model\.features: \(128, 64\) -> \(32,\)"
    with pytest.raises(workdir_files.WorkdirError, match=changed):
        train.train_and_evaluate(make_config(**narrower), workdir)
    train.train_and_evaluate(make_config(**narrower, restart=True), workdir)
    (old,) = os.listdir(os.path.join(workdir, workdir_files.PREVIOUS_RUNS))
    old = os.path.join(workdir, workdir_files.PREVIOUS_RUNS, old)
    assert sorted(os.listdir(os.path.join(old, "checkpoints"))) == ["50", "60"]
    assert {"config.json", "metrics.jsonl", "tensorboard", "final_metrics.json"} <= set(
        os.listdir(old)
    )
    state, step = checkpointing.read_state_as_numpy(workdir)
    assert step == 10 and state["params"]["dense_0"]["kernel"].shape == (784, 32)
    assert max(row["step"] for row in metrics_writer.read_jsonl(f"{workdir}/metrics.jsonl")) == 10
    assert final_metrics(workdir)["step"] == 10


# ----------------------------------------------------------------------------- subprocess driver


def _drive(cases: list[dict[str, Any]]) -> None:
    """Trains each case {'workdir', 'overrides'} in this process; prints its mesh."""
    import sharding

    for case in cases:
        config = make_config(**case["overrides"])
        print(f"{case['workdir']}: mesh {dict(sharding.make_mesh(config).shape)}", flush=True)
        result = train.train_and_evaluate(config, case["workdir"])
        print(f"{case['workdir']}: {result.get('preempted_at_step', 'finished')}", flush=True)


if __name__ == "__main__":
    _drive(json.loads(sys.argv[1]))
