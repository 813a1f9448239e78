"""Writes metrics to TensorBoard event files and `metrics.jsonl`, from process 0 only."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from flax.metrics import tensorboard


class MetricsWriter:
    """Scalars go to TensorBoard and to one JSON line per (step, group); other processes no-op."""

    def __init__(self, workdir: str, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        _truncate_after(self.jsonl_path, resume_step)
        tb_dir = os.path.join(workdir, "tensorboard")
        _truncate_events_after(tb_dir, resume_step)
        self._tb = tensorboard.SummaryWriter(tb_dir)

    def write_scalars(self, step: int, scalars: dict[str, Any], prefix: str = "") -> None:
        """Logs `scalars` (names prefixed, e.g. 'train/loss') at `step`."""
        if not self.enabled:
            return
        values = {f"{prefix}{k}": float(np.asarray(v)) for k, v in scalars.items()}
        for name, value in values.items():
            self._tb.scalar(name, value, step)
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps({"step": int(step), **values}) + "\n")
        self._tb.flush()

    def write_text(self, step: int, name: str, text: str) -> None:
        """Logs a text summary (config, generated samples)."""
        if self.enabled:
            self._tb.text(name, text, step)

    def write_image(self, step: int, name: str, image: np.ndarray) -> None:
        """Logs an image [H, W, C] (uint8 or float in [0, 1])."""
        if self.enabled:
            self._tb.image(name, image, step)

    def write_hparams(self, hparams: dict[str, Any]) -> None:
        """Logs the run's hyperparameters for TensorBoard's HParams tab."""
        if self.enabled:
            self._tb.hparams(hparams)

    def close(self) -> None:
        """Flushes and closes the event file."""
        if self.enabled:
            self._tb.close()


def _truncate_after(path: str, step: int) -> None:
    """On resume, drops lines logged after the restored step by a run that was then killed."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (json.JSONDecodeError, KeyError):
            continue  # a line cut off by a kill mid-write
    # Write aside and rename: a kill in the middle must not leave the history truncated.
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def _truncate_events_after(directory: str, step: int) -> None:
    """On resume, drops the TensorBoard events logged after the restored step by a run that was
    then killed (they would stand beside the resumed run's own events for the same steps).
    Each event file is rewritten record by record, aside and renamed, only if it has any."""
    if not os.path.isdir(directory):
        return
    from tensorboard.backend.event_processing import event_file_loader
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer import record_writer

    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if "tfevents" not in name or not os.path.isfile(path):
            continue
        records = list(event_file_loader.RawEventFileLoader(path).Load())
        kept = [r for r in records if event_pb2.Event.FromString(r).step <= step]
        if len(kept) == len(records):
            continue
        with open(path + ".tmp", "wb") as f:
            writer = record_writer.RecordWriter(f)
            for record in kept:
                writer.write(record)
            writer.flush()
        os.replace(path + ".tmp", path)


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """Reads a metrics.jsonl file back into a list of dicts."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
