"""A workdir is one run's faithful record: its claim, its small records, and their consistency.

- `claim(workdir)`: a live run holds its workdir; a second start is refused, naming the live
  process (`.claim` holds who). The claim is an advisory `flock`: the kernel releases it when the
  holder exits or is killed, so a stale claim is taken over safely and kill-and-rerun resumption
  works. The processes of one multi-host run share process 0's claim.
- `config.json`: the config the run trained with (read back by every command that loads a run);
- `input_spec.json`: the shape and dtype of one model input and the data facts a model needs to
  be rebuilt without loading any data (classes, training examples);
- the tokenizer files, written by `data.tokenization` (language models);
- `provenance.json`: what made each attempt of the run and where its time went, written by
  `runtime.provenance` (moved aside with the other records).
- `check_resume`: a rerun whose config changes the run's meaning is refused, naming the fields.
- `move_records_aside`: `restart` (or a fresh start over a dead attempt's records) moves every
  record of the old run into `previous_runs/<time>/`, so that all that remains describes the
  new run. Nothing is ever deleted.
Only process 0 writes; every process reads.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
from absl import logging

import data
from runtime import cli, distributed, provenance

CONFIG_FILE = "config.json"
INPUT_SPEC_FILE = "input_spec.json"
CLAIM_FILE = ".claim"
PREVIOUS_RUNS = "previous_runs"
# Everything a run writes into its workdir (besides the claim and previous runs).
RUN_RECORDS = ("checkpoints", "damaged_checkpoints", "tensorboard", "metrics.jsonl",
               "final_metrics.json", CONFIG_FILE, INPUT_SPEC_FILE,
               provenance.PROVENANCE_FILE)  # fmt: skip
RUN_RECORD_PREFIXES = ("tokenizer", "eval_", "wandb")  # wandb: tracking.py's run id and files
# Config fields whose change gives a workdir's checkpoints another meaning: resuming with
# another value is refused (config.restart=True starts afresh instead).
MEANING_FIELDS = ("task", "dataset", "synthetic", "tokenizer", "tokenizer_vocab_size",
                  "val_fraction", "model", "optimizer")  # fmt: skip


class WorkdirError(cli.UserError):
    """The workdir is held by a live run, or holds a run that this config would not continue."""


def _write_json_text(workdir: str, name: str, text: str) -> None:
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, name)
        with open(path + ".tmp", "w") as f:  # a reader never sees half a file
            f.write(text)
        os.replace(path + ".tmp", path)


def save_run_records(
    workdir: str, config: ml_collections.ConfigDict, input_spec: data.InputSpec, tokenizer: Any
) -> None:
    """Writes what rebuilding a run needs besides its checkpoint: config.json,
    input_spec.json and (for a language model; None otherwise) the tokenizer, from process 0."""
    save_config(workdir, config)
    save_input_spec(workdir, input_spec)
    if tokenizer is not None and jax.process_index() == 0:
        tokenizer.save(workdir)


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


def save_input_spec(workdir: str, spec: data.InputSpec) -> None:
    """Writes workdir/input_spec.json."""
    _write_json_text(workdir, INPUT_SPEC_FILE, json.dumps(spec.to_json(), indent=2))


def load_input_spec(workdir: str) -> data.InputSpec:
    """Reads workdir/input_spec.json; FileNotFoundError (naming the fix) if it is missing."""
    path = os.path.join(workdir, INPUT_SPEC_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: {workdir} was trained before runs recorded their input shape; "
            "rerun train.py with the same --config and --workdir once to write it."
        )
    with open(path) as f:
        return data.InputSpec.from_json(json.load(f))


def _lists_to_tuples(x: Any) -> Any:
    """JSON lists back to the tuples configs use (e.g. model.features)."""
    if isinstance(x, dict):
        return {k: _lists_to_tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_lists_to_tuples(v) for v in x)
    return x


# ----------------------------------------------------------------------------- the claim


@contextlib.contextmanager
def claim(workdir: str) -> Iterator[None]:
    """Holds `workdir` for one run while the block runs (collective over processes).

    Raises WorkdirError naming the holder when a live run already holds it. A claim left by a
    run that was killed is free (the kernel released its lock) and is taken over with a warning.
    """
    fd, problem = None, None
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        fd = os.open(os.path.join(workdir, CLAIM_FILE), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_claim(fd)
            os.close(fd)
            fd = None
            problem = (
                f"{workdir} is in use by another run ({_describe(holder)}). Wait for it to "
                "finish, stop it, or use another --workdir."
            )
        else:
            stale = _read_claim(fd)
            if stale:
                logging.warning("Took over the claim on %s left by %s, which is no longer "
                                "running.", workdir, _describe(stale))  # fmt: skip
            record = {"pid": os.getpid(), "host": socket.gethostname(),
                      "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                      "processes": jax.process_count(), "command": " ".join(sys.argv)}  # fmt: skip
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
    if not distributed.all_processes_agree(problem is None):
        raise WorkdirError(problem or f"process 0 could not claim {workdir} (see its error).")
    try:
        yield
    finally:
        if fd is not None:
            os.ftruncate(fd, 0)  # a finished run leaves no claim behind
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _read_claim(fd: int) -> dict[str, Any]:
    try:
        text = os.pread(fd, 65536, 0).decode()
        return json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {"pid": "?", "host": "?"}


def _describe(holder: dict[str, Any]) -> str:
    return (f"process {holder.get('pid', '?')} on {holder.get('host', '?')}, started "
            f"{holder.get('started', '?')}: {holder.get('command', '?')}")  # fmt: skip


# ----------------------------------------------------------------------------- consistency


def _flat(config: Any, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict | dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return flat


def check_resume(
    workdir: str,
    config: ml_collections.ConfigDict,
    tokenizer: Any,
    latest_step: int,
    total_steps: int,
) -> None:
    """Refuses (WorkdirError) to continue the run in `workdir`, whose newest checkpoint is at
    `latest_step`, with a `config` (and `tokenizer`) that would change what it is: another
    dataset, tokenizer, model, optimizer (MEANING_FIELDS), another tokenizer vocabulary, or a
    run length shorter than the step it has reached. The message names the differing fields."""
    fix = "Pass --config.restart=True to start afresh (the old run is kept) or use a new --workdir."
    path = os.path.join(workdir, CONFIG_FILE)
    if os.path.exists(path):
        saved, new = _flat(load_config(workdir)), _flat(config)
        differ = [
            f"{key}: {saved.get(key)!r} -> {new.get(key)!r}"
            for key in sorted(set(saved) | set(new))
            if key.split(".")[0] in MEANING_FIELDS and saved.get(key) != new.get(key)
        ]
        if differ:
            raise WorkdirError(
                f"{workdir} holds a run (step {latest_step}) that this config would change: "
                f"{'; '.join(differ)}. {fix}"
            )
    if tokenizer is not None and os.path.exists(os.path.join(workdir, "tokenizer.json")):
        from data import tokenization

        saved_tokenizer = tokenization.load_tokenizer(workdir)
        if saved_tokenizer != tokenizer:
            raise WorkdirError(
                f"{workdir} was trained with a {saved_tokenizer.describe()}, this data gives a "
                f"{tokenizer.describe()}: its checkpoints would decode to other text. {fix}"
            )
    if total_steps < latest_step:
        raise WorkdirError(
            f"{workdir} has reached step {latest_step}, past this config's run length of "
            f"{total_steps} steps (num_train_steps / num_epochs). Set a length of at least "
            f"{latest_step}, or: {fix}"
        )


def _records(workdir: str) -> list[str]:
    if not os.path.isdir(workdir):
        return []
    return sorted(
        name
        for name in os.listdir(workdir)
        if name in RUN_RECORDS or name.startswith(RUN_RECORD_PREFIXES)
    )


def move_records_aside(workdir: str, keep: tuple[str, ...] = ()) -> str | None:
    """Moves every record of the run in `workdir` (but those named in `keep`) into
    workdir/previous_runs/<time>/ (nothing is deleted); returns that folder, or None if there
    was nothing to move. Collective."""
    names = [name for name in _records(workdir) if name not in keep]
    if not names:
        return None
    target = os.path.join(workdir, PREVIOUS_RUNS, time.strftime("%Y%m%d-%H%M%S"))
    if jax.process_index() == 0:
        suffix = 1
        while os.path.exists(target):  # two restarts within one second
            target, suffix = f"{target.rsplit('.', 1)[0]}.{suffix}", suffix + 1
        os.makedirs(target)
        for name in names:
            shutil.move(os.path.join(workdir, name), os.path.join(target, name))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jaxlab_move_records_aside")
    return target
