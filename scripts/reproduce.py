"""Reproduces the headline numbers: trains each experiment with train.py and checks its target.

    python scripts/reproduce.py --experiments=fashion_mnist_mlp,fashion_mnist_cnn
    python scripts/reproduce.py --experiments=shakespeare_char_cpu

Prints, per experiment, the learning curve (from metrics.jsonl), the final metrics, the wall time
and whether the target was met, then a summary table. Runs resume if interrupted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from runtime import cli  # noqa: E402

# name -> (config file, metric in final_metrics.json, target, 'max' if higher is better)
EXPERIMENTS = {
    "fashion_mnist_mlp": ("configs/fashion_mnist_mlp.py", "test_accuracy", 0.885, "max"),
    "fashion_mnist_cnn": ("configs/fashion_mnist_cnn.py", "test_accuracy", 0.92, "max"),
    "fashion_mnist_cnn_strong": (
        "configs/fashion_mnist_cnn_strong.py",
        "test_accuracy",
        0.93,
        "max",
    ),
    "shakespeare_char_cpu": ("configs/shakespeare_char_cpu.py", "val_loss", 1.88, "min"),
    "shakespeare_char": ("configs/shakespeare_char.py", "val_loss", 1.4697, "min"),
}

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The script's flags (defined only when run as a script)."""
    flags.DEFINE_list("experiments", ["fashion_mnist_mlp", "fashion_mnist_cnn"], "Which to run.")
    flags.DEFINE_string("runs_dir", os.path.join(REPO, "runs", "repro"), "Where the workdirs go.")
    flags.DEFINE_multi_string("override", [], "Extra --config.x=y overrides for every run.")


def _curve(workdir: str, metric: str) -> list[tuple[int, float]]:
    key = {"test_accuracy": "test/accuracy", "val_loss": "val/loss"}[metric]
    points = []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if key in row:
                points.append((row["step"], row[key]))
    return points


def run_one(name: str) -> dict:
    """Trains one experiment (resuming if its workdir has checkpoints) and reads its results."""
    config, metric, target, mode = EXPERIMENTS[name]
    workdir = os.path.join(FLAGS.runs_dir, name)
    cmd = [sys.executable, "train.py", f"--config={config}", f"--workdir={workdir}"]
    cmd += [f"--config.{o}" for o in FLAGS.override]
    print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True)
    wall = time.perf_counter() - start
    with open(os.path.join(workdir, "final_metrics.json")) as f:
        final = json.load(f)
    value = final[metric]
    met = value >= target if mode == "max" else value <= target
    print(f"--- {name}: {metric} curve (step, value)")
    for step, v in _curve(workdir, metric):
        print(f"    {step:>7d}  {v:.4f}")
    return {"name": name, "metric": metric, "value": value, "target": target, "met": met,
            "wall_s": wall, "steps": final["step"]}  # fmt: skip


def main(argv: list[str]) -> None:
    """Runs the chosen experiments and prints the summary table."""
    del argv
    unknown = set(FLAGS.experiments) - set(EXPERIMENTS)
    if unknown:
        raise cli.UserError(f"Unknown experiments {sorted(unknown)}; have {sorted(EXPERIMENTS)}.")
    rows = [run_one(name) for name in FLAGS.experiments]
    print("\n| experiment | metric | measured | target | met | steps | wall time (this run) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['metric']} | {r['value']:.4f} | {r['target']} | "
              f"{'yes' if r['met'] else 'NO'} | {r['steps']} | {r['wall_s']:.0f} s |")  # fmt: skip


if __name__ == "__main__":
    define_flags()
    cli.run(main)
