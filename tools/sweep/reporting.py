"""A sweep's results: final metrics and curves of its runs, results.csv and results.md.

results.csv has one row per run (setting, seed, status, goodput, the git commit it was trained
at, every scalar of final_metrics.json); results.md has one line per setting with the mean ±
sample standard deviation over its seeds, the mean goodput and the commits of its runs.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from tools.sweep.spec import Run, Sweep, format_value, run_status, setting_name

if TYPE_CHECKING:
    from tools.sweep.running import Outcome


def read_final_metrics(workdir: str) -> dict[str, Any]:
    """final_metrics.json of a run ({} if it has none)."""
    path = os.path.join(workdir, "final_metrics.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def read_curves(workdir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{metric name ('train/loss', 'test/accuracy'): (steps, values)} from metrics.jsonl."""
    path = os.path.join(workdir, "metrics.jsonl")
    series: dict[str, dict[int, float]] = {}
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut off by a kill
            step = int(record.pop("step"))
            for name, value in record.items():
                series.setdefault(name, {})[step] = float(value)  # a resumed step: last one wins
    return {
        name: (np.array(sorted(points)), np.array([points[s] for s in sorted(points)]))
        for name, points in series.items()
    }


def infer_metric(metrics: list[dict[str, Any]]) -> str:
    """test_accuracy for classifiers, val_loss for language models."""
    keys = set().union(*metrics) if metrics else set()
    for candidate in ("test_accuracy", "val_loss", "test_loss"):
        if candidate in keys:
            return candidate
    return "test_accuracy"


def higher_is_better(metric: str) -> bool:
    """Accuracy-like metrics are maximised, losses (and perplexity, bits) minimised."""
    return any(w in metric for w in ("accuracy", "f1", "auc", "precision", "recall"))


# Run facts shown right after the status (from final_metrics.json: runtime/provenance.py).
RUN_FACTS = ("goodput", "git_commit", "git_dirty")


def collect_rows(runs: list[Run], outcomes: list[Outcome] | None = None) -> list[dict[str, Any]]:
    """One row per run: its setting, seed, status and scalar final metrics, with 'goodput' (the
    share of the run's wall time spent training, over its attempts) and 'git_commit'."""
    status = {id(o.run): o.status for o in outcomes or []}
    rows = []
    for run in runs:
        metrics = read_final_metrics(run.workdir)
        state = "finished" if metrics else status.get(id(run)) or run_status(run.workdir)
        row: dict[str, Any] = {"run": run.name, **run.setting, "seed": run.seed, "status": state}
        # Metrics never overwrite the setting's own columns (final_metrics.json has 'model').
        row.update(
            {k: v for k, v in metrics.items() if isinstance(v, int | float | str) and k not in row}
        )
        if isinstance(metrics.get("goodput"), dict) and "goodput" in metrics["goodput"]:
            row["goodput"] = metrics["goodput"]["goodput"]
        rows.append(row)
    return rows


def write_csv(rows: list[dict[str, Any]], fields: list[str], path: str) -> None:
    """results.csv: the swept fields, seed, status, goodput and commit first, then every metric
    column."""
    present = {k for row in rows for k in row}
    first = ["run", *fields, "seed", "status", *(k for k in RUN_FACTS if k in present)]
    rest = sorted({k for row in rows for k in row} - set(first))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=first + rest, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: format_value(v) if k in fields else v for k, v in row.items()})


@dataclasses.dataclass
class Group:
    """The runs of one setting (all its seeds) and the statistics of their metrics."""

    setting: dict[str, Any]
    rows: list[dict[str, Any]]

    def values(self, metric: str) -> np.ndarray:
        """The metric over the setting's finished seeds."""
        return np.array(
            [float(r[metric]) for r in self.rows if isinstance(r.get(metric), int | float)]
        )

    def mean_std(self, metric: str) -> tuple[float, float, int]:
        """(mean, sample std (ddof=1; 0 for one seed), number of seeds) of a metric."""
        v = self.values(metric)
        if len(v) == 0:
            return math.nan, math.nan, 0
        return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def group_rows(sweep: Sweep, rows: list[dict[str, Any]]) -> list[Group]:
    """Rows grouped by setting, in the sweep's order."""
    by_name = {setting_name(s): Group(s, []) for s in sweep.settings}
    for row in rows:
        key = setting_name({f: row[f] for f in sweep.fields if f in row})
        if key in by_name:
            by_name[key].rows.append(row)
    return list(by_name.values())


def report_metrics(metric: str, rows: list[dict[str, Any]]) -> list[str]:
    """The key metric, then a few companions that exist in the results."""
    extra = {
        "test_accuracy": ["test_loss", "test_f1_macro"],
        "val_loss": ["train_loss", "val_perplexity"],
    }.get(metric, [])
    present = set().union(*rows) if rows else set()
    return [metric] + [m for m in extra if m in present and m != metric]


def commits_cell(rows: list[dict[str, Any]]) -> str:
    """The commits a setting's runs were trained at, each once (12 characters; '+dirty' where
    the tree had uncommitted changes), or 'n/a'."""
    commits = [f"{r['git_commit'][:12]}{'+dirty' if r.get('git_dirty') is True else ''}"
               for r in rows if r.get("git_commit") not in (None, "", "unknown")]  # fmt: skip
    return ", ".join(dict.fromkeys(commits)) or "n/a"


def markdown_table(sweep: Sweep, groups: list[Group], metric: str, rows: list[dict]) -> str:
    """Markdown: one line per setting with mean ± std over seeds, the mean goodput and the
    commits of its runs; the best setting in bold."""
    columns = report_metrics(metric, rows)
    means = [g.mean_std(metric)[0] for g in groups]
    finite = [m for m in means if math.isfinite(m)]
    best = (max if higher_is_better(metric) else min)(finite) if finite else None
    header = [*sweep.fields, *columns, "seeds", "goodput", "commit"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group, mean in zip(groups, means, strict=True):
        cells = [format_value(group.setting.get(f, "")) for f in sweep.fields]
        for column in columns:
            m, s, n = group.mean_std(column)
            cells.append("n/a" if n == 0 else f"{m:.4f} ± {s:.4f}")
        n = group.mean_std(metric)[2]
        cells.append(f"{n}/{len(group.rows)}")
        goodput, _, timed = group.mean_std("goodput")
        cells.append(f"{100 * goodput:.0f}%" if timed else "n/a")
        cells.append(commits_cell(group.rows))
        if best is not None and mean == best:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(
    sweep: Sweep, groups: list[Group], metric: str, rows: list[dict], path: str
) -> str:
    """results.md: what was swept, the table, and any runs that did not finish."""
    goal = "higher" if higher_is_better(metric) else "lower"
    fixed = ", ".join(f"`{k}={format_value(v)}`" for k, v in sweep.fixed.items()) or "none"
    text = [
        f"# Sweep results: {sweep.source or sweep.config}",
        "",
        f"Base config `{sweep.config}`; fixed overrides: {fixed}; "
        f"seeds: {', '.join(map(str, sweep.seeds))}.",
        f"Key metric **{metric}** ({goal} is better): mean ± sample standard deviation over "
        "seeds; 'seeds' counts finished/planned runs; 'goodput' is the mean share of a run's "
        "wall time spent training (runtime/provenance.py); 'commit' the code the runs were "
        "trained at. Best setting in bold.",
    ]
    for axis, labels in sweep.bundles.items():
        text.append("")
        text += [
            f"- {axis} `{label}`: "
            + (", ".join(f"`{k}={format_value(v)}`" for k, v in bundle.items()) or "(base config)")
            for label, bundle in labels.items()
        ]
    text += ["", markdown_table(sweep, groups, metric, rows)]
    unfinished = [r for r in rows if r["status"] != "finished"]
    if unfinished:
        text += ["", "Runs without final metrics:", ""]
        text += [f"- `{r['run']}`: {r['status']}" for r in unfinished]
    out = "\n".join(text) + "\n"
    with open(path, "w") as f:
        f.write(out)
    return out
