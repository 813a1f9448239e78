"""Synthetic data: random batches of the shapes a config implies (`config.dataset = "synthetic"`).

For benchmarks, ahead-of-time compilation and tests, which need a run's shapes but not its data
(MaxText's `dataset_type=synthetic`). It is a `data.Datasets` like the real pipelines, built by
`input_pipeline.get_datasets`, so `experiment.build_run(config)` takes it as any other source:

  task 'lm':             inputs int32 [batch, model.block_size], uniform in [0, model.vocab_size);
                         targets the same windows shifted by one token
  task 'classification': inputs uint8 [batch, *synthetic.image_shape], uniform in [0, 256);
                         targets int32 [batch], uniform in [0, model.num_classes)

The vocabulary and the class count are the model's (config.model.vocab_size / num_classes, else
the model file's default): no tokenizer or label set could disagree with them. As in the real
pipelines, every training batch is a pure function of (seed, step, process): each example is
hashed from (seed, its number in the global batch sequence), so resuming needs no state and N
processes (each given `batch_size // process_count` examples) see exactly one process's batch.
With steps_per_dispatch k > 1 the train iterator yields stacks [k, batch, ...] aligned to
multiples of k. Eval batches carry a float32 'mask': language models get `eval_steps` batches of
fixed windows per split ('train', 'val'); classifiers get `synthetic.num_eval_examples`
examples of 'test' once, the last batch padded and masked. No TensorFlow, no files.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np

from data import Batch, Datasets

NAME = "synthetic"  # the config.dataset that selects this source
DEFAULT_EVAL_STEPS = 20  # language models, when config.eval_steps is None (as data.text_windows)
# One stream of random numbers per use: training, each eval split, and the labels beside pixels.
_STREAMS = {"train": 0, "val": 1, "test": 2, "train_eval": 3}
_LABELS = 1 << 32  # added to a stream: a classifier's labels, independent of its pixels

_M64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's increment (2^64 / golden ratio, odd)
_ODD = np.uint64(0xD1B54A32D192ED03)  # a second odd constant, for positions inside an example


def is_synthetic(config: ml_collections.ConfigDict) -> bool:
    """Whether `config.dataset` selects this source."""
    return config.dataset == NAME


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (Steele, Lea and Flood 2014): uint64 -> well-mixed uint64,
    elementwise. numpy's uint64 arithmetic wraps modulo 2^64, as the function needs."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def random_bits(seed: int, stream: int, examples: np.ndarray, size: int) -> np.ndarray:
    """uint64 [*examples.shape, size]: `size` random words for each example number in
    `examples` (int64, any shape); word j of example e is a pure function of (seed, stream, e,
    j), so any slice of examples can be drawn alone (a process's share, a resumed step)."""
    key = _mix(np.asarray([(seed * 0x9E3779B97F4A7C15 + stream) & _M64], np.uint64))
    rows = _mix(key + (np.asarray(examples).astype(np.uint64) + np.uint64(1)) * _GOLDEN)
    positions = (np.arange(size, dtype=np.uint64) + np.uint64(1)) * _ODD
    return _mix(rows[..., None] ^ positions)


def _below(bits: np.ndarray, high: int) -> np.ndarray:
    """int64 in [0, high) from uint64 bits (Lemire's multiply-shift on the top 32 bits; high
    below 2^31 here, so the bias is under 2^-32 and the product fits 64 bits)."""
    return (((bits >> np.uint64(32)) * np.uint64(high)) >> np.uint64(32)).astype(np.int64)


def _model_field(config: ml_collections.ConfigDict, field: str) -> Any:
    """config.model.<field>, else the default of the model file's `Model` (None if neither)."""
    import models

    if config.model.get(field) is not None:
        return config.model[field]
    for f in dataclasses.fields(models.model_class(config.model.name)):
        if f.name == field and f.default is not dataclasses.MISSING:
            return f.default
    return None


def _error(message: str) -> Exception:
    import config_validation  # when needed, as input_pipeline does: it sits above data/

    return config_validation.ConfigError(message)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool) and value > 0


def check_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The shapes `config` asks of synthetic data, checked: {'example_shape', 'dtype', 'high',
    'num_classes'} ('high': the exclusive bound of the input values).

    Raises config_validation.ConfigError, one line naming the field and the fix."""
    s = config.synthetic
    for key in ("num_train_examples", "num_eval_examples"):
        if not _positive_int(s[key]):
            raise _error(f"config.synthetic.{key}={s[key]!r} must be a positive integer.")
    processes = jax.process_count()
    for key in ("batch_size", "eval_batch_size"):
        if config[key] % processes:
            raise _error(f"config.{key}={config[key]} does not divide over {processes} "
                         f"processes: use a multiple of {processes}.")  # fmt: skip
    if config.task == "lm":
        block, vocab = _model_field(config, "block_size"), _model_field(config, "vocab_size")
        if not _positive_int(block):
            raise _error(f"config.model.block_size={block!r} must be a positive integer: "
                         "synthetic tokens take their window length from it.")  # fmt: skip
        if not _positive_int(vocab) or vocab >= 2**31:
            raise _error(f"config.model.vocab_size={vocab!r} must be a positive integer below "
                         "2^31: synthetic tokens are drawn from [0, vocab_size).")  # fmt: skip
        return {"example_shape": (int(block),), "dtype": np.int32, "high": int(vocab),
                "num_classes": 0}  # fmt: skip
    shape = s.image_shape
    if not (isinstance(shape, tuple | list) and shape and all(map(_positive_int, shape))):
        raise _error(
            f"config.synthetic.image_shape={shape!r} must be the shape of one image, positive "
            "integers, e.g. --config.synthetic.image_shape=32,32,3."
        )
    classes = _model_field(config, "num_classes")
    if not _positive_int(classes) or classes >= 2**31:
        raise _error(f"config.model.num_classes={classes!r}: synthetic labels need the model's "
                     f"class count, a positive integer; set config.model.num_classes.")  # fmt: skip
    return {"example_shape": tuple(int(d) for d in shape), "dtype": np.uint8, "high": 256,
            "num_classes": int(classes)}  # fmt: skip


def _examples(seed: int, stream: int, numbers: np.ndarray, spec: dict[str, Any],
              task: str) -> Batch:  # fmt: skip
    """The examples with global numbers `numbers` (int64 [...]) as a batch shaped [..., *]."""
    shape = spec["example_shape"]
    if task == "lm":  # one window of block_size + 1 tokens: inputs and targets overlap
        window = _below(random_bits(seed, stream, numbers, shape[0] + 1), spec["high"])
        window = window.astype(np.int32)
        return {"inputs": window[..., :-1], "targets": window[..., 1:]}
    # Eight pixels per random word (little-endian bytes: the same images on every machine).
    size = math.prod(shape)
    words = random_bits(seed, stream, numbers, -(-size // 8)).astype("<u8")
    pixels = words.view(np.uint8)[..., :size]
    labels = _below(random_bits(seed, stream + _LABELS, numbers, 1), spec["num_classes"])
    return {
        "inputs": pixels.reshape(numbers.shape + shape),
        "targets": labels[..., 0].astype(np.int32),
    }


def _process_rows(global_batch: int) -> np.ndarray:
    """Positions of this process's examples in a global batch (int64 [local])."""
    local = global_batch // jax.process_count()
    return jax.process_index() * local + np.arange(local, dtype=np.int64)


def _train_batches(config: ml_collections.ConfigDict, spec: dict[str, Any]) -> Callable[..., Any]:
    global_batch, seed, task = int(config.batch_size), int(config.seed), config.task

    def train_batches(start_step: int = 0, steps_per_dispatch: int = 1,
                      stop_step: int = 2**62) -> Iterator[Batch]:  # fmt: skip
        """Batches of steps start_step .. stop_step - 1; with k = steps_per_dispatch > 1, stacks
        [k, batch, ...] of consecutive steps starting on multiples of k (the first shorter when
        start_step is not one, the last cut by stop_step), as the real pipelines stack them."""
        k, step, rows = int(steps_per_dispatch), int(start_step), _process_rows(global_batch)
        while step < stop_step:
            end = min((step // k + 1) * k, stop_step)
            numbers = np.arange(step, end, dtype=np.int64)[:, None] * global_batch + rows
            stack = _examples(seed, _STREAMS["train"], numbers, spec, task)
            yield {name: x[0] for name, x in stack.items()} if k == 1 else stack
            step = end

    return train_batches


def _eval_batches(config: ml_collections.ConfigDict, spec: dict[str, Any], splits: tuple[str, ...],
                  default: str) -> Callable[..., Any]:  # fmt: skip
    global_batch, seed, task = int(config.eval_batch_size), int(config.seed), config.task
    if task == "lm":  # eval_steps full batches of fixed windows, every example counted
        num_batches = DEFAULT_EVAL_STEPS if config.eval_steps is None else int(config.eval_steps)
        num_examples = num_batches * global_batch
    else:  # every example of the split once: the last batch padded, its padding masked
        num_examples = int(config.synthetic.num_eval_examples)
        num_batches = -(-num_examples // global_batch)

    def eval_batches(split: str = default) -> Iterator[Batch]:
        """The same padded, masked batches of `split` at every evaluation."""
        if split not in splits:
            raise ValueError(f"synthetic {task} data has the splits {list(splits)}, not {split!r}.")
        stream = _STREAMS["train_eval" if split == "train" else split]
        rows = _process_rows(global_batch)
        for index in range(num_batches):
            numbers = index * global_batch + rows
            batch = _examples(seed, stream, np.minimum(numbers, num_examples - 1), spec, task)
            batch["mask"] = (numbers < num_examples).astype(np.float32)
            yield batch

    return eval_batches


def synthetic_datasets(config: ml_collections.ConfigDict) -> Datasets:
    """The synthetic train and eval data of `config` (see the module docstring for shapes).

    Raises config_validation.ConfigError for a field that cannot describe the data."""
    spec = check_config(config)
    # As the real pipelines: a language model evaluates 'train' and 'val' windows; a classifier
    # evaluates 'test', and 'train' on request (evaluate.py --split=train).
    lm = config.task == "lm"
    splits, default = (("train", "val"), "val") if lm else (("test", "train"), "test")
    return Datasets(
        train_batches=_train_batches(config, spec),
        eval_batches=_eval_batches(config, spec, splits, default),
        eval_splits=splits if lm else ("test",),
        num_train_examples=int(config.synthetic.num_train_examples),
        example_input=np.zeros((1,) + spec["example_shape"], spec["dtype"]),
        num_classes=spec["num_classes"],
        tokenizer=None,
    )
