"""The small records a run keeps in its workdir beside the checkpoints.

- `config.json`: the config the run trained with (read back by every command that loads a run);
- `input_spec.json`: the shape and dtype of one model input and the data facts a model needs to
  be rebuilt without loading any data (classes, training examples);
- the tokenizer files, written by `tokenizers_lib` (language models).
Only process 0 writes; every process reads.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

CONFIG_FILE = "config.json"
INPUT_SPEC_FILE = "input_spec.json"


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


def _write_json_text(workdir: str, name: str, text: str) -> None:
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, name)
        with open(path + ".tmp", "w") as f:  # a reader never sees half a file
            f.write(text)
        os.replace(path + ".tmp", path)


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Writes the run's config as workdir/config.json."""
    _write_json_text(workdir, CONFIG_FILE, config.to_json_best_effort(indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """Reads back the config a run trained with; FileNotFoundError if `workdir` holds none."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir} a jaxlab workdir?")
    with open(path) as f:
        return ml_collections.ConfigDict(_lists_to_tuples(json.load(f)))


def save_input_spec(workdir: str, spec: InputSpec) -> None:
    """Writes workdir/input_spec.json."""
    _write_json_text(workdir, INPUT_SPEC_FILE, json.dumps(spec.to_json(), indent=2))


def load_input_spec(workdir: str) -> InputSpec:
    """Reads workdir/input_spec.json; FileNotFoundError (naming the fix) if it is missing."""
    path = os.path.join(workdir, INPUT_SPEC_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: {workdir} was trained before runs recorded their input shape; "
            "rerun train.py with the same --config and --workdir once to write it."
        )
    with open(path) as f:
        return InputSpec.from_json(json.load(f))


def _lists_to_tuples(x: Any) -> Any:
    """JSON lists back to the tuples configs use (e.g. model.features)."""
    if isinstance(x, dict):
        return {k: _lists_to_tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_lists_to_tuples(v) for v in x)
    return x
