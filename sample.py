"""Samples text from a trained GPT checkpoint (like nanoGPT's sample.py).

    python sample.py --workdir=runs/shakespeare_char --prompt="ROMEO:" --num_samples=3

The run is restored with experiment.restore_run (verified, on the run's own mesh where it fits).
Any number of tokens can be generated: past the model's block_size, each is conditioned on the
last block_size tokens (sampling.generate).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import jax
import numpy as np
from absl import flags

import experiment
import sampling
from runtime import cli, distributed

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined only when run as a script: importing sample defines none)."""
    flags.DEFINE_string("workdir", None, "Training run directory with checkpoints and tokenizer.")
    flags.DEFINE_string("prompt", "\n", "Text to continue.")
    flags.DEFINE_integer("num_samples", 3, "Number of samples, generated as one batch.")
    flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate per sample.")
    flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 = greedy.")
    flags.DEFINE_integer("top_k", 200, "Keep only the k most likely tokens (0 = all).")
    flags.DEFINE_float("top_p", None, "Nucleus sampling: keep the smallest set with this mass.")
    flags.DEFINE_integer("seed", 0, "Random seed.")
    flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the latest).")
    flags.mark_flag_as_required("workdir")


def main(argv: Sequence[str]) -> None:
    """Restores the run, generates `num_samples` continuations, prints them and the speed."""
    del argv
    restored = experiment.restore_run(FLAGS.workdir, FLAGS.step)
    if restored.config.task != "lm":
        raise cli.UserError(f"{FLAGS.workdir} is a {restored.config.task} run; sample.py needs a "
                            "language model (config.task='lm').")  # fmt: skip
    tokenizer = restored.tokenizer
    try:
        ids = np.asarray(tokenizer.encode(FLAGS.prompt), np.int32)
    except ValueError as e:
        raise cli.UserError(f"--prompt cannot be encoded by this run's tokenizer: {e}") from e
    if ids.size == 0:
        raise cli.UserError("--prompt encodes to no tokens; give at least one character.")
    prompt = np.tile(ids[None, :], (FLAGS.num_samples, 1))
    rng = jax.random.key(FLAGS.seed)

    def run() -> np.ndarray:
        """One generation call, blocked until the tokens are on the host."""
        out = sampling.generate(
            restored.model,
            restored.params,
            prompt,
            rng,
            FLAGS.max_new_tokens,
            temperature=FLAGS.temperature,
            top_k=FLAGS.top_k or None,
            top_p=FLAGS.top_p,
        )
        return distributed.to_host(out)

    try:
        start = time.perf_counter()
        run()  # warm-up: compiles (and runs once)
        warmup_s = time.perf_counter() - start
    except ValueError as e:
        raise cli.UserError(str(e)) from e
    start = time.perf_counter()
    tokens = run()
    elapsed = time.perf_counter() - start

    if jax.process_index() != 0:
        return
    for i, row in enumerate(tokens):
        print(f"---------- sample {i} ----------")
        print(tokenizer.decode(row))
    new_tokens = FLAGS.num_samples * FLAGS.max_new_tokens
    print("----------")
    print(f"compile (warm-up minus run): {max(warmup_s - elapsed, 0.0):.2f} s")
    print(
        f"generated {new_tokens} tokens in {elapsed:.3f} s: {new_tokens / elapsed:,.1f} tokens/s "
        f"({FLAGS.num_samples} samples x {FLAGS.max_new_tokens} tokens)"
    )
    block_size = int(restored.model.block_size)
    cached = sampling.num_cached_tokens(ids.size, FLAGS.max_new_tokens, block_size)
    if cached < FLAGS.max_new_tokens:
        print(
            f"{cached} tokens per sample used the KV cache; the other "
            f"{FLAGS.max_new_tokens - cached}, past the {block_size}-token window, each took a "
            f"full forward pass over the last {block_size} tokens"
        )


if __name__ == "__main__":
    define_flags()
    cli.run(main)
