"""Hyperparameter sweeps: expand a sweep file into train.py runs, run them, tabulate and plot.

From the repository root:

    python -m tools.sweep --sweep=configs/sweeps/cnn_width_lr.py --sweep_dir=runs/sweeps/cnn
    python -m tools.sweep --sweep=configs/sweeps/cnn_width_lr.py:quick --sweep_dir=... --parallel=2
    python -m tools.sweep --sweep=... --sweep_dir=... --dry_run        # print the plan only

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

import cli
from tools.sweep.driver import parse_set, run_sweep
from tools.sweep.spec import load_sweep

FLAGS = flags.FLAGS


def main(argv: Sequence[str]) -> None:
    """absl entry point. Failed runs are reported, not fatal: the exit status stays 0."""
    del argv  # cli.run rejects positional arguments
    if not FLAGS.sweep or not FLAGS.sweep_dir:
        raise cli.UserError("--sweep=configs/sweeps/<name>.py and --sweep_dir are required.")
    try:
        sweep = load_sweep(FLAGS.sweep)
        extra = parse_set(FLAGS.set)
    except ValueError as e:
        raise cli.UserError(str(e)) from e
    swept = set(extra) & set(sweep.fields)
    if swept:
        raise cli.UserError(f"--set fields {sorted(swept)} are swept by {FLAGS.sweep}.")
    sweep.fixed.update(extra)
    run_sweep(
        sweep,
        FLAGS.sweep_dir,
        parallel=FLAGS.parallel,
        dry_run=FLAGS.dry_run,
        timeout=FLAGS.run_timeout or None,
    )


if __name__ == "__main__":
    flags.DEFINE_string("sweep", None, "Sweep file (configs/sweeps/<name>.py[:arg]).")
    flags.DEFINE_string("sweep_dir", None, "Directory for the runs and the results.")
    flags.DEFINE_integer("parallel", 1, "Runs to train at the same time.")
    flags.DEFINE_bool("dry_run", False, "Print the planned runs and commands; run nothing.")
    flags.DEFINE_float("run_timeout", 0, "Kill a run after this many seconds (0: no limit).")
    flags.DEFINE_multi_string("set", [], "Extra fixed override for every run: field=value.")
    cli.run(main)
