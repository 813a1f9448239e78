"""Sweeps on a cluster: a SLURM array job script or a Kubernetes indexed Job, one task per run.

Locally, running.py starts each run as a subprocess; on a cluster the scheduler starts them.
Both launchers plan the same runs as the local driver: task i trains run i of
`plan_runs(sweep, sweep_dir)` in the same workdir with the same train.py command, picked by the
task's index (`SLURM_ARRAY_TASK_ID` in an array job, `JOB_COMPLETION_INDEX` in an indexed Job).
A task skips a finished run (final_metrics.json) and lets train.py resume an unfinished one
from its checkpoints, so submitting again retries only what did not finish. Afterwards
`python -m tools.sweep ... --summarize` (driver.summarize_finished) writes the tables and plots
of whatever finished and lists the rest.

The task body is POSIX sh (no bash needed in a slim container image); the Kubernetes manifest
is written with PyYAML (a dependency of flax and ml_collections, so always present).

SLURM: https://slurm.schedmd.com/job_array.html and https://slurm.schedmd.com/sbatch.html;
Kubernetes: https://kubernetes.io/docs/concepts/workloads/controllers/job/#completion-mode and
#backoff-limit-per-index (Kubernetes 1.29 or later).
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import re
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from tools.sweep.spec import (
    REPO_ROOT,
    Run,
    Sweep,
    is_finished,
    jsonable,
    plan_runs,
    train_command,
)

LAUNCHERS = ("local", "slurm", "kubernetes")
SLURM_SCRIPT = "slurm_array.sh"
KUBERNETES_MANIFEST = "k8s_job.yaml"
# Linux's limit on one argument of a command (MAX_ARG_STRLEN, 32 pages): the pods run the task
# script as `sh -c <script>`, so a longer script would fail at exec with E2BIG.
MAX_ARGUMENT_BYTES = 128 * 1024


def index_ranges(indices: Sequence[int]) -> str:
    """Compact SLURM array syntax: [0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    parts: list[str] = []
    ordered = sorted(set(indices))
    start = prev = None
    for i in [*ordered, None]:
        if start is not None and (i is None or i != prev + 1):
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if i is not None and start is None:
            start = i
        prev = i
    return ",".join(parts)


def task_script(
    commands: Sequence[tuple[Run, list[str]]],
    index_var: str,
    repo_root: str,
    setup: Sequence[str] = (),
) -> str:
    """The POSIX sh body of one array task: picks run number `$<index_var>` and trains it.

    Like running.execute_run: writes sweep_run.json (the run's name, setting, seed and index),
    appends the command and its output to the run's train.log, skips a finished run; a failing
    run exits with train.py's status after printing the tail of its log (it lands in the
    scheduler's own log)."""
    last = len(commands) - 1
    lines = [
        f"cd {shlex.quote(repo_root)} || exit 1",
        'export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"',
        *setup,  # before `set -u`: environment scripts (module, activate) read unset variables
        "set -eu",
        f'index="${{{index_var}:?is not set: it picks the run (0-{last}) this task trains}}"',
        # SLURM arrays larger than MaxArraySize are submitted in parts, each with its offset.
        "index=$((index + ${SWEEP_INDEX_OFFSET:-0}))",
        'case "$index" in',
    ]
    for i, (run, command) in enumerate(commands):
        # The command itself is logged to train.log (as the local driver does).
        record = {"name": run.name, "setting": jsonable(run.setting), "seed": run.seed, "index": i}
        lines += [
            f"  {i})",
            f"    workdir={shlex.quote(run.workdir)}",
            f"    record={shlex.quote(json.dumps(record))}",
            f"    set -- {shlex.join(command)}",
            "    ;;",
        ]
    lines += [
        "  *)",
        f'    echo "ERROR: {index_var}=$index is not a run of this sweep (0-{last})." >&2',
        "    exit 2",
        "    ;;",
        "esac",
        'if [ -f "$workdir/final_metrics.json" ]; then',
        '  echo "run $index finished already ($workdir); nothing to do."',
        "  exit 0",
        "fi",
        'mkdir -p "$workdir"',
        'printf "%s\\n" "$record" > "$workdir/sweep_run.json"',
        'echo "=== $(date \'+%Y-%m-%d %H:%M:%S\') $*" >> "$workdir/train.log"',
        'echo "run $index: training in $workdir (output: $workdir/train.log)"',
        "status=0",
        '"$@" >> "$workdir/train.log" 2>&1 || status=$?',
        'if [ "$status" -ne 0 ]; then',
        '  tail -n 20 "$workdir/train.log" >&2',
        '  echo "ERROR: run $index exited with status $status; log: $workdir/train.log" >&2',
        'elif [ ! -f "$workdir/final_metrics.json" ]; then',
        '  echo "run $index stopped before its end (preempted); submit again to resume it."',
        "fi",
        'exit "$status"',
    ]
    return "\n".join(lines) + "\n"


def summarize_hint(sweep: Sweep, sweep_dir: str, sets: Sequence[str] = ()) -> str:
    """The command that tabulates the sweep afterwards."""
    args = [f"--sweep={sweep.source}", f"--sweep_dir={sweep_dir}", *[f"--set={s}" for s in sets]]
    return f"python -m tools.sweep {shlex.join(args)} --summarize"


# ----------------------------------------------------------------------------- SLURM

_SLURM_TIME = re.compile(r"^(\d+-)?\d+(:\d+){0,2}$")  # sbatch --time formats
_SLURM_MEM = re.compile(r"^\d+[KMGT]?$")


@dataclasses.dataclass
class SlurmOptions:
    """Resources of each array task and how the task starts; None leaves the cluster default.

    `sbatch_lines` are further sbatch options, one per #SBATCH line ('--qos=high');
    `setup` are shell lines run before train.py ('source .venv/bin/activate', 'module load
    cuda'); `python` is the interpreter on the compute nodes (default: this one, for a shared
    filesystem); `only_unfinished` submits only the runs without final metrics."""

    job_name: str = "jaxlab-sweep"
    partition: str | None = None
    account: str | None = None
    time: str | None = None  # [days-]hours:minutes:seconds, e.g. '02:00:00'
    cpus_per_task: int | None = None
    mem: str | None = None  # per node, e.g. '16G'
    gpus_per_task: int | None = None
    max_concurrent: int | None = None  # the array's '%N': at most N tasks at once
    # SLURM refuses an array task id >= MaxArraySize (1001 unless the cluster's slurm.conf says
    # otherwise): larger sweeps are submitted as several arrays, each with an index offset.
    max_array_size: int = 1001
    sbatch_lines: Sequence[str] = ()
    setup: Sequence[str] = ()
    python: str = sys.executable
    only_unfinished: bool = True

    def check(self) -> None:
        """Raises ValueError naming the flag of the first invalid option and the fix."""
        if not self.job_name or any(c.isspace() for c in self.job_name):
            raise ValueError(f"--slurm_job_name={self.job_name!r}: give a name without spaces.")
        if self.time is not None and not _SLURM_TIME.match(self.time):
            raise ValueError(
                f"--slurm_time={self.time!r}: use sbatch's [days-]hours:minutes:seconds (e.g. "
                "02:00:00), minutes (120) or days-hours (1-12)."
            )
        if self.mem is not None and not _SLURM_MEM.match(self.mem):
            raise ValueError(f"--slurm_mem={self.mem!r}: use a size such as 16G or 4000M.")
        for name in ("cpus_per_task", "gpus_per_task", "max_concurrent", "max_array_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--slurm_{name}={value}: give a positive number (or omit it).")
        for line in self.sbatch_lines:
            if not line.startswith("--") or "\n" in line:
                raise ValueError(
                    f"--slurm_sbatch={line!r}: give one sbatch option such as --qos=high."
                )


def slurm_script(
    sweep: Sweep,
    sweep_dir: str,
    options: SlurmOptions,
    extra_flags: Sequence[str] = (),
    sets: Sequence[str] = (),
) -> tuple[str, list[int]]:
    """The array job script and the run indices it submits (all, or the unfinished ones).

    Run i is array task i (`#SBATCH --array=0-N` or the unfinished subset); its output goes to
    <sweep_dir>/slurm/<job>_<task>.out besides the run's train.log. Raises ValueError for an
    invalid option."""
    options.check()
    sweep_dir = os.path.abspath(sweep_dir)
    runs = plan_runs(sweep, sweep_dir)
    commands = [(r, train_command(sweep, r, extra_flags, python=options.python)) for r in runs]
    todo = [
        i for i, r in enumerate(runs) if not (options.only_unfinished and is_finished(r.workdir))
    ]
    parts = array_parts(todo, options)
    directives = {
        "job-name": options.job_name,
        "array": parts[0][1] if parts else "",
        "output": os.path.join(sweep_dir, "slurm", "%A_%a.out"),
        "partition": options.partition,
        "account": options.account,
        "time": options.time,
        "cpus-per-task": options.cpus_per_task,
        "mem": options.mem,
        "gpus-per-task": options.gpus_per_task,
    }
    script_path = os.path.join(sweep_dir, SLURM_SCRIPT)
    header = [
        "#!/bin/bash",
        f"# The sweep {sweep.source}: {len(runs)} runs, one array task each (run i = task i).",
        "# Written by `python -m tools.sweep --launcher=slurm`. Submit it with",
        f"#   sbatch {shlex.quote(script_path)}",
        "# Task i trains run i in its own workdir; a finished run is skipped and an unfinished",
        "# one resumes from its checkpoints, so submitting again retries what did not finish.",
        "# Afterwards (whatever finished is tabulated, the rest listed):",
        f"#   {summarize_hint(sweep, sweep_dir, sets)}",
    ]
    if len(parts) > 1:
        header += [
            f"# {len(todo)} tasks are more than one array may hold (task ids below "
            f"--slurm_max_array_size={options.max_array_size}): submit all of",
            *[f"#   {command}" for command in sbatch_commands(script_path, parts)],
        ]
    header += [f"#SBATCH --{k}={v}" for k, v in directives.items() if v is not None]
    header += [f"#SBATCH {line}" for line in options.sbatch_lines]
    body = task_script(commands, "SLURM_ARRAY_TASK_ID", REPO_ROOT, options.setup)
    return "\n".join(header) + "\n\n" + body, todo


def array_parts(todo: Sequence[int], options: SlurmOptions) -> list[tuple[int, str]]:
    """(index offset, --array value) of each array to submit: run indices `todo` cut so that
    every task id (run index - offset) is below `options.max_array_size`."""
    size = options.max_array_size
    parts = []
    for offset in sorted({i // size * size for i in todo}):
        array = index_ranges([i - offset for i in todo if offset <= i < offset + size])
        if options.max_concurrent:
            array += f"%{options.max_concurrent}"
        parts.append((offset, array))
    return parts


def sbatch_commands(script_path: str, parts: Sequence[tuple[int, str]]) -> list[str]:
    """The sbatch command of each part (the first is the script's own #SBATCH --array)."""
    quoted = shlex.quote(script_path)
    return [f"sbatch {quoted}" if not offset else
            f"sbatch --array={array} --export=ALL,SWEEP_INDEX_OFFSET={offset} {quoted}"
            for offset, array in parts]  # fmt: skip


# ----------------------------------------------------------------------------- Kubernetes

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^\d+(\.\d+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")


def default_job_name(sweep_dir: str) -> str:
    """A DNS-1123 name from the sweep directory: 'runs/GPT_ablation' -> 'sweep-gpt-ablation'."""
    base = re.sub(r"[^a-z0-9]+", "-", os.path.basename(os.path.abspath(sweep_dir)).lower())
    return ("sweep-" + base.strip("-"))[:52].rstrip("-")


@dataclasses.dataclass
class KubernetesOptions:
    """The indexed Job's container, volume and resources.

    The pods see the sweep directory at `sweep_dir` (default: <mount_path>/<the local sweep
    directory's name>), on the PersistentVolumeClaim `pvc` or the node's `host_path` (exactly
    one) mounted at `mount_path`; the repository is at `repo_dir` in the `image`, run by
    `python`. `parallelism`: pods at once (None: every run at once); `backoff_limit_per_index`:
    retries of each run (a pod evicted mid-run resumes from its checkpoint); `env`: extra
    NAME=value variables."""

    image: str = ""
    job_name: str | None = None
    namespace: str | None = None
    pvc: str | None = None
    host_path: str | None = None
    mount_path: str = "/runs"
    sweep_dir: str | None = None
    repo_dir: str = "/workspace/jaxlab"
    python: str = "python"
    parallelism: int | None = None
    backoff_limit_per_index: int = 1
    cpu: str | None = None  # e.g. '4' or '3500m'
    memory: str | None = None  # e.g. '16Gi'
    gpus: int | None = None  # nvidia.com/gpu per pod
    env: Sequence[str] = ()

    def check(self) -> None:
        """Raises ValueError naming the flag of the first invalid option and the fix."""
        if not self.image:
            raise ValueError("--k8s_image is required: the container image holding the repository.")
        if (self.pvc is None) == (self.host_path is None):
            raise ValueError(
                "Give exactly one of --k8s_pvc (a PersistentVolumeClaim) and --k8s_host_path (a "
                "directory on the node): the runs' workdirs must outlive their pods."
            )
        if self.job_name is not None and not (
            _DNS_LABEL.match(self.job_name) and len(self.job_name) <= 52
        ):
            raise ValueError(
                f"--k8s_job_name={self.job_name!r}: use at most 52 lowercase letters, digits "
                "and '-' (a DNS label; Kubernetes appends the index to pod names)."
            )
        for flag, path in [("k8s_mount_path", self.mount_path), ("k8s_repo_dir", self.repo_dir)]:
            if not posixpath.isabs(path):
                raise ValueError(f"--{flag}={path!r}: give an absolute path inside the container.")
        if self.sweep_dir is not None and not _is_under(self.sweep_dir, self.mount_path):
            raise ValueError(
                f"--k8s_sweep_dir={self.sweep_dir!r} is not under --k8s_mount_path="
                f"{self.mount_path!r}: the runs would be lost with their pods."
            )
        for flag, value in [("k8s_parallelism", self.parallelism), ("k8s_gpus", self.gpus)]:
            if value is not None and value < 1:
                raise ValueError(f"--{flag}={value}: give a positive number (or omit it).")
        if self.backoff_limit_per_index < 0:
            raise ValueError(f"--k8s_backoff_limit_per_index={self.backoff_limit_per_index}: >= 0.")
        for flag, value in [("k8s_cpu", self.cpu), ("k8s_memory", self.memory)]:
            if value is not None and not _QUANTITY.match(value):
                raise ValueError(
                    f"--{flag}={value!r}: use a Kubernetes quantity such as 4 or 16Gi."
                )
        for item in self.env:
            name, sep, _ = item.partition("=")
            if not sep or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
                raise ValueError(f"--k8s_env={item!r}: use NAME=value.")


def _is_under(path: str, root: str) -> bool:
    path, root = posixpath.normpath(path), posixpath.normpath(root)
    return posixpath.isabs(path) and (path == root or path.startswith(root.rstrip("/") + "/"))


def kubernetes_manifest(
    sweep: Sweep, sweep_dir: str, options: KubernetesOptions, extra_flags: Sequence[str] = ()
) -> dict[str, Any]:
    """A batch/v1 Job (completionMode Indexed, completions = number of runs) as a dict.

    Pod i runs the task script with JOB_COMPLETION_INDEX=i (set by Kubernetes): run i of the
    sweep, planned under the pods' sweep directory. Raises ValueError for an invalid option or
    a base config outside the repository."""
    options.check()
    pod_sweep_dir = options.sweep_dir or posixpath.join(
        options.mount_path, os.path.basename(os.path.abspath(sweep_dir))
    )
    runs = plan_runs(sweep, pod_sweep_dir)
    commands = [
        (r, train_command(sweep, r, extra_flags, python=options.python, repo_root=options.repo_dir))
        for r in runs
    ]
    script = task_script(commands, "JOB_COMPLETION_INDEX", options.repo_dir)
    if len(script.encode()) > MAX_ARGUMENT_BYTES:
        raise ValueError(
            f"The pods' task script for {len(runs)} runs is {len(script.encode()):,} bytes, more "
            f"than one command-line argument may hold on Linux ({MAX_ARGUMENT_BYTES:,}): the "
            "pods would fail to start. Split the sweep into several sweep files (or runs with "
            "--set), each under about 250 runs."
        )
    name = options.job_name or default_job_name(sweep_dir)
    labels = {"app.kubernetes.io/name": "jaxlab-sweep", "jaxlab/sweep": name}
    metadata: dict[str, Any] = {"name": name, "labels": labels}
    if options.namespace:
        metadata["namespace"] = options.namespace
    requests = {k: v for k, v in [("cpu", options.cpu), ("memory", options.memory)] if v}
    limits: dict[str, Any] = {"memory": options.memory} if options.memory else {}
    if options.gpus:
        limits["nvidia.com/gpu"] = options.gpus
    # (TF_CPP_MIN_LOG_LEVEL is set by the task script itself, as for SLURM.)
    env = [dict(zip(("name", "value"), e.split("=", 1), strict=True)) for e in options.env]
    container: dict[str, Any] = {
        "name": "train",
        "image": options.image,
        "workingDir": options.repo_dir,
        "command": ["/bin/sh", "-c", script],
        "env": env,
        "volumeMounts": [{"name": "runs", "mountPath": options.mount_path}],
    }
    if requests or limits:
        container["resources"] = {
            k: v for k, v in [("requests", requests), ("limits", limits)] if v
        }
    if options.pvc:
        volume = {"name": "runs", "persistentVolumeClaim": {"claimName": options.pvc}}
    else:
        volume = {
            "name": "runs",
            "hostPath": {"path": options.host_path, "type": "DirectoryOrCreate"},
        }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {
            "completionMode": "Indexed",
            "completions": len(runs),
            "parallelism": options.parallelism or len(runs),
            # A failing run uses up its own retries only; the other indices go on (the local
            # driver's containment). Needs restartPolicy Never.
            "backoffLimitPerIndex": options.backoff_limit_per_index,
            "template": {
                "metadata": {"labels": dict(labels)},  # a copy: no YAML anchor
                "spec": {"restartPolicy": "Never", "containers": [container], "volumes": [volume]},
            },
        },
    }


def to_yaml(manifest: dict[str, Any]) -> str:
    """YAML text with PyYAML; multi-line strings (the task script) as literal '|' blocks."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, represent_str)
    return yaml.dump(manifest, Dumper=Dumper, sort_keys=False, width=1000)
