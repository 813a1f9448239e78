"""What made a run and where its time went: `<workdir>/provenance.json`, one entry per attempt.

A month later, a workdir says which code and which libraries produced it. Every attempt of a run
(the first start and each resume) appends one entry, written by process 0 only:

- `started_at`: when the attempt began (UTC, ISO 8601); `start_step`: the step it started from;
  `resumed`: whether it continued from a checkpoint;
- `argv`: the command line (`sys.argv`); `cwd`: the working directory;
- `git`: `commit` (the repository's HEAD, or "unknown" without git or outside a checkout),
  `dirty` (tracked files differ from HEAD; None when unknown), `diff_sha256` (sha256 of the
  output of `git diff HEAD`, when dirty) and `untracked_files` (how many files git neither
  tracks nor ignores: a new model file would be one);
- `versions`: Python, jax, jaxlib, flax, optax, orbax-checkpoint, numpy, and every installed
  accelerator plugin or CUDA library wheel (jax-cuda12-plugin, jax-cuda13-pjrt, libtpu,
  nvidia-*, ...), from importlib.metadata;
- `devices`: platform, device_kind, device_count, local_device_count, process_count and the
  backend's platform_version (e.g. the CUDA runtime);
- `hosts`: every process's hostname, in process order (gathered with jax's multihost utils);
- `goodput`: where the attempt's wall time went (`Goodput.report`), rewritten at every checkpoint
  and at the attempt's end, so a killed attempt keeps its time up to its last checkpoint.

`finish_attempt` sums the attempts' times into `final_metrics.json`'s `goodput` and names the
commit (`git_commit`, `git_dirty`, `git_commits`).

Goodput, as MaxText reports it: the share of a run's wall time spent training. `Goodput`
attributes every second of an attempt, measured with `time.perf_counter()` at the points the
training loop already passes (it adds no device synchronisation), to exactly one bucket, in
seconds:

- `training`: the loop's own time: dispatching steps and waiting for them where the loop already
  blocks (at most two dispatches in flight, metric fetches at log lines and before checkpoints),
  writing log lines, profiling. With asynchronous dispatch, device time is counted where the
  host waits for it, so a step's time may land in the bucket of whatever waits for it next (an
  evaluation started while steps are in flight waits for those first);
- `compiling`: XLA compilation wherever it happens (the first call of each compiled step, the
  eval step's first call, the sampler's), from JAX's own compile-duration events (tracing,
  lowering, backend compilation), taken out of the bucket it happened in;
- `data_wait`: the host's `next()` on the training batches (the input pipeline and the
  asynchronous host-to-device copy's dispatch), which may overlap steps the device still runs;
- `evaluating`: periodic and final evaluations, with text samples;
- `checkpointing`: saving checkpoints (with an asynchronous save, the dispatch; its commit is
  waited for at the end) and closing the checkpointer;
- `startup` (first attempt) or `restarting` (a resume): from the attempt's start (the process's
  start, for the command) to the training loop: imports, data loading, building and restoring
  the state;
- `other`: after the loop outside the phases above (the final report).

goodput = training / wall seconds, where wall seconds is the sum of the buckets (the attempt's
wall time up to its last record); a run's goodput sums each bucket over its attempts.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import jax
import numpy as np
from absl import logging

PROVENANCE_FILE = "provenance.json"
UNKNOWN = "unknown"
# The repository this code is in: the directory above runtime/.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIT = "git"  # the git executable (tests point it at one that is not there)
BUCKETS = ("training", "compiling", "data_wait", "evaluating", "checkpointing", "startup",
           "restarting", "other")  # fmt: skip
# Distributions recorded by name, then every installed one whose name starts with a prefix.
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")
PLUGIN_PREFIXES = ("jax-cuda", "jax-rocm", "jax-tpu", "libtpu", "nvidia-")
# JAX's compile-duration events (jax._src.dispatch): tracing (top level only), lowering to MLIR
# and XLA's compilation (a persistent-cache read included) follow one another, never nest.
COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_IMPORTED_AT = time.perf_counter()
T = TypeVar("T")


# ----------------------------------------------------------------------------- what made a run


def git_state(path: str | None = None) -> dict[str, Any]:
    """The git state of the repository holding `path` (default: this code's, REPO_ROOT):
    {'commit': HEAD's sha or 'unknown', 'dirty': bool or None (unknown), 'diff_sha256': sha256
    hex of `git diff HEAD`'s output (when dirty), 'untracked_files': int or None}.
    Never raises: no git, not a checkout, or git refusing the directory give 'unknown'."""
    path = path or REPO_ROOT
    state: dict[str, Any] = {"commit": UNKNOWN, "dirty": None, "untracked_files": None}
    commit = _git(path, "rev-parse", "--verify", "HEAD")
    if commit is None:
        return state
    state["commit"] = commit.decode().strip()
    diff = _git(path, "diff", "--no-color", "--no-ext-diff", "HEAD")
    if diff is not None:
        state["dirty"] = bool(diff)
        if diff:
            state["diff_sha256"] = hashlib.sha256(diff).hexdigest()
    untracked = _git(path, "ls-files", "--others", "--exclude-standard", "-z")
    if untracked is not None:
        state["untracked_files"] = len([name for name in untracked.split(b"\0") if name])
    return state


def _git(path: str, *args: str) -> bytes | None:
    """stdout of `git -C path args`, or None if git is missing, fails or takes over 30 s."""
    try:
        result = subprocess.run([GIT, "-C", path, *args], capture_output=True, timeout=30,
                                check=False, stdin=subprocess.DEVNULL)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None


def library_versions() -> dict[str, str | None]:
    """{'python': '3.12.3', distribution name: version} for PACKAGES (None when not installed)
    and every installed distribution named like an accelerator plugin or CUDA library
    (PLUGIN_PREFIXES: jax-cuda13-plugin, jax-cuda13-pjrt, libtpu, nvidia-cudnn-cu13, ...)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    plugins = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name.startswith(PLUGIN_PREFIXES):
            plugins[name] = dist.version
    versions.update(sorted(plugins.items()))
    return versions


def device_summary() -> dict[str, Any]:
    """What JAX runs on: platform ('cpu', 'gpu', 'tpu'), device_kind (the kinds, comma-separated
    when mixed), device_count, local_device_count, process_count, platform_version."""
    devices = jax.devices()
    summary: dict[str, Any] = {
        "platform": devices[0].platform,
        "device_kind": ", ".join(sorted({d.device_kind for d in devices})),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
    }
    with contextlib.suppress(Exception):  # an attribute of jaxlib's client, not a promised API
        summary["platform_version"] = str(devices[0].client.platform_version)
    return summary


def hostnames() -> list[str]:
    """Every process's hostname, in process order. Collective when several processes run (one
    all-gather of 256 bytes per process): every process must call it."""
    name = socket.gethostname()
    if jax.process_count() == 1:
        return [name]
    from jax.experimental import multihost_utils

    encoded = np.zeros(256, np.uint8)
    raw = name.encode()[:256]
    encoded[: len(raw)] = np.frombuffer(raw, np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(encoded))
    return [bytes(row).rstrip(b"\0").decode(errors="replace") for row in gathered]


def collect(start_step: int, started: float | None = None) -> dict[str, Any]:
    """This attempt's record (see the module docstring), without its goodput. `started`: the
    attempt's start as a time.perf_counter() value (default: now). Collective (hostnames)."""
    hosts = hostnames()
    started = time.perf_counter() if started is None else started
    wall_start = time.time() - (time.perf_counter() - started)
    return {
        "started_at": datetime.datetime.fromtimestamp(wall_start, datetime.UTC).isoformat(
            timespec="seconds"
        ),
        "start_step": int(start_step),
        "resumed": start_step > 0,
        "argv": list(sys.argv),
        "cwd": os.getcwd(),
        "git": git_state(),
        "versions": library_versions(),
        "devices": device_summary(),
        "hosts": hosts,
    }


# ----------------------------------------------------------------------------- provenance.json


def load(workdir: str) -> list[dict[str, Any]]:
    """The attempts recorded in workdir/provenance.json, oldest first ([] if none, or if the
    file cannot be read, with a warning)."""
    path = os.path.join(workdir, PROVENANCE_FILE)
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            return list(json.load(f)["attempts"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        logging.warning("Could not read %s (%s); its attempts are not counted.", path, e)
        return []


def _write(workdir: str, attempts: list[dict[str, Any]]) -> None:
    path = os.path.join(workdir, PROVENANCE_FILE)
    with open(path + ".tmp", "w") as f:  # a reader never sees half a file
        json.dump({"attempts": attempts}, f, indent=2)
    os.replace(path + ".tmp", path)


def start_attempt(workdir: str, start_step: int, goodput: Goodput) -> dict[str, Any]:
    """Appends this attempt's record to workdir/provenance.json (process 0) and returns it (every
    process: its own record; only process 0's is written). A resume (`start_step` > 0) counts its
    start-up as `restarting`. Collective: every process calls it at the same point."""
    goodput.resumed = start_step > 0
    record = collect(start_step, goodput.start)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        _write(workdir, [*load(workdir), record])
    return record


def save_goodput(
    workdir: str, goodput: Goodput, step: int, finished: bool = False
) -> list[dict[str, Any]]:
    """Records `goodput.report(step, finished)` as the newest attempt's `goodput` (process 0;
    cheap: one small file rewritten) and returns every attempt, oldest first. On other processes
    nothing is written and the list holds this attempt's timing alone."""
    report = goodput.report(step, finished)
    if jax.process_index() != 0:
        return [{"goodput": report}]
    attempts = load(workdir) or [{}]
    attempts[-1]["goodput"] = report
    _write(workdir, attempts)
    return attempts


def summarize(attempts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """A run's goodput over its attempts: {'goodput': training / wall seconds, 'wall_seconds',
    'seconds': {bucket: seconds summed over the attempts}, 'shares': {bucket: its share of
    wall_seconds} (summing to 1), 'attempts': how many, 'untimed_attempts': how many recorded no
    time (killed before their first checkpoint)}."""
    attempts = list(attempts)
    seconds = dict.fromkeys(BUCKETS, 0.0)
    untimed = 0
    for attempt in attempts:
        timing = attempt.get("goodput", {}).get("seconds")
        if not timing:
            untimed += 1
            continue
        for bucket in BUCKETS:
            seconds[bucket] += float(timing.get(bucket, 0.0))
    total = sum(seconds.values())
    return {
        "goodput": seconds["training"] / total if total > 0 else 0.0,
        "wall_seconds": total,
        "seconds": seconds,
        "shares": {b: (s / total if total > 0 else 0.0) for b, s in seconds.items()},
        "attempts": len(attempts),
        "untimed_attempts": untimed,
    }


def finish_attempt(workdir: str, goodput: Goodput, step: int) -> dict[str, Any]:
    """Records the finished attempt's goodput; returns the fields final_metrics.json gets:
    git_commit and git_dirty (of the attempt that finished), git_commits (every attempt's, in
    order, once each) and goodput (`summarize` over the attempts)."""
    attempts = save_goodput(workdir, goodput, step, finished=True)
    newest = attempts[-1].get("git", {})
    commits = [a["git"]["commit"] for a in attempts if "git" in a]
    return {
        "git_commit": newest.get("commit", UNKNOWN),
        "git_dirty": newest.get("dirty"),
        "git_commits": list(dict.fromkeys(commits)),
        "goodput": summarize(attempts),
    }


def trained_commit(workdir: str) -> str:
    """The commit of the newest attempt recorded in `workdir` ('unknown' if none is)."""
    attempts = load(workdir)
    return attempts[-1].get("git", {}).get("commit", UNKNOWN) if attempts else UNKNOWN


# ----------------------------------------------------------------------------- goodput


class _CompileClock:
    """Seconds JAX has spent compiling in this process (all threads), from its compile-duration
    events; one listener for the process, registered on first use."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._lock = threading.Lock()
        self._registered = False

    def ensure_listening(self) -> None:
        with self._lock:
            if not self._registered:
                jax.monitoring.register_event_duration_secs_listener(self._on_event)
                self._registered = True

    def _on_event(self, event: str, duration_secs: float, **kwargs: Any) -> None:
        if event in COMPILE_EVENTS:
            with self._lock:
                self.seconds += duration_secs


_COMPILE_CLOCK = _CompileClock()


class Goodput:
    """Where one attempt's wall time goes (module docstring: the buckets), in seconds.

    Time runs into one bucket at a time: the background bucket (`enter`: 'startup' until the
    loop, then 'training', then 'other') or, inside `phase(bucket)` (a context manager or a
    decorator), that bucket; compilation reported by JAX meanwhile is moved to 'compiling'.
    Costs two perf_counter() calls per boundary; never touches the device."""

    def __init__(self, start: float | None = None) -> None:
        """start: the attempt's start as a time.perf_counter() value (default: now)."""
        _COMPILE_CLOCK.ensure_listening()
        self.start = time.perf_counter() if start is None else start
        self.resumed = False  # set by start_attempt: start-up then counts as 'restarting'
        self._seconds = dict.fromkeys(BUCKETS, 0.0)
        self._bucket = "startup"
        self._last = self.start
        self._last_compile = _COMPILE_CLOCK.seconds

    def _account(self) -> None:
        """Adds the time since the last boundary to the current bucket, less compilation."""
        now, compiled = time.perf_counter(), _COMPILE_CLOCK.seconds
        elapsed = max(now - self._last, 0.0)
        compiling = min(max(compiled - self._last_compile, 0.0), elapsed)
        self._seconds[self._bucket] += elapsed - compiling
        self._seconds["compiling"] += compiling
        self._last, self._last_compile = now, compiled

    def enter(self, bucket: str) -> None:
        """From now on, time outside any phase goes to `bucket` (one of BUCKETS)."""
        self._account()
        self._bucket = bucket

    @contextlib.contextmanager
    def phase(self, bucket: str) -> Iterator[None]:
        """Counts the block's time (or, as a decorator, each call's) as `bucket`."""
        self._account()
        outer, self._bucket = self._bucket, bucket
        try:
            yield
        finally:
            self._account()
            self._bucket = outer

    def timed(self, iterator: Iterable[T], bucket: str = "data_wait") -> Iterator[T]:
        """Yields what `iterator` yields, counting the time of each next() as `bucket`."""
        iterator = iter(iterator)
        while True:
            with self.phase(bucket):
                try:
                    item = next(iterator)
                except StopIteration:
                    return
            yield item

    def seconds(self) -> dict[str, float]:
        """{bucket: seconds so far} for every bucket of BUCKETS (a resume's start-up under
        'restarting'); they sum to the wall time since `start`."""
        self._account()
        seconds = dict(self._seconds)
        if self.resumed:
            seconds["restarting"] += seconds["startup"]
            seconds["startup"] = 0.0
        return seconds

    def report(self, step: int, finished: bool = False) -> dict[str, Any]:
        """{'seconds': {bucket: seconds}, 'wall_seconds': their sum, 'goodput': training /
        wall_seconds, 'step': the step reached, 'finished': whether the attempt completed the
        run}: what provenance.json records per attempt."""
        seconds = {k: round(v, 4) for k, v in self.seconds().items()}
        wall = sum(seconds.values())
        return {
            "seconds": seconds,
            "wall_seconds": round(wall, 4),
            "goodput": seconds["training"] / wall if wall > 0 else 0.0,
            "step": int(step),
            "finished": bool(finished),
        }


def process_start() -> float:
    """The time.perf_counter() value at which this process started (Linux: from /proc; elsewhere
    the import of this module), so that a command's start-up includes its imports."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the name in (...) may hold spaces
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        age = uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime, ticks
    except (OSError, ValueError, IndexError):
        return _IMPORTED_AT
    now = time.perf_counter()
    # A process cannot be younger than this module: anything else is a clock it cannot trust.
    return now - age if age >= now - _IMPORTED_AT else _IMPORTED_AT
