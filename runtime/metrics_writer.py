"""Writes metrics to TensorBoard event files and `metrics.jsonl`, from process 0 only.

The event files are written with the `tensorboard` package alone (no TensorFlow, which the GPU
machines and the language-model path do without): summary protos built by TensorBoard's own
plugin helpers (`scalar_pb`, `text_pb`, `hparams_pb`; images as the image plugin's
`[width, height, png]` string tensor), framed by its `RecordWriter`. TensorBoard reads them
exactly as it read `tf.summary`'s: the same tags, plugins and values.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import struct
import time
import zlib
from typing import Any

import jax
import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.plugins.image import metadata as image_metadata
from tensorboard.plugins.scalar import summary_v2 as scalar_summary
from tensorboard.plugins.text import summary_v2 as text_summary
from tensorboard.summary.writer import record_writer
from tensorboard.util import tensor_util


class MetricsWriter:
    """Scalars go to TensorBoard, to one JSON line per (step, group) and to the run's tracker
    (tracking.WandbTracker, when W&B is on); other processes no-op."""

    def __init__(self, workdir: str, resume_step: int = 0, tracker: Any = None):
        """tracker: None, or an object with log_scalars(step, {name: value}),
        write_summary(metrics) and close() (tracking.start's), which then gets every scalar
        written here, the final summary, and is closed with the writer."""
        self.enabled = jax.process_index() == 0
        self.tracker = tracker if self.enabled else None
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        _truncate_after(self.jsonl_path, resume_step)
        tb_dir = os.path.join(workdir, "tensorboard")
        _truncate_events_after(tb_dir, resume_step)
        self._tb = _EventWriter(tb_dir)

    def write_scalars(self, step: int, scalars: dict[str, Any], prefix: str = "") -> None:
        """Logs `scalars` (names prefixed, e.g. 'train/loss') at `step`."""
        if not self.enabled:
            return
        values = {f"{prefix}{k}": float(np.asarray(v)) for k, v in scalars.items()}
        for name, value in values.items():
            self._tb.write(step, scalar_summary.scalar_pb(name, np.float32(value)))
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps({"step": int(step), **values}) + "\n")
        self._tb.flush()
        if self.tracker is not None:
            self.tracker.log_scalars(step, values)

    def write_summary(self, metrics: dict[str, Any]) -> None:
        """The run's final metrics, for the tracker's summary (final_metrics.json holds them
        on disk; TensorBoard has them as the last evaluation's scalars)."""
        if self.tracker is not None:
            self.tracker.write_summary(metrics)

    def write_text(self, step: int, name: str, text: str) -> None:
        """Logs a text summary (config, generated samples)."""
        if self.enabled:
            self._tb.write(step, text_summary.text_pb(name, text))
            self._tb.flush()

    def write_image(self, step: int, name: str, image: np.ndarray) -> None:
        """Logs an image [H, W, C] (uint8 or float in [0, 1]); also [H, W], or [K, H, W(, C)]
        for up to 3 images."""
        if self.enabled:
            self._tb.write(step, image_summary_pb(name, image))
            self._tb.flush()

    def write_hparams(self, hparams: dict[str, Any]) -> None:
        """Logs the run's hyperparameters for TensorBoard's HParams tab."""
        if self.enabled:
            self._tb.write(0, hparams_summary.hparams_pb(_hparam_values(hparams)))
            self._tb.flush()

    def close(self) -> None:
        """Flushes and closes the event file, and finishes the tracker's run."""
        if self.enabled:
            self._tb.close()
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None


class _EventWriter:
    """One event file, written synchronously: TensorBoard's RecordWriter over a plain file.
    (tensorboard's EventFileWriter opens its file through `tensorboard.compat.tf`, which is
    TensorFlow itself wherever TensorFlow is installed.) The file is named as TensorFlow's
    writer names it."""

    _ids = itertools.count()

    def __init__(self, directory: str):
        os.makedirs(directory, exist_ok=True)
        stamp, host, pid = int(time.time()), socket.gethostname(), os.getpid()
        name = f"events.out.tfevents.{stamp:010d}.{host}.{pid}.{next(self._ids)}.v2"
        self._file = open(os.path.join(directory, name), "wb")  # noqa: SIM115 (closed by close)
        self._records = record_writer.RecordWriter(self._file)
        source = event_pb2.SourceMetadata(writer="jaxlab.metrics_writer")
        self._add(
            event_pb2.Event(
                wall_time=time.time(), file_version="brain.Event:2", source_metadata=source
            )
        )
        self.flush()

    def write(self, step: int, summary: summary_pb2.Summary) -> None:
        self._add(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def _add(self, event: event_pb2.Event) -> None:
        self._records.write(event.SerializeToString())

    def flush(self) -> None:
        if not self._file.closed:
            self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def _hparam_values(hparams: dict[str, Any]) -> dict[str, bool | int | float | str]:
    """Values the HParams plugin takes (bool, number, string); anything else as its str()."""
    out = {}
    for name, value in hparams.items():
        if isinstance(value, np.generic):
            value = value.item()
        out[name] = value if isinstance(value, bool | int | float | str) else str(value)
    return out


def image_summary_pb(tag: str, image: np.ndarray, max_outputs: int = 3) -> summary_pb2.Summary:
    """The image plugin's summary, as tf.summary.image writes it: a string tensor
    [width, height, png, ...] of up to `max_outputs` RGB images. Floats in [0, 1] become uint8
    as tf.image.convert_image_dtype makes them (x * 255.5, saturated); one channel is repeated
    to three, as flax's writer did."""
    images = np.asarray(image)
    if images.ndim == 2:
        images = images[None, :, :, None]
    elif images.ndim == 3:  # [H, W, C] or [K, H, W]
        images = images[None] if images.shape[-1] in (1, 3) else images[..., None]
    if images.ndim != 4:
        raise ValueError(f"Expected an image [H, W(, C)] or [K, H, W(, C)], got {images.shape}.")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    if images.dtype != np.uint8:
        images = np.floor(np.clip(images.astype(np.float64) * 255.5, 0, 255)).astype(np.uint8)
    height, width = images.shape[1:3]
    encoded = [encode_png(x) for x in images[:max_outputs]]
    tensor = tensor_util.make_tensor_proto(
        np.array([str(width).encode(), str(height).encode(), *encoded], dtype=object)
    )
    meta = image_metadata.create_summary_metadata(display_name=None, description=None)
    summary = summary_pb2.Summary()
    summary.value.add(tag=tag, metadata=meta, tensor=tensor)
    return summary


def encode_png(image: np.ndarray) -> bytes:
    """A uint8 image [H, W, C] (C = 1, 2, 3 or 4: grey, grey + alpha, RGB, RGBA) as PNG bytes
    (8 bits per channel, no filtering, zlib-compressed)."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    height, width, channels = image.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = np.concatenate([np.zeros((height, 1), np.uint8), image.reshape(height, -1)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
        + chunk(b"IEND", b"")
    )


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
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if "tfevents" not in name or not os.path.isfile(path):
            continue
        records = _read_records(path)
        kept = [r for r in records if event_pb2.Event.FromString(r).step <= step]
        if len(kept) == len(records):
            continue
        with open(path + ".tmp", "wb") as f:
            writer = record_writer.RecordWriter(f)
            for record in kept:
                writer.write(record)
            writer.flush()
        os.replace(path + ".tmp", path)


def _read_records(path: str) -> list[bytes]:
    """The records of a TFRecord (event) file, read with TensorBoard's TensorFlow-free reader
    (its `event_file_loader` imports TensorFlow where it is installed); a record cut off by a
    kill mid-write ends the list."""
    from tensorboard.compat.tensorflow_stub import errors, pywrap_tensorflow

    reader = pywrap_tensorflow.PyRecordReader_New(path, 0, "", None)
    records = []
    while True:
        try:
            reader.GetNext()
        except (errors.OutOfRangeError, errors.DataLossError):
            return records
        records.append(reader.record())


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """Reads a metrics.jsonl file back into a list of dicts."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
