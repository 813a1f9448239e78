"""The input pipelines a config asks for; knows data, nothing about models.

`get_datasets(config)` returns a `Datasets`: images from TFDS through tf.data (image_data.py,
the only place TensorFlow is imported), language-model text from prepared token shards through
np.memmap (text_data.py, no TensorFlow). Every training batch is a pure function of (seed, step,
process), so resuming needs no iterator state and N processes see exactly one process's batch.

A language model's `config.dataset` is a prepared data directory (prepare_data.py), or a corpus
name ('tiny_shakespeare', 'kjv', 'tfds:NAME') or a text path, which is prepared once, on first
use, into the tokens folder (data_setup.default_tokens_dir) with `config.tokenizer`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np

import data_setup
import workdir_files

Batch = dict[str, np.ndarray]


@dataclasses.dataclass
class Datasets:
    """What train.py needs to know about the data."""

    # (start_step, steps_per_dispatch=1, stop_step) -> iterator of process-local batches
    # ([steps, batch, ...] stacks when steps_per_dispatch > 1)
    train_batches: Any
    eval_batches: Any  # (split: str) -> finite iterable of process-local padded, masked batches
    eval_splits: tuple[str, ...]
    num_train_examples: int  # examples (or tokens, for lm) in the training split
    example_input: np.ndarray  # one input, batch of 1, for model.init
    num_classes: int = 0  # classification only
    tokenizer: Any = None  # lm only

    def input_spec(self) -> workdir_files.InputSpec:
        """What a model needs to know about this data (recorded in each run's workdir)."""
        return workdir_files.InputSpec(
            self.example_input, self.num_classes, self.num_train_examples
        )


def get_datasets(config: ml_collections.ConfigDict) -> Datasets:
    """Builds the train and eval pipelines that `config.task` and `config.dataset` ask for."""
    if config.task == "classification":
        import image_data  # tf.data: only image runs import TensorFlow

        return image_data.image_datasets(config)
    if config.task == "lm":
        return _text_datasets(config)
    raise ValueError(f"config.task={config.task!r}: use 'classification' or 'lm'.")


# ----------------------------------------------------------------------------- text


def prepared_dir(config: ml_collections.ConfigDict) -> str:
    """The prepared directory `config.dataset` stands for, preparing it first if needed.

    Raises config_validation.ConfigError when a prepared directory's tokenizer or validation
    fraction differs from what the config asks (an option must never do nothing silently)."""
    import config_validation
    import prepare_data

    dataset = os.path.expanduser(config.dataset)
    if os.path.isfile(os.path.join(dataset, prepare_data.MANIFEST)):
        manifest = prepare_data.read_manifest(dataset)
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
                "Set the config to match, or prepare the corpus again with prepare_data.py."
            )
        return dataset
    name = _prepared_name(config)
    out = os.path.join(data_setup.default_tokens_dir(config.data_dir), name)
    manifest_path = os.path.join(out, prepare_data.MANIFEST)
    if os.path.isfile(manifest_path) and jax.process_index() == 0:
        stamps = prepare_data.read_manifest(out).get("source_files", [])
        files = [stamp["path"] for stamp in stamps]
        if not all(map(os.path.isfile, files)) or prepare_data.source_stamps(files) != stamps:
            aside = f"{out}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
            os.rename(out, aside)  # a cache of the source: made again, the old one kept aside
            print(f"{config.dataset} changed since it was prepared; preparing it again (the "
                  f"old tokens are in {aside}).", flush=True)  # fmt: skip
    if not os.path.isfile(manifest_path):
        if jax.process_index() == 0:
            print(f"Preparing {config.dataset} with the {config.tokenizer} tokenizer into {out} "
                  "(once; later runs read it from there).", flush=True)  # fmt: skip
        prepare_data.prepare(
            config.dataset, config.tokenizer, out, vocab_size=config.tokenizer_vocab_size,
            val_fraction=config.val_fraction, data_dir=config.data_dir, progress=False,
        )  # fmt: skip
    return out


def _prepared_name(config: ml_collections.ConfigDict) -> str:
    """A folder name for `config.dataset` prepared with the config's tokenizer and split."""
    source = config.dataset.strip()
    if source.lower() in data_setup.TEXT_CORPUS_NAMES or source.lower().startswith("tfds:"):
        stem = source.lower().replace(":", "_")
    else:  # a path: its name and a digest of where it is
        path = os.path.abspath(os.path.expanduser(source))
        digest = hashlib.sha256(path.encode()).hexdigest()[:8]
        stem = f"{os.path.basename(path.rstrip('/')).replace('*', 'x')}-{digest}"
    tokenizer = config.tokenizer
    if tokenizer.endswith(".json"):
        tokenizer = "hf-" + hashlib.sha256(os.path.abspath(tokenizer).encode()).hexdigest()[:8]
    parts = [stem, tokenizer]
    if config.tokenizer_vocab_size is not None:
        parts.append(f"v{config.tokenizer_vocab_size}")
    if config.val_fraction != 0.1:
        parts.append(f"val{config.val_fraction:g}")
    return "-".join(parts)


def _text_datasets(config: ml_collections.ConfigDict) -> Datasets:
    import text_data

    splits = text_data.TextSplits(prepared_dir(config), int(config.model.block_size))
    eval_steps = text_data.DEFAULT_EVAL_STEPS if config.eval_steps is None else config.eval_steps
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
