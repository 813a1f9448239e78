"""The README's commands run as written (with the run shrunk to a few steps).

Every `.venv/bin/python ...` command in README.md's bash blocks is run from the repository root,
in order (sample.py uses the run trained before it), with its `runs/` and `data/` folders under
a temporary folder and, for train.py, overrides appended that shrink the run to two steps of a
small model.
Optional arguments shown in brackets are passed too.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHRINK = [
    "--config.num_train_steps=2", "--config.log_every_steps=1", "--config.eval_every_steps=2",
    "--config.checkpoint_every_steps=2", "--config.steps_per_dispatch=1",
    "--config.async_checkpointing=False",
]  # fmt: skip
SHRINK_LM = [
    "--config.model.num_layers=1", "--config.model.num_heads=2", "--config.model.embed_dim=32",
    "--config.batch_size=8", "--config.eval_batch_size=8", "--config.eval_steps=1",
    "--config.sample_every_eval=False",
]  # fmt: skip
SHRINK_IMAGES = ["--config.batch_size=32", "--config.eval_batch_size=1000"]


def readme_commands() -> list[list[str]]:
    """The `.venv/bin/python` commands of README.md's bash blocks, as argument lists."""
    with open(os.path.join(REPO, "README.md")) as f:
        blocks = re.findall(r"```bash\n(.*?)```", f.read(), flags=re.S)
    commands = []
    for block in blocks:
        for command in block.replace("\\\n", " ").splitlines():
            command = command.split("  #")[0].strip()
            if command.startswith(".venv/bin/python ") and " -m pytest" not in command:
                command = re.sub(r"\[([^\]]*)\]", r"\1", command)  # optional arguments: pass them
                commands.append(shlex.split(command))
    return commands


def _task(config_path: str) -> str:
    """The task of a config file given as `--config=configs/NAME.py`."""
    spec = importlib.util.spec_from_file_location("readme_config", os.path.join(REPO, config_path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config().task


def _adapted(command: list[str], runs: str) -> list[str]:
    args = [sys.executable] + [
        a.replace("runs/", runs + "/").replace("data/", runs + "/data/") for a in command[1:]
    ]
    if command[1] == "train.py":
        config = next(a for a in command if a.startswith("--config="))
        lm = _task(config.split("=", 1)[1]) == "lm"
        args += SHRINK + (SHRINK_LM if lm else SHRINK_IMAGES)
        if "--config.mesh_shape.fsdp=8" in command:
            args.append("--cpu_devices=8")  # the 8 devices the command expects
        if "gpt2" in config:
            args.append("--config.model.block_size=64")
    return args


def test_the_readme_commands_run(tmp_path, fashion_mnist_ready):
    commands = readme_commands()
    scripts = [c[1] for c in commands]
    assert "train.py" in scripts and "sample.py" in scripts, commands
    runs = str(tmp_path / "runs")
    for command in commands:
        args = _adapted(command, runs)
        result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600,
                                env={**os.environ, "JAX_PLATFORMS": "cpu"})  # fmt: skip
        shown = " ".join(command)
        assert result.returncode == 0, f"{shown}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        if command[1] == "sample.py":
            assert result.stdout.count("---------- sample") == 3, shown
