"""A sweep's plots: learning curves per setting and the final metric against each swept field.

matplotlib is imported only when a plot is drawn (Agg backend: files, no display).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tools.sweep.reporting import Group, read_curves
from tools.sweep.spec import Run, Sweep, format_value, setting_name


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def curve_name(metric: str) -> str:
    """A final metric name -> its metrics.jsonl series: 'test_accuracy' -> 'test/accuracy'."""
    split, _, name = metric.partition("_")
    return f"{split}/{name}"


def mean_curve(curves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Seed-averaged curve over the steps that every seed logged."""
    common = curves[0][0]
    for steps, _ in curves[1:]:
        common = np.intersect1d(common, steps)
    stacked = [values[np.searchsorted(steps, common)] for steps, values in curves]
    return common, np.mean(stacked, axis=0) if stacked else np.array([])


def finished_curves(group: Group, workdirs: dict[str, str]) -> list[dict]:
    """read_curves of the group's finished runs. Unfinished runs are left out: their shorter
    curves would cut the seed mean at their last step (mean_curve keeps common steps)."""
    return [
        read_curves(workdirs[row["run"]])
        for row in group.rows
        if row["run"] in workdirs and row.get("status") == "finished"
    ]


def seed_mean_curve(curves: list[dict], panel: str) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(steps, seed-mean values, number of seeds) of one metrics.jsonl series ('train/loss')
    over `curves` (finished_curves of a group), or None if none logged it."""
    series = [c[panel] for c in curves if panel in c and len(c[panel][0])]
    if not series:
        return None
    steps, values = mean_curve(series)
    return steps, values, len(series)


def plot_learning_curves(groups: list[Group], runs: list[Run], metric: str, path: str) -> bool:
    """Training loss and the key metric's evaluations against step, one line per setting (the
    mean over its finished seeds)."""
    workdirs = {r.name: r.workdir for r in runs}
    panels = ["train/loss", curve_name(metric)]
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100)
    colors = plt.get_cmap("tab10" if len(groups) <= 10 else "viridis")
    drawn = False
    for i, group in enumerate(groups):
        color = colors(i % 10 if len(groups) <= 10 else i / max(len(groups) - 1, 1))
        curves = finished_curves(group, workdirs)  # read once for both panels
        for ax, panel in zip(axes, panels, strict=True):
            curve = seed_mean_curve(curves, panel)
            if curve is None:
                continue
            steps, values, n = curve
            ax.plot(
                steps,
                values,
                marker="o" if len(steps) < 6 else None,
                markersize=3,
                color=color,
                label=f"{setting_name(group.setting)} (n={n})",
            )
            drawn = True
    for ax, panel in zip(axes, panels, strict=True):
        ax.set_xlabel("step")
        ax.set_ylabel(panel)
        ax.grid(alpha=0.3)
    axes[0].set_title("training loss (seed mean)")
    axes[1].set_title(f"{panels[1]} (seed mean)")
    handles, labels = axes[0].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[1].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), fontsize=7)
    fig.tight_layout(rect=(0, 0.06 + 0.03 * math.ceil(len(labels) / 3), 1, 1))
    if drawn:
        fig.savefig(path)
    plt.close(fig)
    return drawn


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def use_log_x(field: str, values: list[Any]) -> bool:
    """Log axis for learning rates and weight decays, and for positive values over 2+ decades."""
    if not values or not all(_is_number(v) for v in values) or min(values) <= 0:
        return False
    return "learning_rate" in field or "weight_decay" in field or max(values) / min(values) >= 100


def plot_metric_vs_field(
    sweep: Sweep, groups: list[Group], field: str, metric: str, path: str
) -> bool:
    """The final metric (mean ± std over seeds) against one swept field; one line per value of
    the other fields (random search: one scatter)."""
    others = [f for f in sweep.fields if f != field]
    lines: dict[str, list[tuple[Any, float, float]]] = {}
    for group in groups:
        if field not in group.setting:
            continue
        mean, std, n = group.mean_std(metric)
        if n == 0:
            continue
        rest = {f: group.setting[f] for f in others if f in group.setting}
        label = "" if sweep.kind == "random" or not rest else setting_name(rest)
        lines.setdefault(label, []).append((group.setting[field], mean, std))
    if not lines:
        return False
    all_x = [x for points in lines.values() for x, _, _ in points]
    numeric = all(_is_number(x) for x in all_x)
    categories = list(dict.fromkeys(format_value(x) for x in all_x))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=100)
    for label, points in lines.items():
        if numeric:
            points.sort(key=lambda p: p[0])
            xs = [p[0] for p in points]
        else:
            xs = [categories.index(format_value(p[0])) for p in points]
        ax.errorbar(
            xs,
            [p[1] for p in points],
            yerr=[p[2] for p in points],
            capsize=3,
            marker="o",
            linestyle="none" if sweep.kind == "random" else "-",
            label=label or None,
        )
    if numeric and use_log_x(field, all_x):
        ax.set_xscale("log")
    if numeric and len(set(all_x)) <= 10:  # a grid: tick exactly the values tried
        ticks = sorted(set(all_x))
        ax.set_xticks(ticks, [format_value(x) for x in ticks])
        ax.minorticks_off()
    if not numeric:
        ax.set_xticks(range(len(categories)), categories)
    ax.set_xlabel(field)
    ax.set_ylabel(f"final {metric}")
    ax.set_title(f"{metric} vs {field} (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    if any(lines):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
