"""Language-model batches from prepared token shards (data/prepare.py), read without TensorFlow.

Host memory does not grow with the corpus or the run's length: a batch reads only its windows
from the shards (`os.pread`, see `TokenStream`). Every training batch is a pure function of
(seed, step, process): the global batch's window starts are drawn by a Philox generator keyed
by (seed, step), uniformly over the split's valid starts (nanoGPT's get_batch), and each process
keeps its own slice, so a resumed run sees the same batches and N processes together see exactly
one process's batch. Evaluation uses the same fixed, seeded windows every time (keyed by
seed + 7919 and the batch's index).

Packed documents (`packing=True`, config.packing): a window spans documents (and pieces of
documents at its ends), as nanoGPT's stream does; the end-of-text separators preparation put
after every document (manifest 'document_separator') mark where they end, and each batch also
carries their segment ids, positions within each document and the weight of each target
(`packed_fields`), so that attention and the loss stay inside a document (T5's and MaxText's
packed inputs).
"""

from __future__ import annotations

import hashlib
import os
import weakref
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from data import prepare, sources, tokenization

Batch = dict[str, np.ndarray]
EVAL_SEED_OFFSET = 7919
DEFAULT_EVAL_STEPS = 20


class TokenStream:
    """The shards of a prepared dataset as one read-only sequence of token ids.

    Windows are read with `os.pread` into fresh arrays, not through a memory map: a random
    window read from a map faults in neighbouring pages too (the kernel's fault-around and
    read-ahead), and those pages stay mapped into the process, so a long run's resident memory
    would grow towards the corpus's size (nanoGPT re-opens its map every batch for this
    reason). Read this way, the pages live in the kernel's page cache, shared and reclaimable,
    and the process's memory does not depend on the corpus or the run's length."""

    MAX_OPEN_FILES = 64  # shard files kept open at once (the rest are reopened when read)

    def __init__(self, directory: str, manifest: dict[str, Any], verify: bool = True):
        """Checks every shard; DatasetUnavailableError naming a shard that is missing,
        truncated or (with `verify`) does not match its checksum."""
        self._dtype = np.dtype(manifest["dtype"])
        self._paths, offsets = [], [0]
        for shard in manifest["shards"]:
            path = os.path.join(directory, shard["file"])
            expected = shard["tokens"] * self._dtype.itemsize
            size = os.path.getsize(path) if os.path.exists(path) else None
            if size != expected:
                raise sources.DatasetUnavailableError(
                    f"Shard {path} is {'missing' if size is None else f'{size} bytes'}, expected "
                    f"{expected}: rerun `python -m data.prepare` (finished shards are kept)."
                )
            if verify and _checked_sha256(path) != shard["sha256"]:
                raise sources.DatasetUnavailableError(
                    f"Shard {path} does not match its checksum in the manifest (damaged): "
                    f"delete it and its .json sidecar and run `python -m data.prepare` again."
                )
            if shard["tokens"]:
                self._paths.append(path)
                offsets.append(offsets[-1] + shard["tokens"])
        self._offsets = np.asarray(offsets, np.int64)
        self.size = int(self._offsets[-1])
        self._files: dict[int, int] = {}  # shard index -> open descriptor, oldest first
        weakref.finalize(self, _close_all, self._files)

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """int32 [len(starts), length]: the tokens from each start (across shard boundaries)."""
        out = np.empty((len(starts), length), np.int32)
        for i, start in enumerate(np.asarray(starts, np.int64)):
            out[i] = self._read(int(start), length)
        return out

    def _read(self, start: int, length: int) -> np.ndarray:
        parts, position = [], start
        while position < start + length:
            s = int(np.searchsorted(self._offsets, position, side="right") - 1)
            count = min(start + length - position, int(self._offsets[s + 1]) - position)
            offset = (position - int(self._offsets[s])) * self._dtype.itemsize
            data = os.pread(self._fd(s), count * self._dtype.itemsize, offset)
            parts.append(np.frombuffer(data, self._dtype))
            position += count
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _fd(self, shard: int) -> int:
        fd = self._files.pop(shard, None)
        if fd is None:
            if len(self._files) >= self.MAX_OPEN_FILES:
                os.close(self._files.pop(next(iter(self._files))))
            fd = os.open(self._paths[shard], os.O_RDONLY)
        self._files[shard] = fd  # most recently used last
        return fd


def _close_all(files: dict[int, int]) -> None:
    for fd in files.values():
        os.close(fd)
    files.clear()


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _checked_sha256(path: str) -> str:
    """sha256 of a shard, hashed once per (size, modification time): the result is kept in a
    `.sha256` file beside it, so a run's start-up does not re-read a large corpus (a shard that
    is rewritten, or whose bytes are flipped in place, gets a new time and is hashed again)."""
    stat = os.stat(path)
    stamp = f"{stat.st_size} {stat.st_mtime_ns}"
    cache = path + ".sha256"
    try:
        with open(cache) as f:
            cached_stamp, digest = f.read().rsplit(" ", 1)
        if cached_stamp == stamp:
            return digest
    except (OSError, ValueError):
        pass
    digest = _sha256(path)
    try:
        with open(cache + f".tmp{os.getpid()}", "w") as f:
            f.write(f"{stamp} {digest}")
        os.replace(cache + f".tmp{os.getpid()}", cache)
    except OSError:  # a read-only data directory: hash at every start
        pass
    return digest


def packed_fields(windows: np.ndarray, separator: int) -> Batch:
    """The packed-document fields of windows [batch, length + 1] of the token stream, in which
    `separator` ends every document (and belongs to the document it ends):

    - 'segment_ids' int32 [batch, length]: the document of each input token, 1, 2, ... from the
      window's start (the piece of a document the window starts in is document 1);
    - 'positions' int32 [batch, length]: each input token's position in its document, from 0 at
      the document's first token in the window;
    - 'weights' float32 [batch, length]: 1 where the target (the next token) is in the input's
      document, 0 where it is not (the input is a separator: its target starts the next
      document, which nothing in the window can predict).
    """
    ends = windows == separator
    # A token's document: 1 + the separators before it (a separator ends its own document).
    segments = 1 + np.concatenate(
        [np.zeros((len(windows), 1), np.int32), np.cumsum(ends, axis=1, dtype=np.int32)[:, :-1]],
        axis=1,
    )
    index = np.arange(windows.shape[1] - 1, dtype=np.int32)
    starts = np.concatenate([np.ones((len(windows), 1), bool), ends[:, :-2]], axis=1)
    first = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    return {
        "segment_ids": segments[:, :-1].astype(np.int32),
        "positions": (index - first).astype(np.int32),
        "weights": (segments[:, :-1] == segments[:, 1:]).astype(np.float32),
    }


def window_starts(seed: int, index: int, count: int, num_starts: int) -> np.ndarray:
    """`count` starts uniform over [0, num_starts), a pure function of (seed, index)."""
    key = np.asarray([seed % 2**64, index % 2**64], np.uint64)
    return np.random.Generator(np.random.Philox(key=key)).integers(0, num_starts, count)


class TextSplits:
    """A prepared dataset's train and validation windows for `block_size`-token models; with
    `packing`, with their documents' segment ids, positions and target weights
    (`packed_fields`; ValueError if the dataset has no document separator)."""

    def __init__(self, directory: str, block_size: int, verify: bool = True, packing: bool = False):
        self.directory = directory
        self.manifest = prepare.read_manifest(directory)
        self.separator = self.manifest.get("document_separator")
        if packing and self.separator is None:
            raise ValueError(f"{directory} has no document separator to pack documents by.")
        self.packing = bool(packing)
        self.tokenizer = tokenization.load_tokenizer(directory)
        self.stream = TokenStream(directory, self.manifest, verify)
        self.block_size = int(block_size)
        self.splits = {name: tuple(r) for name, r in self.manifest["splits"].items()}
        for name, (lo, hi) in self.splits.items():
            if hi - lo < self.block_size + 1:
                raise sources.DatasetUnavailableError(
                    f"The {name} split of {directory} has {hi - lo} tokens, too few for one "
                    f"window of {self.block_size + 1} (model.block_size + 1); use a smaller "
                    "model.block_size or a larger corpus."
                )

    def batch(self, split: str, seed: int, index: int, global_batch: int) -> Batch:
        """This process's slice of the global batch `index` of `split`'s random windows."""
        lo, hi = self.splits[split]
        starts = lo + window_starts(seed, index, global_batch, hi - lo - self.block_size)
        local = global_batch // jax.process_count()
        mine = starts[jax.process_index() * local : (jax.process_index() + 1) * local]
        windows = self.stream.windows(mine, self.block_size + 1)
        batch = {"inputs": windows[:, :-1], "targets": windows[:, 1:]}
        if self.packing:
            batch.update(packed_fields(windows, self.separator))
        return batch

    def train_batches(
        self, seed: int, global_batch: int, start_step: int = 0, steps_per_dispatch: int = 1,
        stop_step: int = 2**62,
    ) -> Iterator[Batch]:  # fmt: skip
        """Batches of steps start_step .. stop_step - 1; with k = steps_per_dispatch > 1, stacks
        [k, batch, ...] of consecutive steps starting on multiples of k (the first one shorter
        when start_step is not one, the last cut by stop_step), as data/images.py's image
        pipeline stacks them."""
        k = int(steps_per_dispatch)
        step = start_step
        while step < stop_step:
            end = min((step // k + 1) * k, stop_step)
            batches = [self.batch("train", seed, s, global_batch) for s in range(step, end)]
            yield (
                batches[0] if k == 1 else {n: np.stack([b[n] for b in batches]) for n in batches[0]}
            )
            step = end

    def eval_batches(self, split: str, seed: int, global_batch: int, steps: int) -> Iterator[Batch]:
        """`steps` batches of fixed windows of `split` (the same ones at every evaluation)."""
        for index in range(steps):
            batch = self.batch(split, seed + EVAL_SEED_OFFSET, index, global_batch)
            batch["mask"] = np.ones((batch["targets"].shape[0],), np.float32)
            yield batch
