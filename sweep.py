"""Hyperparameter sweeps: expand a sweep file into train.py runs, run them, tabulate and plot.

    python sweep.py --sweep=configs/sweeps/cnn_width_lr.py --sweep_dir=runs/sweeps/cnn
    python sweep.py --sweep=configs/sweeps/cnn_width_lr.py:quick --sweep_dir=... --parallel=2
    python sweep.py --sweep=... --sweep_dir=... --dry_run          # print the plan only

A sweep file defines `get_sweep()` (or `get_sweep(arg)` for `--sweep=file.py:arg`) returning a
dict with
  'config':   the base config file, e.g. 'configs/fashion_mnist_cnn.py';
  one of      'grid':     {field: [values]}              (every combination),
              'settings': [{field: value, ...}, ...]     (an explicit list), or
              'random':   {'count': n, 'seed': s, 'params': {field: distribution}}, with
                          distributions log_uniform(lo, hi), uniform(lo, hi), choice([...]);
  'seeds':    [0, 1, ...] (each setting is trained once per seed; default [0]);
  optional    'fixed':  {field: value} applied to every run (e.g. a shorter schedule),
              'metric': the final metric to compare (default test_accuracy / val_loss).
Fields are config paths as on train.py's command line ('learning_rate', 'model.conv_features').

Every run trains in its own workdir `<sweep_dir>/<field=value,...>/seed=<s>` as a subprocess
(a crash stays contained; its log is kept in `train.log` there). Finished runs (with
final_metrics.json) are skipped and unfinished ones resume from their checkpoints when the sweep
is started again. At the end: results.csv (one row per run), results.md (mean ± std over seeds
per setting) and PNG plots under <sweep_dir>/plots.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import hashlib
import importlib.util
import inspect
import itertools
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import app, flags

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
TRAIN_SCRIPT = os.path.join(REPO_ROOT, "train.py")

# ----------------------------------------------------------------------------- sweep files


@dataclasses.dataclass(frozen=True)
class Distribution:
    """A range to sample a hyperparameter from in random search."""

    kind: str  # 'log_uniform', 'uniform' or 'choice'
    args: tuple


def log_uniform(low: float, high: float) -> Distribution:
    """Samples exp(uniform(log low, log high)): for learning rates and other scales."""
    if not 0 < low < high:
        raise ValueError(f"log_uniform needs 0 < low < high, got ({low}, {high}).")
    return Distribution("log_uniform", (float(low), float(high)))


def uniform(low: float, high: float) -> Distribution:
    """Samples uniformly from [low, high)."""
    if not low < high:
        raise ValueError(f"uniform needs low < high, got ({low}, {high}).")
    return Distribution("uniform", (float(low), float(high)))


def choice(values: Sequence[Any]) -> Distribution:
    """Samples one of `values` with equal probability."""
    if not values:
        raise ValueError("choice needs at least one value.")
    return Distribution("choice", (tuple(values),))


@dataclasses.dataclass
class Sweep:
    """A parsed sweep file: the base config, the settings to try, and the seeds."""

    config: str
    settings: list[dict[str, Any]]
    seeds: list[int]
    fixed: dict[str, Any] = dataclasses.field(default_factory=dict)
    metric: str | None = None
    kind: str = "grid"  # 'grid', 'settings' or 'random'
    source: str = ""

    @property
    def fields(self) -> list[str]:
        """The swept fields, in first-appearance order."""
        seen: dict[str, None] = {}
        for setting in self.settings:
            seen.update(dict.fromkeys(setting))
        return list(seen)


def _round_sig(x: float, digits: int = 3) -> float:
    """Rounds to `digits` significant digits, so sampled values make readable run names."""
    if x == 0 or not math.isfinite(x):
        return x
    return float(f"{x:.{digits}g}")


def _is_distribution(x: Any) -> bool:
    # By name, not isinstance: a sweep file's `import sweep` gets another copy of this class
    # when sweep.py itself runs as __main__.
    return type(x).__name__ == "Distribution" and hasattr(x, "kind") and hasattr(x, "args")


def sample_random(
    params: dict[str, Any], count: int, seed: int = 0, digits: int = 3
) -> list[dict[str, Any]]:
    """`count` settings drawn from `params` ({field: Distribution or fixed value}), seeded."""
    rng = np.random.default_rng(seed)
    settings = []
    for _ in range(count):
        setting = {}
        for field, dist in params.items():
            if not _is_distribution(dist):
                setting[field] = dist
            elif dist.kind == "log_uniform":
                low, high = dist.args
                value = math.exp(rng.uniform(math.log(low), math.log(high)))
                setting[field] = _round_sig(value, digits)
            elif dist.kind == "uniform":
                setting[field] = _round_sig(float(rng.uniform(*dist.args)), digits)
            elif dist.kind == "choice":
                values = dist.args[0]
                setting[field] = values[int(rng.integers(len(values)))]
            else:
                raise ValueError(f"Unknown distribution {dist.kind!r} for {field}.")
        settings.append(setting)
    return settings


def expand_grid(grid: dict[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values (the last field varies fastest)."""
    for field, values in grid.items():
        if isinstance(values, str | bytes) or not isinstance(values, Sequence) or not values:
            raise ValueError(f"grid[{field!r}] must be a non-empty list of values, got {values!r}.")
    fields = list(grid)
    return [dict(zip(fields, combo, strict=True)) for combo in itertools.product(*grid.values())]


def parse_sweep(spec: dict[str, Any], source: str = "") -> Sweep:
    """Validates a get_sweep() dict and expands it into a Sweep."""
    known = {"config", "grid", "settings", "random", "seeds", "fixed", "metric"}
    unknown = set(spec) - known
    if unknown:
        raise ValueError(f"Sweep {source}: unknown keys {sorted(unknown)}; known: {sorted(known)}.")
    if not spec.get("config"):
        raise ValueError(f"Sweep {source}: 'config' (the base config file) is required.")
    kinds = [k for k in ("grid", "settings", "random") if k in spec]
    if len(kinds) > 1:
        raise ValueError(f"Sweep {source}: give one of 'grid', 'settings', 'random', not {kinds}.")
    kind = kinds[0] if kinds else "settings"
    if kind == "grid":
        settings = expand_grid(spec["grid"])
    elif kind == "random":
        random = dict(spec["random"])
        settings = sample_random(random["params"], int(random["count"]), int(random.get("seed", 0)))
    else:
        settings = [dict(s) for s in spec.get("settings", [{}])]
    seeds = [int(s) for s in spec.get("seeds", [0])]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"Sweep {source}: 'seeds' must be a non-empty list of distinct ints.")
    fixed = dict(spec.get("fixed", {}))
    for setting in settings:
        if "seed" in setting or "seed" in fixed:
            raise ValueError(f"Sweep {source}: set seeds with 'seeds', not as a swept field.")
        clash = set(setting) & set(fixed)
        if clash:
            raise ValueError(f"Sweep {source}: {sorted(clash)} are both swept and fixed.")
    names = [setting_name(s) for s in settings]
    if len(set(names)) != len(names):
        raise ValueError(f"Sweep {source}: some settings repeat (or name alike): {names}.")
    return Sweep(
        config=spec["config"],
        settings=settings,
        seeds=seeds,
        fixed=fixed,
        metric=spec.get("metric"),
        kind=kind,
        source=source,
    )


def load_sweep(path_and_arg: str) -> Sweep:
    """Imports a sweep file ('path.py' or 'path.py:arg') and parses its get_sweep()."""
    path, _, arg = path_and_arg.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Sweep file {path} not found.")
    module_spec = importlib.util.spec_from_file_location("_sweep_file", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise ValueError(f"Sweep file {path} defines no get_sweep().")
    takes_arg = len(inspect.signature(module.get_sweep).parameters) > 0
    if arg and not takes_arg:
        raise ValueError(f"{path}'s get_sweep() takes no argument, but ':{arg}' was given.")
    spec = module.get_sweep(arg) if takes_arg and arg else module.get_sweep()
    return parse_sweep(spec, source=path_and_arg)


# ----------------------------------------------------------------------------- names, commands


def format_value(value: Any) -> str:
    """A compact, readable rendering: 0.001, (32,64), True, adamw."""
    if isinstance(value, bool | str):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, tuple | list):
        inner = ",".join(format_value(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    return str(value)


_UNSAFE = re.compile(r"[^A-Za-z0-9._=,()+\-]")


def sanitize(name: str, max_len: int = 120) -> str:
    """Keeps a path component portable: odd characters -> '_', long names shortened + hash."""
    safe = _UNSAFE.sub("_", name).strip(".") or "_"
    if len(safe) > max_len:
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        safe = f"{safe[: max_len - 9]}~{digest}"
    return safe


def setting_name(setting: dict[str, Any]) -> str:
    """'learning_rate=0.001,model.conv_features=(64,)' (fields sorted); 'base' when empty."""
    if not setting:
        return "base"
    return ",".join(f"{k}={format_value(setting[k])}" for k in sorted(setting))


@dataclasses.dataclass
class Run:
    """One training run of the sweep: a setting and a seed, in its own workdir."""

    setting: dict[str, Any]
    seed: int
    workdir: str

    @property
    def name(self) -> str:
        """Human-readable '<setting>/seed=<s>'."""
        return f"{setting_name(self.setting)}/seed={self.seed}"


def plan_runs(sweep: Sweep, sweep_dir: str) -> list[Run]:
    """Settings x seeds, each with its sanitized workdir under sweep_dir."""
    sweep_dir = os.path.abspath(sweep_dir)
    return [
        Run(setting, seed, os.path.join(sweep_dir, sanitize(setting_name(setting)), f"seed={seed}"))
        for setting in sweep.settings
        for seed in sweep.seeds
    ]


def cli_value(value: Any) -> str:
    """A value as ml_collections' config flags parse it (tuples as Python literals)."""
    if isinstance(value, tuple | list):
        return repr(tuple(value))
    if isinstance(value, float):
        return repr(value)
    return str(value)


def resolve_config_path(config: str) -> str:
    """The base config file, relative to the working directory or else to the repository."""
    path, sep, arg = config.partition(":")
    if not os.path.isabs(path) and not os.path.exists(path):
        path = os.path.join(REPO_ROOT, path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Base config {config} not found.")
    return os.path.abspath(path) + sep + arg


def train_command(sweep: Sweep, run: Run, extra: Sequence[str] = ()) -> list[str]:
    """`python train.py --config=... --config.<field>=<value> ... --workdir=...` for one run."""
    command = [sys.executable, TRAIN_SCRIPT, f"--config={resolve_config_path(sweep.config)}"]
    overrides = {**sweep.fixed, **run.setting, "seed": run.seed}
    command += [f"--config.{k}={cli_value(v)}" for k, v in overrides.items()]
    command += list(extra)
    command.append(f"--workdir={run.workdir}")
    return command


def is_finished(workdir: str) -> bool:
    """Whether the run wrote its final metrics."""
    return os.path.isfile(os.path.join(workdir, "final_metrics.json"))


def run_status(workdir: str) -> str:
    """'finished', 'partial' (has checkpoints to resume from) or 'new'."""
    if is_finished(workdir):
        return "finished"
    ckpt = os.path.join(workdir, "checkpoints")
    if os.path.isdir(ckpt) and any(d.isdigit() for d in os.listdir(ckpt)):
        return "partial"
    return "new"


# ----------------------------------------------------------------------------- running


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
                "setting": _jsonable(run.setting),
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


# ----------------------------------------------------------------------------- results


def _jsonable(setting: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in setting.items()}


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


def collect_rows(runs: list[Run], outcomes: list[Outcome] | None = None) -> list[dict[str, Any]]:
    """One row per run: its setting, seed, status and scalar final metrics."""
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
        rows.append(row)
    return rows


def write_csv(rows: list[dict[str, Any]], fields: list[str], path: str) -> None:
    """results.csv: the swept fields, seed and status first, then every metric column."""
    first = ["run", *fields, "seed", "status"]
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


def markdown_table(sweep: Sweep, groups: list[Group], metric: str, rows: list[dict]) -> str:
    """Markdown: one line per setting with mean ± std over seeds; the best setting in bold."""
    columns = report_metrics(metric, rows)
    means = [g.mean_std(metric)[0] for g in groups]
    finite = [m for m in means if math.isfinite(m)]
    best = (max if higher_is_better(metric) else min)(finite) if finite else None
    header = [*sweep.fields, *columns, "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group, mean in zip(groups, means, strict=True):
        cells = [format_value(group.setting.get(f, "")) for f in sweep.fields]
        for column in columns:
            m, s, n = group.mean_std(column)
            cells.append("n/a" if n == 0 else f"{m:.4f} ± {s:.4f}")
        n = group.mean_std(metric)[2]
        cells.append(f"{n}/{len(group.rows)}")
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
        "seeds; 'seeds' counts finished/planned runs. Best setting in bold.",
        "",
        markdown_table(sweep, groups, metric, rows),
    ]
    unfinished = [r for r in rows if r["status"] != "finished"]
    if unfinished:
        text += ["", "Runs without final metrics:", ""]
        text += [f"- `{r['run']}`: {r['status']}" for r in unfinished]
    out = "\n".join(text) + "\n"
    with open(path, "w") as f:
        f.write(out)
    return out


# ----------------------------------------------------------------------------- plots


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


def plot_learning_curves(groups: list[Group], runs: list[Run], metric: str, path: str) -> bool:
    """Training loss and the key metric's evaluations against step, one line per setting."""
    workdirs = {r.name: r.workdir for r in runs}
    panels = ["train/loss", curve_name(metric)]
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100)
    colors = plt.get_cmap("tab10" if len(groups) <= 10 else "viridis")
    drawn = False
    for i, group in enumerate(groups):
        curves = [read_curves(workdirs[row["run"]]) for row in group.rows if row["run"] in workdirs]
        color = colors(i % 10 if len(groups) <= 10 else i / max(len(groups) - 1, 1))
        for ax, panel in zip(axes, panels, strict=True):
            series = [c[panel] for c in curves if panel in c and len(c[panel][0])]
            if not series:
                continue
            steps, values = mean_curve(series)
            ax.plot(
                steps,
                values,
                marker="o" if len(steps) < 6 else None,
                markersize=3,
                color=color,
                label=f"{setting_name(group.setting)} (n={len(series)})",
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


# ----------------------------------------------------------------------------- the whole sweep


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
                "settings": [_jsonable(s) for s in sweep.settings],
                "seeds": sweep.seeds,
                "fixed": _jsonable(sweep.fixed),
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


def _parse_set(values: Sequence[str]) -> dict[str, Any]:
    """--set=field=value flags -> {field: value} (values kept as text: train.py parses them)."""
    out = {}
    for item in values:
        field, sep, value = item.partition("=")
        if not sep or not field:
            raise ValueError(f"--set={item!r}: use --set=field=value.")
        out[field.removeprefix("config.")] = value
    return out


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the command-line flags (only when run as a script: importing this module must
    not clash with train.py's flags of the same names)."""
    flags.DEFINE_string("sweep", None, "Sweep file (configs/sweeps/<name>.py[:arg]).")
    flags.DEFINE_string("sweep_dir", None, "Directory for the runs and the results.")
    flags.DEFINE_integer("parallel", 1, "Runs to train at the same time.")
    flags.DEFINE_bool("dry_run", False, "Print the planned runs and commands; run nothing.")
    flags.DEFINE_float("run_timeout", 0, "Kill a run after this many seconds (0: no limit).")
    flags.DEFINE_multi_string("set", [], "Extra fixed override for every run: field=value.")


def main(argv: Sequence[str]) -> None:
    """absl entry point. Failed runs are reported, not fatal: the exit status stays 0."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not FLAGS.sweep or not FLAGS.sweep_dir:
        raise app.UsageError("--sweep=configs/sweeps/<name>.py and --sweep_dir are required.")
    try:
        sweep = load_sweep(FLAGS.sweep)
        extra = _parse_set(FLAGS.set)
    except (ValueError, FileNotFoundError) as e:
        raise app.UsageError(str(e)) from e
    swept = set(extra) & set(sweep.fields)
    if swept:
        raise app.UsageError(f"--set fields {sorted(swept)} are swept by {FLAGS.sweep}.")
    sweep.fixed.update(extra)
    run_sweep(
        sweep,
        FLAGS.sweep_dir,
        parallel=FLAGS.parallel,
        dry_run=FLAGS.dry_run,
        timeout=FLAGS.run_timeout or None,
    )


if __name__ == "__main__":
    define_flags()
    app.run(main)
