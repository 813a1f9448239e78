"""Sweep files and the runs they expand to: distributions, settings, names, train.py commands.

A sweep file (configs/sweeps/<name>.py) defines `get_sweep()` (or `get_sweep(arg)` for
`--sweep=file.py:arg`) returning a dict with
  'config':   the base config file, e.g. 'configs/fashion_mnist_cnn.py';
  one of      'grid':     {field: [values]}              (every combination); a value list
                          may instead be a dict {label: {field: value, ...}}, a named axis
                          whose values are bundles of overrides (e.g. 'block': {'gpt': {...},
                          'llama': {...}}): runs and tables show the label, train.py gets
                          the bundle's fields,
              'settings': [{field: value, ...}, ...]     (an explicit list), or
              'random':   {'count': n, 'seed': s, 'params': {field: distribution}}, with
                          distributions log_uniform(lo, hi), uniform(lo, hi), choice([...])
                          (`from tools.sweep import log_uniform, uniform, choice`);
  'seeds':    [0, 1, ...] (each setting is trained once per seed; default [0]);
  optional    'fixed':  {field: value} applied to every run (e.g. a shorter schedule),
              'metric': the final metric to compare (default test_accuracy / val_loss).
Fields are config paths as on train.py's command line ('learning_rate', 'model.conv_features').
Every run trains in its own workdir `<sweep_dir>/<field=value,...>/seed=<s>`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import inspect
import itertools
import math
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

# tools/sweep/spec.py -> the repository root, two levels above this package.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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
    # Named axes of a grid: {axis: {label: {field: value}}}; a setting holds the label.
    bundles: dict[str, dict[str, dict[str, Any]]] = dataclasses.field(default_factory=dict)

    @property
    def fields(self) -> list[str]:
        """The swept fields (named axes by their name), in first-appearance order: the columns
        of the tables."""
        seen: dict[str, None] = {}
        for setting in self.settings:
            seen.update(dict.fromkeys(setting))
        return list(seen)

    def overrides(self, setting: dict[str, Any]) -> dict[str, Any]:
        """The config overrides of a setting: a named axis's label replaced by its bundle."""
        out: dict[str, Any] = {}
        for field, value in setting.items():
            out.update(self.bundles[field][value] if field in self.bundles else {field: value})
        return out

    @property
    def config_fields(self) -> list[str]:
        """The config fields the settings change (bundles expanded)."""
        seen: dict[str, None] = {}
        for setting in self.settings:
            seen.update(dict.fromkeys(self.overrides(setting)))
        return list(seen)


def _round_sig(x: float, digits: int = 3) -> float:
    """Rounds to `digits` significant digits, so sampled values make readable run names."""
    if x == 0 or not math.isfinite(x):
        return x
    return float(f"{x:.{digits}g}")


def sample_random(
    params: dict[str, Any], count: int, seed: int = 0, digits: int = 3
) -> list[dict[str, Any]]:
    """`count` settings drawn from `params` ({field: Distribution or fixed value}), seeded."""
    rng = np.random.default_rng(seed)
    settings = []
    for _ in range(count):
        setting = {}
        for field, dist in params.items():
            if not isinstance(dist, Distribution):
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


def _named_axes(grid: dict[str, Any], source: str) -> dict[str, dict[str, dict[str, Any]]]:
    """The grid's named axes ({label: {field: value}} instead of a list), validated."""
    bundles = {}
    for axis, values in grid.items():
        if not isinstance(values, dict):
            continue
        if not values:
            raise ValueError(f"Sweep {source}: grid[{axis!r}] names no bundles.")
        for label, bundle in values.items():
            if not isinstance(label, str) or not label or not isinstance(bundle, dict):
                raise ValueError(
                    f"Sweep {source}: grid[{axis!r}] must map labels (str) to override dicts "
                    f"{{field: value}}, got {label!r}: {bundle!r}."
                )
        bundles[axis] = {label: dict(bundle) for label, bundle in values.items()}
    return bundles


def parse_sweep(spec: dict[str, Any], source: str = "") -> Sweep:
    """Validates a get_sweep() dict and expands it into a Sweep; raises ValueError naming the
    key at fault."""
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
    bundles: dict[str, dict[str, dict[str, Any]]] = {}
    if kind == "grid":
        bundles = _named_axes(spec["grid"], source)
        settings = expand_grid({k: list(v) if k in bundles else v for k, v in spec["grid"].items()})
    elif kind == "random":
        random = dict(spec["random"])
        settings = sample_random(random["params"], int(random["count"]), int(random.get("seed", 0)))
    else:
        settings = [dict(s) for s in spec.get("settings", [{}])]
    seeds = [int(s) for s in spec.get("seeds", [0])]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"Sweep {source}: 'seeds' must be a non-empty list of distinct ints.")
    fixed = dict(spec.get("fixed", {}))
    plain = {f for s in settings for f in s if f not in bundles}
    for axis, labels in bundles.items():
        for label, bundle in labels.items():
            clash = set(bundle) & plain
            if clash:
                raise ValueError(
                    f"Sweep {source}: grid[{axis!r}][{label!r}] sets {sorted(clash)}, which the "
                    "grid also sweeps."
                )
            for other in bundles.keys() - {axis}:
                clash = set(bundle) & {f for b in bundles[other].values() for f in b}
                if clash:
                    raise ValueError(
                        f"Sweep {source}: {sorted(clash)} are set by both named axes "
                        f"{axis!r} and {other!r}."
                    )
    sweep = Sweep(config=spec["config"], settings=settings, seeds=[], bundles=bundles)
    for setting in settings:
        overrides = sweep.overrides(setting)
        if "seed" in overrides or "seed" in fixed:
            raise ValueError(f"Sweep {source}: set seeds with 'seeds', not as a swept field.")
        clash = set(overrides) & set(fixed)
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
        bundles=bundles,
    )


def check_fields(sweep: Sweep) -> None:
    """Raises ValueError naming every swept or fixed field that the base config does not have
    (train.py would refuse each run; better to say so once, before any run starts), with the
    closest existing field."""
    import difflib

    path, _, arg = resolve_config_path(sweep.config).partition(":")
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    module_spec = importlib.util.spec_from_file_location("_sweep_base_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()

    def paths(node: Any, prefix: str = "") -> list[str]:
        out = []
        for key in node.keys():
            value = node[key]
            out += paths(value, f"{prefix}{key}.") if hasattr(value, "keys") else [prefix + key]
        return out

    known = paths(config)
    fields = set(sweep.config_fields) | set(sweep.fixed)
    missing = sorted(f for f in fields if f not in known)
    if missing:
        hints = [f"{f} (did you mean {c[0]!r}?)" if (c := difflib.get_close_matches(f, known, 1))
                 else f for f in missing]  # fmt: skip
        raise ValueError(
            f"Sweep {sweep.source}: {', '.join(hints)} not fields of {sweep.config} (train.py "
            "would refuse every run). Fields are config paths such as 'learning_rate' or "
            "'model.conv_features'; a model field must be set in the config file to be swept."
        )


def load_sweep(path_and_arg: str) -> Sweep:
    """Imports a sweep file ('path.py' or 'path.py:arg') and parses its get_sweep()."""
    path, _, arg = path_and_arg.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Sweep file {path} not found.")
    if REPO_ROOT not in sys.path:  # so that the file's `from tools.sweep import ...` resolves
        sys.path.insert(0, REPO_ROOT)
    module_spec = importlib.util.spec_from_file_location("_sweep_file", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise ValueError(f"Sweep file {path} defines no get_sweep().")
    takes_arg = len(inspect.signature(module.get_sweep).parameters) > 0
    if arg and not takes_arg:
        raise ValueError(f"{path}'s get_sweep() takes no argument, but ':{arg}' was given.")
    spec = module.get_sweep(arg) if takes_arg and arg else module.get_sweep()
    sweep = parse_sweep(spec, source=path_and_arg)
    check_fields(sweep)
    return sweep


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


def train_command(
    sweep: Sweep,
    run: Run,
    extra: Sequence[str] = (),
    python: str = sys.executable,
    repo_root: str = REPO_ROOT,
) -> list[str]:
    """`python train.py --config=... --config.<field>=<value> ... --workdir=...` for one run.

    `python` and `repo_root` name the interpreter and the repository where the run will execute
    (a cluster's image may keep them elsewhere than this machine); the base config is passed as
    its path inside `repo_root`. Raises ValueError when `repo_root` is another directory and
    the base config lies outside this repository (the run could not find it)."""
    config = resolve_config_path(sweep.config)
    if os.path.abspath(repo_root) != REPO_ROOT:
        path, sep, arg = config.partition(":")
        relative = os.path.relpath(path, REPO_ROOT)
        if relative.startswith(os.pardir):
            raise ValueError(
                f"Base config {sweep.config} is outside the repository {REPO_ROOT}, so it would "
                f"not be found under {repo_root}; put it in the repository's configs/."
            )
        config = os.path.join(repo_root, relative) + sep + arg
    command = [python, os.path.join(repo_root, "train.py"), f"--config={config}"]
    overrides = {**sweep.fixed, **sweep.overrides(run.setting), "seed": run.seed}
    command += [f"--config.{k}={cli_value(v)}" for k, v in overrides.items()]
    command += list(extra)
    command.append(f"--workdir={run.workdir}")
    return command


def is_finished(workdir: str) -> bool:
    """Whether the run wrote its final metrics."""
    return os.path.isfile(os.path.join(workdir, "final_metrics.json"))


def run_status(workdir: str) -> str:
    """'finished', 'partial' (has checkpoints to resume from), 'started' (has a train.log but
    no checkpoint yet: running, or failed early; the log says which) or 'new'."""
    if is_finished(workdir):
        return "finished"
    ckpt = os.path.join(workdir, "checkpoints")
    if os.path.isdir(ckpt) and any(d.isdigit() for d in os.listdir(ckpt)):
        return "partial"
    if os.path.isfile(os.path.join(workdir, "train.log")):
        return "started"
    return "new"


def jsonable(setting: dict[str, Any]) -> dict[str, Any]:
    """A setting with its tuples as lists, for json.dump."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in setting.items()}
