"""Hyperparameter sweeps: expand a sweep file into train.py runs, run them, tabulate and plot.

    python -m tools.sweep --sweep=configs/sweeps/cnn_width_lr.py --sweep_dir=runs/sweeps/cnn
    python -m tools.sweep --sweep=... --sweep_dir=... --launcher=slurm   # or kubernetes
    python -m tools.sweep --sweep=... --sweep_dir=... --summarize        # after a cluster job

Modules: `spec` (sweep files, run names, train.py commands), `running` (the subprocesses),
`launchers` (a SLURM array script or a Kubernetes indexed Job: one task per run),
`reporting` (results.csv, results.md), `plots`, `driver` (a whole sweep) and `__main__` (the
command line). Sweep files import their distributions from here:

    from tools.sweep import choice, log_uniform, uniform
"""

from tools.sweep.spec import Distribution, choice, log_uniform, uniform

__all__ = ["Distribution", "choice", "log_uniform", "uniform"]
