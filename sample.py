"""Samples text from a trained GPT checkpoint (like nanoGPT's sample.py).

python sample.py --workdir=runs/shakespeare_char --prompt="ROMEO:" --num_samples=3
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import jax
import numpy as np
from absl import app, flags, logging

import checkpointing
import models
import sampling
import tokenizers_lib

FLAGS = flags.FLAGS
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
    """Loads the checkpoint, generates `num_samples` continuations, prints them and the speed."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:  # Orbax logs at INFO; keep the samples readable
        logging.set_verbosity(logging.WARNING)
    config, params = checkpointing.load_for_inference(FLAGS.workdir, FLAGS.step)
    tokenizer = tokenizers_lib.load_tokenizer(FLAGS.workdir)
    try:
        ids = np.asarray(tokenizer.encode(FLAGS.prompt), np.int32)
    except ValueError as e:
        raise app.UsageError(f"--prompt cannot be encoded by this run's tokenizer: {e}") from e
    if ids.size == 0:
        raise app.UsageError("--prompt encodes to no tokens; give at least one character.")

    model = models.build_model(config)
    prompt = np.tile(ids[None, :], (FLAGS.num_samples, 1))
    rng = jax.random.key(FLAGS.seed)

    def run() -> np.ndarray:
        """One generation call, blocked until the tokens are on the host."""
        out = sampling.generate(
            model,
            params,
            prompt,
            rng,
            FLAGS.max_new_tokens,
            temperature=FLAGS.temperature,
            top_k=FLAGS.top_k or None,
            top_p=FLAGS.top_p,
        )
        return np.asarray(jax.device_get(out))

    try:
        start = time.perf_counter()
        run()  # warm-up: compiles (and runs once)
        warmup_s = time.perf_counter() - start
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    start = time.perf_counter()
    tokens = run()
    elapsed = time.perf_counter() - start

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


if __name__ == "__main__":
    app.run(main)
