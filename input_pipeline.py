"""The input pipelines a config asks for: the one face of the `data` package.

`get_datasets(config)` returns a `data.Datasets`: images from TFDS through tf.data
(data/images.py, the only place TensorFlow is imported), language-model text from prepared token
shards (data/text_windows.py, no TensorFlow), or a synthetic source
(data/synthetic.py). Every training batch is a pure function of (seed, step, process), so resuming
needs no iterator state and N processes see exactly one process's batch. It reads the config's
data fields and, for the shape of an example, `config.model.block_size` (a language model's
window) or the dataset's own image shape.

A language model's `config.dataset` is a prepared data directory (`python -m data.prepare`), or a
corpus name ('tiny_shakespeare', 'kjv', 'tfds:NAME') or a text path, which is prepared once, on
first use, into the tokens folder (`data.sources.default_tokens_dir`) with `config.tokenizer`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from typing import Any

import ml_collections
import numpy as np

from data import Batch, Datasets, synthetic


def get_datasets(config: ml_collections.ConfigDict) -> Datasets:
    """Builds the train and eval pipelines that `config.task` and `config.dataset` ask for.

    Raises config_validation.ConfigError for data fields that cannot work, and
    data.sources.DatasetUnavailableError for data that is missing."""
    if synthetic.is_synthetic(config):  # no files, no TensorFlow
        return synthetic.synthetic_datasets(config)
    if config.task == "classification":
        from data import images  # tf.data: only image runs import TensorFlow

        return images.image_datasets(config)
    if config.task == "lm":
        return _text_datasets(config)
    raise ValueError(f"config.task={config.task!r}: use 'classification' or 'lm'.")


# ----------------------------------------------------------------------------- text


def prepared_dir(config: ml_collections.ConfigDict) -> str:
    """The prepared directory `config.dataset` stands for, preparing it first if needed.

    Raises config_validation.ConfigError when a prepared directory's tokenizer or validation
    fraction differs from what the config asks (an option must never do nothing silently)."""
    import config_validation
    from data import prepare

    dataset = os.path.expanduser(config.dataset)
    if os.path.isfile(os.path.join(dataset, prepare.MANIFEST)):
        manifest = prepare.read_manifest(dataset)
        kind, size = manifest["tokenizer"]["kind"], manifest["tokenizer"]["vocab_size"]
        differ = []
        if kind != config.tokenizer and manifest["tokenizer"]["argument"] != config.tokenizer:
            differ.append(f"config.tokenizer={config.tokenizer!r} (the data's is {kind!r})")
        if config.tokenizer_vocab_size is not None and config.tokenizer_vocab_size != size:
            differ.append(f"config.tokenizer_vocab_size={config.tokenizer_vocab_size} (the data's "
                          f"is {size})")  # fmt: skip
        if abs(manifest["val_fraction"] - config.val_fraction) > 1e-12:
            differ.append(f"config.val_fraction={config.val_fraction} (the data's is "
                          f"{manifest['val_fraction']})")  # fmt: skip
        if differ:
            raise config_validation.ConfigError(
                f"{dataset} was prepared otherwise than the config says: {'; '.join(differ)}. "
                "Set the config to match, or prepare the corpus again (`python -m data.prepare`)."
            )
        return dataset
    return prepare.prepared_cache(
        config.dataset, config.tokenizer, vocab_size=config.tokenizer_vocab_size,
        val_fraction=config.val_fraction, data_dir=config.data_dir,
    )  # fmt: skip


def _text_datasets(config: ml_collections.ConfigDict) -> Datasets:
    import config_validation
    from data import prepare, text_windows

    directory = prepared_dir(config)
    packing = bool(config.get("packing", False))
    if packing and prepare.read_manifest(directory).get("document_separator") is None:
        raise config_validation.ConfigError(
            f"config.packing=True needs documents, but {directory} has no end-of-text "
            f"separator between them (its {config.tokenizer!r} tokenizer has none): use a "
            "tokenizer with <|endoftext|> (--config.tokenizer=bpe or a tokenizer.json), or "
            "set config.packing=False."
        )
    splits = text_windows.TextSplits(directory, int(config.model.block_size), packing=packing)
    eval_steps = text_windows.DEFAULT_EVAL_STEPS if config.eval_steps is None else config.eval_steps
    lo, hi = splits.splits["train"]

    def train_batches(start_step: int = 0, steps_per_dispatch: int = 1,
                      stop_step: int = 2**62) -> Iterator[Batch]:  # fmt: skip
        return splits.train_batches(config.seed, config.batch_size, start_step,
                                    steps_per_dispatch, stop_step)  # fmt: skip

    return Datasets(
        train_batches=train_batches,
        eval_batches=functools.partial(
            _eval, splits, config.seed, config.eval_batch_size, int(eval_steps)
        ),
        eval_splits=("train", "val"),
        num_train_examples=hi - lo,
        example_input=np.zeros((1, int(config.model.block_size)), np.int32),
        tokenizer=splits.tokenizer,
    )


def _eval(splits: Any, seed: int, batch: int, steps: int, split: str = "val") -> Iterator[Batch]:
    if split not in splits.splits:
        raise ValueError(
            f"{splits.directory} has the splits {sorted(splits.splits)}, not {split!r}."
        )
    return splits.eval_batches(split, seed, batch, steps)
