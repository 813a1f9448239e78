"""Chaos test: SIGKILL a training run K times at random (seeded) moments, rerun the same command
each time, then check it ends bitwise where an uninterrupted run ends.

    python scripts/chaos.py                      # 5 faults, seed 0, 300 steps, in runs/chaos
    python scripts/chaos.py --faults=10 --seed=3 --steps=500 --workdir=/tmp/chaos

Each fault picks a moment: at a random step, while an asynchronous checkpoint is being written,
or right after the restore (before any step). After each kill the script records the newest
complete checkpoint on disk, and the restart must resume from exactly that step (no work lost
beyond the last checkpoint). Finally it compares the final train state (every array, bitwise),
final_metrics.json and every logged training metric with the reference run's. Exit code 0 if all
are identical, 1 otherwise.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from absl import flags  # noqa: E402

import checkpointing  # noqa: E402
from runtime import cli  # noqa: E402

RUN_TIMEOUT = 600  # seconds any one run may take before the script gives up on it


def run_flags(steps: int) -> list[str]:
    """The shrunk Fashion-MNIST MLP run: async saves every 20 steps, two kept, logged each step."""
    overrides = {
        "num_train_steps": steps,
        "batch_size": 32,
        "warmup_steps": 20,
        "model.features": "(64,32)",
        "eval_batch_size": 1000,
        "eval_every_steps": 50,  # evaluations take long enough to be killed during, too
        "log_every_steps": 1,
        "checkpoint_every_steps": 20,
        "keep_checkpoints": 2,
        "async_checkpointing": True,
    }
    return ["--config=configs/fashion_mnist_mlp.py"] + [
        f"--config.{k}={v}" for k, v in overrides.items()
    ]


def command(workdir: str, steps: int) -> list[str]:
    """The one command every attempt runs."""
    return [sys.executable, "train.py", f"--workdir={workdir}", *run_flags(steps)]


def launch(cmd: list[str], log_path: str) -> subprocess.Popen:
    """Starts `cmd` in the repository with its output going to log_path."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_PLATFORMS": "cpu"}
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def read(log_path: str) -> str:
    """A run's output so far."""
    with open(log_path, errors="replace") as f:
        return f.read()


def progress(log_path: str) -> int:
    """The last step this run reported ('step 12/300 | ...'), 0 before any."""
    steps = re.findall(r"^step (\d+)/", read(log_path), flags=re.MULTILINE)
    return int(steps[-1]) if steps else 0


def resumed_from(log_path: str) -> int | None:
    """The step this run restored, if it has said so."""
    found = re.search(r"Resuming from checkpoint at step (\d+)", read(log_path))
    return int(found.group(1)) if found else None


def complete_steps(workdir: str) -> list[int]:
    """Steps with a finished checkpoint, by Orbax's own test."""
    return checkpointing.finished_steps(os.path.join(workdir, "checkpoints"))


def saving_at_or_after(workdir: str, step: int) -> bool:
    """True while an asynchronous save of a step >= `step` is being written."""
    unfinished = checkpointing.unfinished_saves(os.path.join(workdir, "checkpoints"))
    return any(int(n.split(".")[0]) >= step for n in unfinished)


def _mtime(path: str) -> float:
    """Modification time, or 0 if the path has gone meanwhile."""
    try:
        return os.path.getmtime(path)
    except OSError:
        return 0.0


def wait_for(predicate, process: subprocess.Popen) -> bool:
    """Polls every 5 ms; False if the process ended (or the time ran out) first."""
    deadline = time.monotonic() + RUN_TIMEOUT
    while not predicate():
        if process.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def one_fault(
    i: int,
    rng: random.Random,
    last_step: int,
    *,
    workdir: str,
    chaos_dir: str,
    steps: int,
    faults: int,
) -> dict[str, Any]:
    """Starts the command in chaos_dir and SIGKILLs it at a random moment; returns what happened
    (its log goes to workdir)."""
    log = os.path.join(workdir, f"attempt_{i}.log")
    expected = max(complete_steps(chaos_dir), default=0)
    # Spread the kills over the run: each aims somewhere in the next stretch of steps.
    lo = min(last_step + 1, steps)
    hi = min(steps, lo + max(1, 2 * steps // (faults + 1)))
    target = rng.randint(lo, hi)
    mode = rng.choice(["step", "step", "saving", "after_restore"] if expected else ["step"])
    started = time.time()
    process = launch(command(chaos_dir, steps), log)
    if mode == "after_restore":
        landed = wait_for(lambda: resumed_from(log) is not None, process)
    elif mode == "saving":  # during a save, or at the step if none is caught in flight
        landed = wait_for(
            lambda: (
                saving_at_or_after(chaos_dir, max(expected + 1, target))
                or progress(log) >= min(steps, target + 20)
            ),
            process,
        )
    else:
        landed = wait_for(lambda: progress(log) >= target, process)
    time.sleep(rng.uniform(0, 0.02))  # not always right at the poll
    # Saves this attempt began (Orbax recreates a leftover tmp directory when it saves that step).
    directory = os.path.join(chaos_dir, "checkpoints")
    in_flight = [n for n in checkpointing.unfinished_saves(directory)
                 if _mtime(os.path.join(directory, n)) >= started]  # fmt: skip
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait(timeout=RUN_TIMEOUT)
    return {
        "attempt": i,
        "mode": mode,
        "target": target,
        "resumed_from": resumed_from(log) if expected else 0,
        "expected_resume": expected,
        "killed_after_step": progress(log),
        "killed": process.returncode == -signal.SIGKILL and landed,
        "exit_code": process.returncode,
        "saves_in_flight": in_flight,
        "checkpoints_left": complete_steps(chaos_dir),
    }


def train_rows(workdir: str) -> dict[int, dict[str, float]]:
    """metrics.jsonl (training and evaluation metrics) by step, without the wall-clock rates."""
    rows: dict[int, dict[str, float]] = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            values = {k: v for k, v in row.items() if k != "step" and not k.endswith("_per_sec")}
            rows.setdefault(row["step"], {}).update(values)
    return rows


def final_metrics(workdir: str) -> dict[str, Any]:
    """final_metrics.json without wall-clock times (seconds, goodput) and provenance (git_*)."""
    with open(os.path.join(workdir, "final_metrics.json")) as f:
        return {k: v for k, v in json.load(f).items()
                if "seconds" not in k and k != "goodput" and not k.startswith("git_")}  # fmt: skip


def compare(chaos_dir: str, reference_dir: str) -> list[str]:
    """What differs between the two runs' final states, final metrics and logged metrics."""
    import jax
    import numpy as np
    from absl import logging

    import checkpointing

    logging.set_verbosity(logging.ERROR)  # Orbax notes a missing optional metadata file

    differences = []
    a, step_a = checkpointing.read_state_as_numpy(chaos_dir)
    b, step_b = checkpointing.read_state_as_numpy(reference_dir)
    if step_a != step_b:
        differences.append(f"final checkpoint steps differ: {step_a} vs {step_b}")
    flat_a = dict(jax.tree_util.tree_leaves_with_path(a))
    flat_b = dict(jax.tree_util.tree_leaves_with_path(b))
    for path in sorted(set(flat_a) | set(flat_b), key=jax.tree_util.keystr):
        x, y = flat_a.get(path), flat_b.get(path)
        name = jax.tree_util.keystr(path)
        if x is None or y is None:
            differences.append(f"{name}: only in one run")
        elif np.asarray(x).tobytes() != np.asarray(y).tobytes():
            diff = np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))
            differences.append(f"{name}: differs (max abs difference {diff:.3g})")
    fa, fb = final_metrics(chaos_dir), final_metrics(reference_dir)
    for key in sorted(set(fa) | set(fb)):
        if fa.get(key) != fb.get(key):
            differences.append(f"final_metrics.json {key}: {fa.get(key)} vs {fb.get(key)}")
    ra, rb = train_rows(chaos_dir), train_rows(reference_dir)
    bad = [s for s in sorted(set(ra) | set(rb)) if ra.get(s) != rb.get(s)]
    if bad:
        differences.append(f"metrics.jsonl differs at {len(bad)} steps, first {bad[0]}")
    return differences


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The script's flags (defined only when run as a script: importing it defines none)."""
    flags.DEFINE_integer("faults", 5, "SIGKILLs to inflict")
    flags.DEFINE_integer("seed", 0, "seeds the kill moments")
    flags.DEFINE_string("workdir", "runs/chaos", "emptied first")
    flags.DEFINE_integer("steps", 300, "training steps of the run")


def main(argv: list[str]) -> int:
    """Runs the faults, the finishing run and the reference; prints the verdict."""
    del argv
    faults, steps = FLAGS.faults, FLAGS.steps
    workdir = os.path.abspath(FLAGS.workdir)
    chaos_dir = os.path.join(workdir, "chaos")
    reference_dir = os.path.join(workdir, "reference")
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    rng = random.Random(FLAGS.seed)
    print("command: " + " ".join(command("<workdir>", steps)[1:]), flush=True)

    t0 = time.monotonic()
    problems, last_step = [], 0
    for i in range(1, faults + 1):
        fault = one_fault(
            i, rng, last_step, workdir=workdir, chaos_dir=chaos_dir, steps=steps, faults=faults
        )
        last_step = max(last_step, fault["killed_after_step"])
        print(
            f"fault {i}: {fault['mode']:<13} resumed from step {fault['resumed_from']:>3}, "
            f"SIGKILL after step {fault['killed_after_step']:>3}"
            + (
                f" with a save in flight ({', '.join(fault['saves_in_flight'])})"
                if fault["saves_in_flight"]
                else ""
            )  # fmt: skip
            + f"; complete checkpoints left: {fault['checkpoints_left']}",
            flush=True,
        )
        if not fault["killed"]:
            problems.append(f"fault {i} did not land (exit code {fault['exit_code']})")
        if fault["resumed_from"] != fault["expected_resume"]:
            problems.append(
                f"attempt {i} resumed from {fault['resumed_from']}, but the newest complete "
                f"checkpoint was {fault['expected_resume']}"
            )
        if max(fault["checkpoints_left"], default=0) < fault["expected_resume"]:
            problems.append(f"fault {i} left no checkpoint as new as the one it resumed from")

    final_log = os.path.join(workdir, "final_attempt.log")
    expected = max(complete_steps(chaos_dir), default=0)
    process = launch(command(chaos_dir, steps), final_log)
    code = process.wait(timeout=RUN_TIMEOUT)
    print(f"final attempt: resumed from step {resumed_from(final_log)}, exit code {code}")
    if code != 0:
        problems.append(f"the final attempt failed (exit {code}); see {final_log}")
    if resumed_from(final_log) != expected:
        problems.append(f"the final attempt resumed from {resumed_from(final_log)}, not {expected}")
    reference_log = os.path.join(workdir, "reference.log")
    code = launch(command(reference_dir, steps), reference_log).wait(timeout=RUN_TIMEOUT)
    print(f"reference run (uninterrupted): exit code {code}")
    if code != 0:
        problems.append(f"the reference run failed (exit {code}); see {reference_log}")
    if os.path.exists(os.path.join(chaos_dir, "final_metrics.json")) and not code:
        problems += compare(chaos_dir, reference_dir)
    print(f"({time.monotonic() - t0:.0f} s)")
    if problems:
        print("FAILED:\n  " + "\n  ".join(problems))
        return 1
    print(f"{faults} faults survived, parameters identical")
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main)
