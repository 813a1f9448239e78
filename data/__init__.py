"""Data for jaxlab's runs, behind `input_pipeline.get_datasets` (the one face of this package).

  sources.py       where raw data comes from: Fashion-MNIST, Tiny Shakespeare, the KJV text,
                   TFDS text sets; corpus names; the data and tokens folders
  prepare.py       tokenizes a corpus once into token shards (`python -m data.prepare`)
  text_windows.py  language-model batches read from the shards by pread (no TensorFlow)
  images.py        image batches through tf.data (the only module that imports TensorFlow)
  tokenization.py  the tokenizers (char, byte, SentencePiece, BPE, a tokenizer.json), their files
  synthetic.py     random batches of a config's shapes, for benchmarks and compilation
  __main__.py      `python -m data` (`make data`): prepares everything the configs name

Every module here imports downwards only (sources <- tokenization <- prepare <- text_windows).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """What building a model needs to know about its data, without the data.

    example_input: zeros [1, ...] of the model's input dtype (uint8 pixels [1, H, W, C] for image
    classifiers, int32 tokens [1, block_size] for language models), for `model.init`.
    num_classes: classes of a classifier (0 for language models).
    num_train_examples: examples (tokens, for language models) in the training split; it sets the
    length of an epoch-based schedule.
    """

    example_input: np.ndarray
    num_classes: int = 0
    num_train_examples: int = 0

    def to_json(self) -> dict[str, Any]:
        """The JSON form written to input_spec.json."""
        return {
            "example_input": {
                "shape": list(self.example_input.shape),
                "dtype": str(self.example_input.dtype),
            },
            "num_classes": int(self.num_classes),
            "num_train_examples": int(self.num_train_examples),
        }

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> InputSpec:
        """The inverse of `to_json`."""
        example = record["example_input"]
        return cls(
            example_input=np.zeros(tuple(example["shape"]), np.dtype(example["dtype"])),
            num_classes=int(record["num_classes"]),
            num_train_examples=int(record["num_train_examples"]),
        )


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

    def input_spec(self) -> InputSpec:
        """What a model needs to know about this data (recorded in each run's workdir)."""
        return InputSpec(self.example_input, self.num_classes, self.num_train_examples)
