"""jaxlab's GPT loop vs nanoGPT's PyTorch loop at the CPU config: speed, step-by-step losses, loss.

    .venv/bin/python scripts/compare_nanogpt.py --mode=speed [--iters=300]
    .venv/bin/python scripts/compare_nanogpt.py --mode=lockstep [--iters=300]
    .venv/bin/python scripts/compare_nanogpt.py --mode=loss --seeds=1337,1,2

The PyTorch side is scripts/nanogpt_torch_baseline.py, run by --torch_python (an environment
with torch; never jaxlab's .venv, whose TensorFlow and torch would share a process otherwise):

    make torch-env   # .venv-torch: numpy and a CPU build of torch (see the Makefile)

- speed: median time per training iteration of each (torch: forward, backward, clip, AdamW and
  loss.item(), as nanoGPT times them; jaxlab: tools/bench.py's steady-state step and train.py's
  whole loop), tokens/s and the ratio. The two run one after the other, never together.
- lockstep: both start from the same weights (jaxlab's init, copied into the torch model) and
  train on the same batches (jaxlab's); prints the two loss curves and their largest gap. Any
  difference in model, loss, clipping, AdamW or schedule shows up as a gap from the first steps.
- loss: full 2000-iteration runs of each for every seed; validation loss on nanoGPT's 20 random
  batches and on 500, so seed noise and estimate noise can be told apart from a real gap.
Prints a table, then one JSON line.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from absl import flags  # noqa: E402

from runtime import cli, host_allocator  # noqa: E402

host_allocator.keep_freed_memory_mapped()  # before TensorFlow and jax start threads

TORCH_SCRIPT = os.path.join(REPO_ROOT, "scripts", "nanogpt_torch_baseline.py")


def _config(seed: int = 1337):
    from configs import shakespeare_char_cpu

    config = shakespeare_char_cpu.get_config()
    config.seed = seed
    return config


def run_torch(python: str, *args: str, timeout: int = 3600) -> dict[str, Any]:
    """Runs the PyTorch baseline with `args`; returns its JSON line."""
    if not os.path.exists(python):
        raise cli.UserError(
            f"no PyTorch environment at {python}. Create one (see this script's docstring) "
            "or pass --torch_python=/path/to/python."
        )
    proc = subprocess.run([python, TORCH_SCRIPT, *args], capture_output=True, text=True,
                          timeout=timeout, check=False)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"the PyTorch baseline failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def speed(torch_python: str, iters: int) -> dict[str, Any]:
    """Steady-state time per iteration of each loop, measured one after the other."""
    import train
    from runtime import metrics_writer
    from tools import bench

    torch_result = run_torch(torch_python, f"--max_iters={iters}",
                             "--eval_interval=1000000", "--final_eval_iters=0")  # fmt: skip
    config = _config()
    # bench times calls of config.steps_per_dispatch iterations each.
    step = bench.benchmark_training(config, steps=max(3, iters // config.steps_per_dispatch))
    # train.py's whole loop (input pipeline, NaN checks, logging), without evaluations.
    config.num_train_steps = iters
    config.eval_every_steps = config.checkpoint_every_steps = 10**9
    config.log_every_steps = 50
    config.sample_every_eval = False
    config.eval_steps = 1
    with tempfile.TemporaryDirectory() as workdir:
        train.train_and_evaluate(config, workdir)
        rows = metrics_writer.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    rates = [r["train/tokens_per_sec"] for r in rows if "train/tokens_per_sec" in r][1:]
    tokens = config.batch_size * config.model.block_size
    return {
        "mode": "speed",
        "iters": iters,
        "torch_version": torch_result["torch_version"],
        "torch_threads": torch_result["threads"],
        "torch_ms_per_iter": round(torch_result["median_ms_per_iter"], 2),
        "torch_tokens_per_sec": round(torch_result["tokens_per_sec"]),
        "jaxlab_step_ms": round(1000 * step["step_time_median_s"], 2),
        "jaxlab_step_tokens_per_sec": round(step["tokens_per_sec"]),
        "jaxlab_loop_tokens_per_sec": round(statistics.median(rates)) if rates else None,
        "jaxlab_loop_ms_per_iter": round(1000 * tokens / statistics.median(rates), 2)
        if rates
        else None,
        "ratio_step": round(step["tokens_per_sec"] / torch_result["tokens_per_sec"], 3),
        "ratio_loop": round(statistics.median(rates) / torch_result["tokens_per_sec"], 3)
        if rates
        else None,
    }


def lockstep(torch_python: str, iters: int) -> dict[str, Any]:
    """Same initial weights and batches in both loops; compares the per-step training losses."""
    import jax
    import numpy as np
    from flax import traverse_util

    import experiment
    from runtime import distributed

    config = _config()
    config.steps_per_dispatch = 1  # one step per call, to read every step's loss
    run = experiment.build_run(config)
    compiled = run.compiled
    state = run.init_state()
    flat = traverse_util.flatten_dict(distributed.to_host(state.params), sep="/")
    weights = {k: np.asarray(v) for k, v in flat.items()}
    state = compiled.from_global(state)
    batch_iter = run.datasets.train_batches(0)
    batches, losses = [], []
    with compiled.context():
        for _ in range(iters):
            batch = next(batch_iter)
            batches.append(np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1))
            state, metrics = compiled.train_step(state, compiled.put_train_batch(batch))
            losses.append(float(jax.device_get(metrics["loss"])))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "init.npz")
        np.savez(path, batches=np.stack(batches), **weights)
        torch_result = run_torch(torch_python, f"--init_npz={path}",
                                 f"--max_iters={iters}")  # fmt: skip
    torch_losses = torch_result["train_losses"]
    gaps = [abs(a - b) for a, b in zip(losses, torch_losses, strict=True)]
    marks = sorted({0, 1, 10, 50, 100, iters - 1} & set(range(iters)))
    return {
        "mode": "lockstep",
        "iters": iters,
        "losses": {i: [round(losses[i], 5), round(torch_losses[i], 5)] for i in marks},
        "max_abs_gap_first_10": max(gaps[:10]),
        "max_abs_gap": max(gaps),
        "mean_loss_last_50_jaxlab": float(np.mean(losses[-50:])),
        "mean_loss_last_50_torch": float(np.mean(torch_losses[-50:])),
    }


def loss(torch_python: str, seeds: list[int]) -> dict[str, Any]:
    """Full CPU-config runs of both loops for every seed; validation loss on 20 and 500 batches."""
    import evaluate as evaluate_lib
    import train

    rows = []
    for seed in seeds:
        t = run_torch(torch_python, f"--seed={seed}", "--final_eval_iters=500")
        with tempfile.TemporaryDirectory() as workdir:
            final = train.train_and_evaluate(_config(seed), workdir)
            big = evaluate_lib.evaluate_checkpoint(workdir, "val", eval_steps=500)
        rows.append({
            "seed": seed,
            "torch_val_20": round(t["val_loss"], 4),
            "torch_val_500": round(t["val_loss_final_eval"], 4),
            "jaxlab_val_20": round(float(final["val_loss"]), 4),
            "jaxlab_val_500": round(float(big["loss"]), 4),
        })  # fmt: skip
    mean = lambda key: round(statistics.mean(r[key] for r in rows), 4)  # noqa: E731
    return {"mode": "loss", "runs": rows,
            **{f"mean_{k}": mean(k) for k in rows[0] if k != "seed"}}  # fmt: skip


class _IntListParser(flags.ListParser):
    """Comma-separated integers: --seeds=1337,1,2."""

    def parse(self, argument: str | list[int]) -> list[int]:
        return [int(x) for x in super().parse(argument)]


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The script's flags (defined only when run as a script: importing it defines none)."""
    flags.DEFINE_enum("mode", "speed", ["speed", "lockstep", "loss"], "What to compare.")
    flags.DEFINE_integer("iters", 300, "Training iterations (speed, lockstep).")
    flags.DEFINE(_IntListParser(), "seeds", [1337], "comma-separated seeds (loss).",
                 serializer=flags.CsvListSerializer(","))  # fmt: skip
    flags.DEFINE_string("torch_python", os.environ.get(
        "TORCH_PYTHON", os.path.join(REPO_ROOT, ".venv-torch", "bin", "python")),
        "Python of an environment with torch ($TORCH_PYTHON).")  # fmt: skip


def main(argv: list[str]) -> None:
    """Runs the requested comparison; prints a table, then one JSON line."""
    del argv
    if FLAGS.mode == "loss":
        result = loss(FLAGS.torch_python, FLAGS.seeds)
    else:
        result = {"speed": speed, "lockstep": lockstep}[FLAGS.mode](FLAGS.torch_python, FLAGS.iters)
    for key, value in result.items():
        print(f"{key:28s} {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    define_flags()
    cli.run(main)
