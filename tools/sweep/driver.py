"""A whole sweep: plan its runs, run them (or list them), then write the tables and plots."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

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
    """Plans, runs (unless dry_run) and summarises a sweep; returns summarize()'s dict."""
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
    os.makedirs(sweep_dir, exist_ok=True)
    with open(os.path.join(sweep_dir, "sweep.json"), "w") as f:
        json.dump(
            {
                "source": sweep.source,
                "config": sweep.config,
                "kind": sweep.kind,
                "settings": [jsonable(s) for s in sweep.settings],
                "seeds": sweep.seeds,
                "fixed": jsonable(sweep.fixed),
                "extra_flags": list(extra_flags),
            },
            f,
            indent=2,
        )
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
    summary["runs"], summary["outcomes"] = runs, outcomes
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
