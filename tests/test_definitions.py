"""Every computation matches its definition: gradient accumulation with
BatchNorm, the random language-model windows, weight-decay groups, the logged learning rate."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import experiment
import optim
from configs import fashion_mnist_cnn_strong, shakespeare_char_cpu
from data import sources, text_windows


def _bn_config(k: int):
    config = fashion_mnist_cnn_strong.get_config()
    config.model.update({"conv_features": (8, 8), "dense_features": (16,), "dropout_rate": 0.0})
    config.batch_size, config.grad_accum_steps = 32, k
    config.label_smoothing = 0.0
    config.dataset = "synthetic"  # uint8 images [32, 28, 28, 1], labels in [0, 10)
    return config


def test_accumulation_updates_batchnorm_statistics_once_per_step():
    """One optimizer step on 4 microbatches moves BatchNorm's running statistics as one step on
    the whole batch does: the first layer's running mean exactly (its inputs are the same, and
    the mean of the microbatch means is the batch mean), the deeper ones closely (each
    microbatch is normalized by its own statistics). Before, they moved four times."""
    stats = {}
    for k in (1, 4):
        run = experiment.build_run(_bn_config(k))
        batch = next(run.datasets.train_batches())  # the same batch for both runs
        state = run.init_state()
        with run.compiled.context():
            new, _ = run.compiled.train_step(state, run.compiled.put_train_batch(batch))
        stats[k] = jax.device_get(new.model_state["batch_stats"])
    first, deeper = stats[1]["bn_0_0"], stats[4]["bn_0_0"]
    np.testing.assert_allclose(deeper["mean"], first["mean"], rtol=1e-5, atol=1e-7)
    # Running statistics start at mean 0, var 1; after one update each moved by (1 - momentum)
    # times the batch statistic, once: so by about as much with 4 microbatches as with 1.
    for name in ("bn_0_0", "bn_1_0"):
        for key, start in (("mean", 0.0), ("var", 1.0)):
            moved_one = stats[1][name][key] - start
            moved_four = stats[4][name][key] - start
            np.testing.assert_allclose(moved_four, moved_one, rtol=0.25, atol=1e-3)


def _prepared(directory, train_tokens: int, val_tokens: int = 20) -> str:
    """A prepared dataset whose token i is i: train = the first `train_tokens`, then val."""
    import hashlib
    import json

    from data import manifest as shards
    from data import tokenization

    tokens = np.arange(train_tokens + val_tokens, dtype=np.uint16)
    os.makedirs(os.path.join(directory, "shards"))
    tokens.tofile(os.path.join(directory, "shards", "00000.bin"))
    tokenization.ByteTokenizer().save(str(directory))
    manifest = {
        "format": shards.FORMAT, "dtype": "uint16", "val_fraction": 0.1,
        "tokenizer": {"kind": "byte", "argument": "byte", "vocab_size": 256, "files": []},
        "splits": {"train": [0, train_tokens], "val": [train_tokens, len(tokens)]},
        "shards": [{"file": "shards/00000.bin", "tokens": len(tokens),
                    "sha256": hashlib.sha256(tokens.tobytes()).hexdigest()}],
    }  # fmt: skip
    with open(os.path.join(directory, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return str(directory)


def _window_starts(tmp_path, train_tokens: int, block_size: int, steps: int = 400):
    """The first token (= the start) of every training window drawn over `steps` steps."""
    splits = text_windows.TextSplits(_prepared(tmp_path / "data", train_tokens), block_size)
    batches = splits.train_batches(seed=0, global_batch=16, stop_step=steps)
    return np.concatenate([b["inputs"][:, 0] for b in batches])


def test_every_valid_window_start_is_drawn_with_equal_probability(tmp_path):
    """10 tokens, block 8: starts 0 and 1 are valid (the last window's last target is token 9)
    and each is drawn about half the time; exactly block_size + 1 tokens hold one window."""
    starts = _window_starts(tmp_path / "a", 10, 8)
    counts = np.bincount(starts, minlength=2)
    assert len(counts) == 2 and counts.sum() == 6400
    assert abs(counts[0] - 3200) < 4 * np.sqrt(6400 * 0.25)  # within 4 standard deviations
    assert set(_window_starts(tmp_path / "b", 9, 8)) == {0}
    many = np.bincount(_window_starts(tmp_path / "c", 40, 8), minlength=32)  # 32 valid starts
    assert len(many) == 32 and many.min() > 0


def test_a_split_shorter_than_one_window_is_refused(tmp_path):
    with pytest.raises(sources.DatasetUnavailableError, match="too few for one window of 9"):
        _window_starts(tmp_path, 8, 8)


def test_weight_decay_never_touches_biases_or_norms_whatever_their_rank():
    """With use_bias=True the attention's query/key/value biases are [heads, head_dim]: still
    not decayed; kernels and embeddings are."""
    config = shakespeare_char_cpu.get_config()
    config.model.update({"use_bias": True, "num_layers": 1, "block_size": 8, "embed_dim": 16,
                         "num_heads": 2})  # fmt: skip
    config.weight_decay, config.learning_rate, config.warmup_steps = 0.5, 0.1, 0
    config.lr_schedule = "constant"
    config.dataset = "synthetic"
    run = experiment.build_run(config)
    state = jax.device_get(run.init_state())
    zero = jax.tree.map(jnp.zeros_like, state.params)
    updates, _ = run.tx.update(zero, state.opt_state, state.params)
    flat = {
        "/".join(str(k.key) for k in p): u for p, u in jax.tree_util.tree_leaves_with_path(updates)
    }
    assert flat["h_0/attn/query/bias"].ndim == 2
    for path, update in flat.items():
        decayed = bool(np.any(np.asarray(update) != 0))
        assert decayed == (path.split("/")[-1] not in ("bias", "scale")), path


def test_the_logged_learning_rate_is_the_one_the_update_used():
    """A skipped non-finite update does not advance the optimizer's schedule: the next update
    uses (and the step logs) the rate of the count, not of the train step."""
    config = shakespeare_char_cpu.get_config()
    config.skip_nonfinite_steps, config.warmup_steps, config.lr_schedule = True, 10, "constant"
    schedule = optim.learning_rate_schedule(config, 100)
    tx = optim.build_optimizer(config, schedule)
    params = {"w": jnp.ones((2, 2))}
    opt_state = tx.init(params)
    for grads in ({"w": jnp.full((2, 2), jnp.nan)}, {"w": jnp.ones((2, 2))}):
        count = int(optim.schedule_count(opt_state, -1))
        _, opt_state = tx.update(grads, opt_state, params)
    assert count == 0  # the second update still used the first step's rate
    assert int(optim.schedule_count(opt_state, -1)) == 1
    assert isinstance(opt_state, optax.ApplyIfFiniteState)
