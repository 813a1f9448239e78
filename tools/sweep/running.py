"""Running a sweep's runs: each one a train.py subprocess in its own workdir, `parallel` at once.

A crash stays contained (its output is kept in <workdir>/train.log and the sweep goes on);
finished runs (with final_metrics.json) are skipped, unfinished ones resume from their own
checkpoints (train.py does that by itself).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Sequence

from tools.sweep.reporting import infer_metric, read_final_metrics
from tools.sweep.spec import REPO_ROOT, Run, Sweep, is_finished, jsonable, run_status, train_command


@dataclasses.dataclass
class Outcome:
    """What happened to one run in this invocation."""

    run: Run
    status: str  # 'skipped', 'finished', 'failed', 'timeout', 'incomplete'
    seconds: float = 0.0
    returncode: int | None = None


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def execute_run(command: list[str], run: Run, timeout: float | None = None) -> Outcome:
    """Runs one training subprocess, logging to <workdir>/train.log; never raises on failure."""
    os.makedirs(run.workdir, exist_ok=True)
    with open(os.path.join(run.workdir, "sweep_run.json"), "w") as f:
        json.dump(
            {
                "name": run.name,
                "setting": jsonable(run.setting),
                "seed": run.seed,
                "command": command,
            },
            f,
            indent=2,
        )
    log_path = os.path.join(run.workdir, "train.log")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    start = time.perf_counter()
    with open(log_path, "a") as log:  # append: a resumed run keeps the earlier attempts' log
        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n")
        log.flush()
        try:
            proc = subprocess.run(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO_ROOT,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            log.write(f"=== killed after the --run_timeout of {timeout} s\n")
            return Outcome(run, "timeout", time.perf_counter() - start)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        return Outcome(run, "failed", seconds, proc.returncode)
    # Exit 0 without final metrics: preempted (SIGTERM); the next sweep resumes it.
    return Outcome(run, "finished" if is_finished(run.workdir) else "incomplete", seconds, 0)


def execute(
    sweep: Sweep,
    runs: list[Run],
    parallel: int = 1,
    timeout: float | None = None,
    extra_flags: Sequence[str] = (),
    command_fn: Callable[[Sweep, Run, Sequence[str]], list[str]] = train_command,
    log: Callable[[str], None] = print,
) -> list[Outcome]:
    """Runs every unfinished run, `parallel` at a time; finished ones are skipped."""
    todo = [r for r in runs if not is_finished(r.workdir)]
    outcomes = {id(r): Outcome(r, "skipped") for r in runs if is_finished(r.workdir)}
    if outcomes:
        log(f"Skipping {len(outcomes)} finished run(s).")
    lock, counter = threading.Lock(), itertools.count(1)

    def work(run: Run) -> Outcome:
        with lock:
            i = next(counter)
            resume = " (resuming)" if run_status(run.workdir) == "partial" else ""
            log(f"[{i}/{len(todo)}] start {run.name}{resume}")
        outcome = execute_run(command_fn(sweep, run, extra_flags), run, timeout)
        with lock:
            line = f"[{i}/{len(todo)}] {outcome.status} {run.name} in {outcome.seconds:.0f} s"
            if outcome.status == "finished":
                metrics = read_final_metrics(run.workdir)
                key = sweep.metric or infer_metric([metrics])
                if key in metrics:
                    line += f": {key}={metrics[key]:.4f}"
            elif outcome.status != "skipped":
                log_path = os.path.join(run.workdir, "train.log")
                code = f" (exit {outcome.returncode})" if outcome.returncode is not None else ""
                line += f"{code}; log: {log_path}\n{_tail(log_path)}"
            log(line)
        return outcome

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        for outcome in pool.map(work, todo):
            outcomes[id(outcome.run)] = outcome
    return [outcomes[id(r)] for r in runs]
