"""A whole sweep: plan its runs, run them (or list them, or write a cluster job that runs them),
then write the tables and plots."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from tools.sweep.launchers import (
    KUBERNETES_MANIFEST,
    LAUNCHERS,
    SLURM_SCRIPT,
    KubernetesOptions,
    SlurmOptions,
    array_parts,
    index_ranges,
    kubernetes_manifest,
    sbatch_commands,
    slurm_script,
    summarize_hint,
    to_yaml,
)
from tools.sweep.plots import plot_learning_curves, plot_metric_vs_field
from tools.sweep.reporting import collect_rows, group_rows, infer_metric, write_csv, write_markdown
from tools.sweep.running import Outcome, execute
from tools.sweep.spec import Run, Sweep, jsonable, plan_runs, run_status, sanitize, train_command


def summarize(
    sweep: Sweep,
    runs: list[Run],
    sweep_dir: str,
    outcomes: list[Outcome] | None = None,
    plots: bool = True,
) -> dict[str, Any]:
    """Writes results.csv, results.md and the plots; returns their paths and the table."""
    rows = collect_rows(runs, outcomes)
    finished = [r for r in rows if r["status"] == "finished"]
    metric = sweep.metric or infer_metric(finished)
    groups = group_rows(sweep, rows)
    os.makedirs(sweep_dir, exist_ok=True)
    csv_path = os.path.join(sweep_dir, "results.csv")
    md_path = os.path.join(sweep_dir, "results.md")
    write_csv(rows, sweep.fields, csv_path)
    table = write_markdown(sweep, groups, metric, rows, md_path)
    written = []
    if plots and finished:
        plot_dir = os.path.join(sweep_dir, "plots")
        os.makedirs(plot_dir, exist_ok=True)
        path = os.path.join(plot_dir, "learning_curves.png")
        if plot_learning_curves(groups, runs, metric, path):
            written.append(path)
        for field in sweep.fields:
            path = os.path.join(plot_dir, f"{metric}_vs_{sanitize(field)}.png")
            if plot_metric_vs_field(sweep, groups, field, metric, path):
                written.append(path)
    return {
        "csv": csv_path,
        "markdown": md_path,
        "plots": written,
        "table": table,
        "metric": metric,
        "rows": rows,
    }


def write_sweep_json(sweep: Sweep, sweep_dir: str, extra_flags: Sequence[str] = ()) -> None:
    """<sweep_dir>/sweep.json: what was swept (a record for whoever reads the results later)."""
    os.makedirs(sweep_dir, exist_ok=True)
    with open(os.path.join(sweep_dir, "sweep.json"), "w") as f:
        json.dump(
            {
                "source": sweep.source,
                "config": sweep.config,
                "kind": sweep.kind,
                "settings": [jsonable(s) for s in sweep.settings],
                "bundles": {
                    axis: {label: jsonable(b) for label, b in labels.items()}
                    for axis, labels in sweep.bundles.items()
                },
                "seeds": sweep.seeds,
                "fixed": jsonable(sweep.fixed),
                "extra_flags": list(extra_flags),
            },
            f,
            indent=2,
        )


def run_sweep(
    sweep: Sweep,
    sweep_dir: str,
    parallel: int = 1,
    dry_run: bool = False,
    timeout: float | None = None,
    extra_flags: Sequence[str] = (),
    command_fn: Callable[[Sweep, Run, Sequence[str]], list[str]] = train_command,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Plans, runs (unless dry_run) and summarises a sweep; returns summarize()'s dict, with
    'runs', 'outcomes' and 'failed' (the outcomes of runs that did not finish)."""
    runs = plan_runs(sweep, sweep_dir)
    log(
        f"Sweep {sweep.source}: {len(sweep.settings)} setting(s) x {len(sweep.seeds)} seed(s) = "
        f"{len(runs)} runs in {os.path.abspath(sweep_dir)}"
    )
    if dry_run:
        for run in runs:
            command = " ".join(command_fn(sweep, run, extra_flags))
            log(f"  [{run_status(run.workdir)}] {run.name}\n      {command}")
        return {"runs": runs}
    write_sweep_json(sweep, sweep_dir, extra_flags)
    outcomes = execute(sweep, runs, parallel, timeout, extra_flags, command_fn, log)
    failed = [o for o in outcomes if o.status in ("failed", "timeout", "incomplete")]
    summary = summarize(sweep, runs, sweep_dir, outcomes)
    log(summary["table"])
    log(f"Wrote {summary['csv']}, {summary['markdown']} and {len(summary['plots'])} plot(s).")
    if failed:
        log(
            f"{len(failed)} run(s) did not finish: "
            + ", ".join(o.run.name for o in failed)
            + ". Rerun the same command to retry (finished runs are skipped)."
        )
    summary["runs"], summary["outcomes"], summary["failed"] = runs, outcomes, failed
    return summary


def parse_set(values: Sequence[str]) -> dict[str, Any]:
    """--set=field=value flags -> {field: value} (values kept as text: train.py parses them)."""
    out = {}
    for item in values:
        field, sep, value = item.partition("=")
        if not sep or not field:
            raise ValueError(f"--set={item!r}: use --set=field=value.")
        out[field.removeprefix("config.")] = value
    return out


def summarize_finished(
    sweep: Sweep, sweep_dir: str, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """The summary step after a cluster launch (or any interrupted sweep): tables and plots of
    whatever runs finished; the others are listed with their state ('partial': has checkpoints,
    'started': has only a train.log, 'new': never started). Runs nothing.

    Raises FileNotFoundError when sweep_dir does not exist (nothing was launched there)."""
    if not os.path.isdir(sweep_dir):
        raise FileNotFoundError(
            f"--sweep_dir={sweep_dir} does not exist: give the directory the sweep ran in (after "
            "a Kubernetes sweep, a copy of the pods' sweep directory)."
        )
    runs = plan_runs(sweep, sweep_dir)
    summary = summarize(sweep, runs, sweep_dir)
    log(summary["table"])
    done = sum(row["status"] == "finished" for row in summary["rows"])
    log(
        f"{done}/{len(runs)} run(s) finished. Wrote {summary['csv']}, {summary['markdown']} and "
        f"{len(summary['plots'])} plot(s)."
    )
    summary["runs"] = runs
    return summary


def launch_on_cluster(
    sweep: Sweep,
    sweep_dir: str,
    launcher: str,
    options: SlurmOptions | KubernetesOptions,
    extra_flags: Sequence[str] = (),
    sets: Sequence[str] = (),
    dry_run: bool = False,
    log: Callable[[str], None] = print,
) -> str | None:
    """Writes the SLURM array script or the Kubernetes Job manifest (and sweep.json) into
    sweep_dir and says how to submit it; with dry_run, prints the file instead of writing.

    Returns the written file's path (None for a dry run, or when every run has finished).
    Raises ValueError for an unknown launcher or an invalid option."""
    runs = plan_runs(sweep, sweep_dir)
    if launcher == "slurm":
        if not isinstance(options, SlurmOptions):
            raise ValueError("--launcher=slurm needs SlurmOptions.")
        text, todo = slurm_script(sweep, sweep_dir, options, extra_flags, sets)
        path = os.path.join(os.path.abspath(sweep_dir), SLURM_SCRIPT)
        if not todo:
            log("Every run has finished; nothing to submit. Summarize with:")
            log(f"  {summarize_hint(sweep, sweep_dir, sets)}")
            return None
        how = "\n  ".join(sbatch_commands(path, array_parts(todo, options)))
        what = f"array tasks {index_ranges(todo)} ({len(todo)} of {len(runs)} runs)"
    elif launcher == "kubernetes":
        if not isinstance(options, KubernetesOptions):
            raise ValueError("--launcher=kubernetes needs KubernetesOptions.")
        manifest = kubernetes_manifest(sweep, sweep_dir, options, extra_flags)
        text = to_yaml(manifest)
        path = os.path.join(os.path.abspath(sweep_dir), KUBERNETES_MANIFEST)
        how = f"kubectl apply -f {path}"
        what = f"an indexed Job of {len(runs)} completions, job name {manifest['metadata']['name']}"
    else:
        raise ValueError(f"--launcher={launcher!r} is not one of {', '.join(LAUNCHERS)}.")
    header = (
        f"Sweep {sweep.source}: {len(sweep.settings)} setting(s) x {len(sweep.seeds)} seed(s) = "
        f"{len(runs)} runs in {os.path.abspath(sweep_dir)}"
    )
    if dry_run:
        # Standard output is then exactly the file (`... --dry_run > job.yaml` is submittable);
        # the plan's summary goes to standard error.
        print(header, file=sys.stderr)
        log(text)
        return None
    log(header)
    write_sweep_json(sweep, sweep_dir, extra_flags)
    if launcher == "slurm":  # sbatch does not create the directory of --output
        os.makedirs(os.path.join(sweep_dir, "slurm"), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    if launcher == "slurm":
        os.chmod(path, 0o755)
    log(f"Wrote {path}: {what}.")
    log(f"Submit it with:\n  {how}")
    log(f"Afterwards, tabulate whatever finished:\n  {summarize_hint(sweep, sweep_dir, sets)}")
    return path
