"""Hyperparameter sweeps: expand a sweep file into train.py runs, run them, tabulate and plot.

From the repository root:

    python -m tools.sweep --sweep=configs/sweeps/cnn_width_lr.py --sweep_dir=runs/sweeps/cnn
    python -m tools.sweep --sweep=configs/sweeps/cnn_width_lr.py:quick --sweep_dir=... --parallel=2
    python -m tools.sweep --sweep=... --sweep_dir=... --dry_run        # print the plan only

On a cluster the scheduler runs the runs: --launcher=slurm writes <sweep_dir>/slurm_array.sh (an
array job, one task per run; submit it with sbatch), --launcher=kubernetes writes
<sweep_dir>/k8s_job.yaml (an indexed Job; kubectl apply -f). Afterwards --summarize writes the
tables and plots of whatever finished (docs/sweeps.md):

    python -m tools.sweep --sweep=... --sweep_dir=... --launcher=slurm --slurm_time=02:00:00
    python -m tools.sweep --sweep=... --sweep_dir=... --launcher=kubernetes --k8s_image=... \
        --k8s_pvc=runs
    python -m tools.sweep --sweep=... --sweep_dir=... --summarize

A sweep file defines `get_sweep()` (or `get_sweep(arg)` for `--sweep=file.py:arg`); its format is
described in tools/sweep/spec.py and docs/sweeps.md.

Every run trains in its own workdir `<sweep_dir>/<field=value,...>/seed=<s>` as a subprocess
(a crash stays contained; its log is kept in `train.log` there). Finished runs (with
final_metrics.json) are skipped and unfinished ones resume from their checkpoints when the sweep
is started again. At the end: results.csv (one row per run), results.md (mean ± std over seeds
per setting) and PNG plots under <sweep_dir>/plots.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags

from runtime import cli
from tools.sweep.driver import launch_on_cluster, parse_set, run_sweep, summarize_finished
from tools.sweep.launchers import LAUNCHERS, KubernetesOptions, SlurmOptions
from tools.sweep.spec import load_sweep

FLAGS = flags.FLAGS


# Flags that only one launcher reads: giving them to another one is a mistake worth a word.
SLURM_FLAGS = {
    "slurm_job_name": "job_name",
    "slurm_partition": "partition",
    "slurm_account": "account",
    "slurm_time": "time",
    "slurm_cpus_per_task": "cpus_per_task",
    "slurm_mem": "mem",
    "slurm_gpus_per_task": "gpus_per_task",
    "slurm_max_concurrent": "max_concurrent",
    "slurm_max_array_size": "max_array_size",
    "slurm_sbatch": "sbatch_lines",
    "slurm_setup": "setup",
    "slurm_python": "python",
    "slurm_only_unfinished": "only_unfinished",
}
K8S_FLAGS = {
    "k8s_image": "image",
    "k8s_job_name": "job_name",
    "k8s_namespace": "namespace",
    "k8s_pvc": "pvc",
    "k8s_host_path": "host_path",
    "k8s_mount_path": "mount_path",
    "k8s_sweep_dir": "sweep_dir",
    "k8s_repo_dir": "repo_dir",
    "k8s_python": "python",
    "k8s_parallelism": "parallelism",
    "k8s_backoff_limit_per_index": "backoff_limit_per_index",
    "k8s_cpu": "cpu",
    "k8s_memory": "memory",
    "k8s_gpus": "gpus",
    "k8s_env": "env",
}
LOCAL_FLAGS = ("parallel", "run_timeout")


def _options(names: dict[str, str], cls: type) -> SlurmOptions | KubernetesOptions:
    """The launcher's options from its flags (whose defaults are the dataclass's own)."""
    given = {field: FLAGS[flag].value for flag, field in names.items() if FLAGS[flag].present}
    return cls(**given)


def main(argv: Sequence[str]) -> int:
    """absl entry point. A failed run does not stop the others; the exit status is 1 when any
    run of a local sweep did not finish (a scheduler or script sees the sweep failed)."""
    del argv  # cli.run rejects positional arguments
    if not FLAGS.sweep or not FLAGS.sweep_dir:
        raise cli.UserError("--sweep=configs/sweeps/<name>.py and --sweep_dir are required.")
    launcher = FLAGS.launcher
    if launcher not in LAUNCHERS:
        raise cli.UserError(f"--launcher={launcher!r} is not one of {', '.join(LAUNCHERS)}.")
    if FLAGS.summarize and (FLAGS["launcher"].present or FLAGS.dry_run):
        raise cli.UserError("--summarize runs nothing: drop --launcher and --dry_run.")
    owners = {
        **dict.fromkeys(LOCAL_FLAGS, "local"),
        **dict.fromkeys(SLURM_FLAGS, "slurm"),
        **dict.fromkeys(K8S_FLAGS, "kubernetes"),
    }
    for flag, owner in owners.items():
        if FLAGS[flag].present and (FLAGS.summarize or owner != launcher):
            where = "--summarize" if FLAGS.summarize else f"--launcher={launcher}"
            raise cli.UserError(f"--{flag} is for --launcher={owner}, not {where}; drop it.")
    try:
        sweep = load_sweep(FLAGS.sweep)
        extra = parse_set(FLAGS.set)
    except ValueError as e:
        raise cli.UserError(str(e)) from e
    swept = set(extra) & set(sweep.config_fields)
    if swept:
        raise cli.UserError(f"--set fields {sorted(swept)} are swept by {FLAGS.sweep}.")
    sweep.fixed.update(extra)
    if FLAGS.summarize:
        summarize_finished(sweep, FLAGS.sweep_dir)
        return 0
    if launcher == "local":
        summary = run_sweep(
            sweep,
            FLAGS.sweep_dir,
            parallel=FLAGS.parallel,
            dry_run=FLAGS.dry_run,
            timeout=FLAGS.run_timeout or None,
        )
        return 1 if summary.get("failed") else 0
    flag_names, options_cls = {
        "slurm": (SLURM_FLAGS, SlurmOptions),
        "kubernetes": (K8S_FLAGS, KubernetesOptions),
    }[launcher]
    options = _options(flag_names, options_cls)
    try:
        launch_on_cluster(
            sweep, FLAGS.sweep_dir, launcher, options, sets=FLAGS.set, dry_run=FLAGS.dry_run
        )
    except ValueError as e:
        raise cli.UserError(str(e)) from e
    return 0


if __name__ == "__main__":
    flags.DEFINE_string("sweep", None, "Sweep file (configs/sweeps/<name>.py[:arg]).")
    flags.DEFINE_string("sweep_dir", None, "Directory for the runs and the results.")
    flags.DEFINE_string(
        "launcher",
        "local",
        "Who runs the runs: 'local' (subprocesses here), 'slurm' (write an array job script) or "
        "'kubernetes' (write an indexed Job manifest).",
    )
    flags.DEFINE_bool(
        "summarize", False, "Only tabulate and plot the runs that finished (after a cluster job)."
    )
    flags.DEFINE_integer("parallel", 1, "local: runs to train at the same time.")
    flags.DEFINE_bool(
        "dry_run", False, "Print the planned runs (or the cluster file); run nothing."
    )
    flags.DEFINE_float("run_timeout", 0, "local: kill a run after this many seconds (0: no limit).")
    flags.DEFINE_multi_string("set", [], "Extra fixed override for every run: field=value.")
    # --launcher=slurm
    flags.DEFINE_string("slurm_job_name", SlurmOptions.job_name, "slurm: the job's name.")
    flags.DEFINE_string("slurm_partition", None, "slurm: partition (default: the cluster's).")
    flags.DEFINE_string("slurm_account", None, "slurm: account to charge.")
    flags.DEFINE_string("slurm_time", None, "slurm: time limit per run, e.g. 02:00:00.")
    flags.DEFINE_integer("slurm_cpus_per_task", None, "slurm: CPU cores per run.")
    flags.DEFINE_string("slurm_mem", None, "slurm: memory per run, e.g. 16G.")
    flags.DEFINE_integer("slurm_gpus_per_task", None, "slurm: GPUs per run.")
    flags.DEFINE_integer("slurm_max_concurrent", None, "slurm: at most this many runs at once.")
    flags.DEFINE_integer(
        "slurm_max_array_size",
        SlurmOptions.max_array_size,
        "slurm: the cluster's MaxArraySize (scontrol show config); larger sweeps become several "
        "arrays.",
    )
    flags.DEFINE_multi_string("slurm_sbatch", [], "slurm: a further sbatch option (--qos=high).")
    flags.DEFINE_multi_string(
        "slurm_setup", [], "slurm: a shell line run before train.py (source .venv/bin/activate)."
    )
    flags.DEFINE_string(
        "slurm_python",
        SlurmOptions.python,
        "slurm: Python on the compute nodes (default: this one).",
    )
    flags.DEFINE_bool(
        "slurm_only_unfinished",
        SlurmOptions.only_unfinished,
        "slurm: submit only the runs without final metrics.",
    )
    # --launcher=kubernetes
    flags.DEFINE_string("k8s_image", None, "kubernetes: container image holding the repository.")
    flags.DEFINE_string("k8s_job_name", None, "kubernetes: Job name (default: from --sweep_dir).")
    flags.DEFINE_string("k8s_namespace", None, "kubernetes: namespace (default: kubectl's).")
    flags.DEFINE_string("k8s_pvc", None, "kubernetes: PersistentVolumeClaim for the runs.")
    flags.DEFINE_string("k8s_host_path", None, "kubernetes: or a node directory for the runs.")
    flags.DEFINE_string(
        "k8s_mount_path", KubernetesOptions.mount_path, "kubernetes: where the volume is mounted."
    )
    flags.DEFINE_string(
        "k8s_sweep_dir", None, "kubernetes: the sweep dir in the pods (<mount>/<sweep_dir name>)."
    )
    flags.DEFINE_string(
        "k8s_repo_dir", KubernetesOptions.repo_dir, "kubernetes: repository in the image."
    )
    flags.DEFINE_string("k8s_python", KubernetesOptions.python, "kubernetes: Python in the image.")
    flags.DEFINE_integer("k8s_parallelism", None, "kubernetes: pods at once (default: all).")
    flags.DEFINE_integer(
        "k8s_backoff_limit_per_index",
        KubernetesOptions.backoff_limit_per_index,
        "kubernetes: retries of each run (resumes).",
    )
    flags.DEFINE_string("k8s_cpu", None, "kubernetes: CPU request per pod, e.g. 4.")
    flags.DEFINE_string("k8s_memory", None, "kubernetes: memory per pod, e.g. 16Gi.")
    flags.DEFINE_integer("k8s_gpus", None, "kubernetes: nvidia.com/gpu per pod.")
    flags.DEFINE_multi_string("k8s_env", [], "kubernetes: an environment variable NAME=value.")
    cli.run(main)
