"""Two processes (4 CPU devices each) on 127.0.0.1 train exactly as one process with 8 devices.

Both launch `python train.py` as docs/multihost.md tells a user to, with --coordinator_address,
--num_processes and --process_id; JAX's CPU collectives between the processes are Gloo (the
default of jax_cpu_collectives_implementation). The model's parameters are sharded over all 8
devices (fsdp=8), so every step and every checkpoint needs both processes.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)

import sharded_driver  # noqa: E402

from runtime import metrics_writer  # noqa: E402

TIMEOUT_S = 300  # minutes when the machine is shared; seconds when it is not
# The tiny MLP of tests/sharded_driver.py, as command-line overrides of the default config.
FLAGS = [
    "--config=configs/fashion_mnist_mlp.py",
    "--config.num_train_steps=3",
    "--config.batch_size=32",
    "--config.model.features=(64,32)",
    "--config.optimizer=sgd",
    "--config.learning_rate=0.1",
    "--config.warmup_steps=0",
    "--config.log_every_steps=1",
    "--config.eval_every_steps=10000",
    "--config.checkpoint_every_steps=10000",
    "--config.eval_batch_size=1000",
]


def free_port() -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], log_path: str) -> subprocess.Popen:
    """Starts `python train.py <FLAGS> <args>` in the repository, output to log_path."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # device counts come from --cpu_devices
    with open(log_path, "w") as log:
        return subprocess.Popen(
            [sys.executable, "train.py", *FLAGS, *args],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def wait_all(procs: dict[str, subprocess.Popen], logs: dict[str, str], timeout: float) -> None:
    """Waits for every process; on a failure or the deadline kills the others and fails."""
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs.values()):
            failed = [n for n, p in procs.items() if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    bad = {n: p.returncode for n, p in procs.items() if p.returncode != 0}
    if bad:
        tails = "\n".join(f"--- {n} (exit {bad[n]}):\n{_tail(logs[n])}" for n in bad)
        pytest.fail(f"processes failed or passed the {timeout}s limit:\n{tails}")


def _tail(path: str, chars: int = 3000) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-chars:]


@pytest.mark.parametrize("steps_per_dispatch", [1, 2])
def test_two_processes_train_like_one(tmp_path, fashion_mnist_ready, steps_per_dispatch) -> None:
    """Same per-step losses (process 0's metrics.jsonl) and final parameters as 1 x 8 devices;
    with 2 steps per call, each process feeds its slice of stacked batches (calls of 2 + 1)."""
    multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
    coordinator = f"127.0.0.1:{free_port()}"
    fsdp = ["--config.mesh_shape.data=1", "--config.mesh_shape.fsdp=-1"]
    k = steps_per_dispatch
    fsdp += [f"--config.steps_per_dispatch={k}", f"--config.log_every_steps={k}"]
    commands = {
        f"process {i}": [
            f"--workdir={multi}",  # the same directory: Orbax saves collectively
            *fsdp,
            "--cpu_devices=4",
            f"--coordinator_address={coordinator}",
            "--num_processes=2",
            f"--process_id={i}",
        ]
        for i in range(2)
    }
    commands["one process"] = [f"--workdir={single}", *fsdp, "--cpu_devices=8"]
    logs = {name: str(tmp_path / f"{name.replace(' ', '_')}.log") for name in commands}
    procs = {name: launch(args, logs[name]) for name, args in commands.items()}
    wait_all(procs, logs, TIMEOUT_S)

    # (A process alone has 4 devices: the fsdp=8 mesh exists only if the two joined up.)
    sharded_driver.assert_same_run(multi, single, "2 processes x 4 devices")
    steps = [row["step"] for row in metrics_writer.read_jsonl(os.path.join(multi, "metrics.jsonl"))]
    assert steps.count(k) == 1, "only process 0 writes metrics"
    assert os.path.exists(os.path.join(multi, "final_metrics.json"))
