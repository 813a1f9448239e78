"""Pretrain a small GPT on the King James Bible, fine-tune it on Tiny Shakespeare, and compare
with training on Tiny Shakespeare from scratch for the same number of steps.

    python scripts/pretrain_finetune.py --workdir=runs/pretrain_finetune \\
        --pretrain_steps=1000 --finetune_steps=500

All three runs use the CPU-sized character GPT (configs/shakespeare_char_cpu.py: 4 layers x 4
heads x 128, block 64, batch 12) with tokenizer='byte', so that both corpora share one
256-entry vocabulary and the token embedding (tied to the output layer) transfers too; with
per-corpus character vocabularies it would have to be re-initialised. The fine-tuned and the
scratch runs share every hyperparameter; only the initialisation differs. Finished stages are
reused when the script is run again.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections  # noqa: E402
from absl import flags  # noqa: E402

import evaluate  # noqa: E402
import experiment  # noqa: E402
import train  # noqa: E402
from configs import shakespeare_char_cpu  # noqa: E402
from runtime import (
    cli,  # noqa: E402
    metrics_writer,  # noqa: E402
)

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The script's flags (defined only when run as a script)."""
    flags.DEFINE_string("workdir", None, "Parent directory of the three runs.")
    flags.DEFINE_integer("pretrain_steps", 1000, "Optimizer steps on the King James Bible.")
    flags.DEFINE_integer("finetune_steps", 500, "Steps on Tiny Shakespeare (tuned and scratch).")
    flags.DEFINE_string("tokenizer", "byte", "'byte' (shared vocabulary) or 'char'.")
    flags.DEFINE_integer("eval_points", 5, "Evaluations during each Tiny Shakespeare run.")
    flags.DEFINE_integer("seed", 0, "Seed of all three runs.")


def run_config(dataset: str, steps: int, tokenizer: str, seed: int) -> ml_collections.ConfigDict:
    """The CPU GPT recipe on `dataset` for `steps` steps (cosine schedule over the run)."""
    config = shakespeare_char_cpu.get_config()
    config.dataset = dataset
    config.tokenizer = tokenizer
    config.seed = seed
    config.num_train_steps = steps
    config.decay_steps = steps
    config.warmup_steps = min(100, steps // 10)
    config.log_every_steps = max(1, steps // 20)
    config.eval_every_steps = max(1, steps // FLAGS.eval_points)
    config.checkpoint_every_steps = steps
    config.sample_every_eval = False  # keep the comparison's timing clean
    return config


def train_stage(name: str, config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains one stage unless its final metrics exist already; returns them."""
    path = os.path.join(workdir, "final_metrics.json")
    if os.path.exists(path):
        print(f"== {name}: reusing {workdir}", flush=True)
    else:
        print(f"== {name}: training {config.num_train_steps} steps in {workdir}", flush=True)
        train.train_and_evaluate(config, workdir)
    with open(path) as f:
        return json.load(f)


def val_curve(workdir: str) -> dict[int, float]:
    """{step: val loss} of a run's evaluations."""
    path = os.path.join(workdir, "metrics.jsonl")
    return {r["step"]: r["val/loss"] for r in metrics_writer.read_jsonl(path) if "val/loss" in r}


def main(argv: Sequence[str]) -> None:
    """Runs the three stages and prints the comparison."""
    del argv
    root = os.path.abspath(FLAGS.workdir or "runs/pretrain_finetune")
    n, m, tok = FLAGS.pretrain_steps, FLAGS.finetune_steps, FLAGS.tokenizer
    dirs = {k: os.path.join(root, k) for k in ("pretrain_kjv", "finetune", "scratch")}

    pre = train_stage("pretrain", run_config("kjv", n, tok, FLAGS.seed), dirs["pretrain_kjv"])

    # Zero-shot: the pretrained model on Tiny Shakespeare's validation windows, before tuning.
    shakespeare = run_config("tiny_shakespeare", m, tok, FLAGS.seed)
    zero_shot = None
    if tok == "byte":  # a char model's vocabulary does not fit the other corpus
        pretrained = experiment.restore_run(dirs["pretrain_kjv"])
        zero_shot = evaluate.evaluate_restored(
            pretrained, "val", dataset=shakespeare.dataset, eval_steps=shakespeare.eval_steps
        )

    tuned_config = ml_collections.ConfigDict(shakespeare.to_dict())
    tuned_config.init_from.workdir = dirs["pretrain_kjv"]
    tuned = train_stage("fine-tune", tuned_config, dirs["finetune"])
    scratch = train_stage("scratch", shakespeare, dirs["scratch"])

    unit = "bits_per_byte" if tok == "byte" else "bits_per_char"
    rows = [
        (f"pretrain on KJV, {n} steps (KJV val)", pre["val_loss"], pre[f"val_{unit}"]),
    ]
    if zero_shot is not None:
        rows.append(("KJV model, 0 Shakespeare steps", zero_shot["loss"], zero_shot[unit]))
    rows += [
        (f"fine-tuned from KJV, {m} steps", tuned["val_loss"], tuned[f"val_{unit}"]),
        (f"from scratch, {m} steps", scratch["val_loss"], scratch[f"val_{unit}"]),
    ]
    print(f"\nTiny Shakespeare validation (tokenizer={tok}; last 10% of each corpus):\n")
    print(f"| run | val loss | val {unit.replace('_', ' ')} |")
    print("|---|---|---|")
    for label, loss, bits in rows:
        print(f"| {label} | {loss:.4f} | {bits:.4f} |")

    tuned_curve, scratch_curve = val_curve(dirs["finetune"]), val_curve(dirs["scratch"])
    print("\nShakespeare val loss during the runs:\n")
    print("| step | fine-tuned | scratch |")
    print("|---|---|---|")
    for step in sorted(set(tuned_curve) & set(scratch_curve)):
        print(f"| {step} | {tuned_curve[step]:.4f} | {scratch_curve[step]:.4f} |")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
