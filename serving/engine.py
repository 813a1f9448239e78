"""Continuous batching for a language model: one background thread decodes every request in
flight together.

A fixed number of slots (the compiled batch) each hold one sequence: its KV cache (on device,
`slots.init_slot_cache`), its last token, position, seed and sampling settings (on the host,
small arrays sent with each step). Between two decoding steps the loop admits waiting sequences
into free slots (one `slots.prefill_slot` each, its prompt padded to a power-of-two bucket),
then runs one `slots.decode_slots` step over all slots and hands each sequence its new text. A
sequence that ends (its length, a stop string, the end-of-text token) or is cancelled (its
client left) frees its slot for the next step. Shapes never change after `warm_up`, so nothing
compiles while serving (`compilations()` counts XLA compilations to prove it).

Sequences never wait unboundedly: `submit` refuses (`OverloadedError`) when the waiting line
is full (its length is the service's choice: serving/service.py turns the refusal into a 503).

Past the context (`slide_window=True`): a sequence whose slot cache is full (block_size
positions) leaves its slot and goes on as `sample.py` does, nanoGPT's way: each further token
is one full forward pass over its last block_size tokens (`slots.window_step`, one compiled
program), run for every such sequence between two decoding steps. Without it, the service
refuses a request that would need it.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging

from serving import slots
from serving.detokenizer import IncrementalText

# XLA compilations in this process (jax.monitoring has no way to unregister a listener, so one
# listener for the process, registered on first use).
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compilations = 0
_listener_lock = threading.Lock()
_listening = False


def _on_event(event: str, duration_secs: float, **kwargs: Any) -> None:
    global _compilations
    if event == _COMPILE_EVENT:
        _compilations += 1


def _shardings(tree: Any) -> list[Any]:
    return [leaf.sharding for leaf in jax.tree.leaves(tree)]


def compilations() -> int:
    """How many XLA backend compilations this process has run since this was first called."""
    global _listening
    with _listener_lock:
        if not _listening:
            jax.monitoring.register_event_duration_secs_listener(_on_event)
            _listening = True
    return _compilations


class OverloadedError(Exception):
    """The waiting line is full (or the engine is stopping): try again later."""


@dataclasses.dataclass
class Sequence:
    """One sequence to generate (one choice of a completion request) and its progress.

    `on_update(text, finish_reason)` is called from the engine's thread with each piece of new
    text (possibly empty) and, on the last call, the reason it ended: 'stop' (a stop string or
    the end-of-text token), 'length' (max_tokens), or 'error'. With `stream=False` it is called
    once, at the end, with the whole text (no per-token wake-ups of the caller, and no text
    decoded before the end unless a stop string needs it).
    """

    prompt_ids: np.ndarray  # int32 [prompt_len], 1 <= prompt_len <= block_size
    # >= 1; at most slots.max_slot_tokens(prompt_len, block_size) unless the engine slides
    max_tokens: int
    temperature: float
    top_k: int  # 0 = all
    top_p: float  # 1 = all
    seed: int  # [0, 2**31)
    stop: tuple[str, ...]
    on_update: Callable[[str, str | None], None]
    stream: bool = True
    output: IncrementalText | None = None  # the generated ids and their text (set by submit)
    emitted: int = 0  # characters of text already handed out
    finish_reason: str | None = None
    cancelled: bool = False
    ended_by_eot: bool = False  # finished by the end-of-text token (not in token_ids)

    @property
    def token_ids(self) -> list[int]:
        """The ids generated so far (without the end-of-text token)."""
        return self.output.token_ids if self.output is not None else []


class LMEngine:
    """The batching engine of one language model (see the module docstring). Thread-safe
    `submit`/`cancel`.

    Args:
      model: the run's model (a GPT, or any module keeping serving/slots.py's cache contract;
        its `decode=False` form: decoding clones it).
      params: its parameters (device arrays).
      tokenizer: the run's tokenizer (data.tokenization): decodes the generated ids.
      num_slots: sequences decoded together (the compiled batch).
      max_waiting: sequences allowed to wait for a slot; beyond it `submit` raises
        OverloadedError.
      slide_window: continue sequences past the context over a sliding window (the module
        docstring); else a sequence must fit its slot's cache.
    """

    def __init__(self, model: Any, params: Any, tokenizer: Any, num_slots: int,
                 max_waiting: int, slide_window: bool = False) -> None:  # fmt: skip
        if num_slots < 1 or max_waiting < 1:
            raise ValueError(f"num_slots and max_waiting must be >= 1: {num_slots}, {max_waiting}")
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.num_slots, self.max_waiting = num_slots, max_waiting
        self.slide_window = bool(slide_window)
        self.block_size = int(model.block_size)
        self.eot_id = tokenizer.eot_id
        self._cache = self._new_cache()
        self._slots: list[Sequence | None] = [None] * num_slots
        # What each step sends to the device, per slot.
        self._tokens = np.zeros(num_slots, np.int32)
        self._token_index = np.zeros(num_slots, np.int32)
        self._seeds = np.zeros(num_slots, np.uint32)
        self._temperature = np.zeros(num_slots, np.float32)
        self._top_k = np.zeros(num_slots, np.int32)
        self._top_p = np.ones(num_slots, np.float32)
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._sliding: list[Sequence] = []  # past the context (engine thread only)
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.decode_steps = 0
        self.generated_tokens = 0

    def _new_cache(self) -> Any:
        """Empty slot caches, replicated over the parameters' mesh exactly as the programs
        return them (`P(None, ...)`, one entry per axis: jit keys its cache on the spec, and
        `P()` would compile every program a second time), so that the first call compiles what
        every later call runs."""
        cache = slots.init_slot_cache(self.model, self.num_slots)
        if self._on_mesh():
            sharding = jax.tree.leaves(self.params)[0].sharding
            cache = jax.tree.map(
                lambda leaf: jax.device_put(leaf, jax.sharding.NamedSharding(
                    sharding.mesh, jax.sharding.PartitionSpec(*[None] * leaf.ndim))),
                cache,
            )  # fmt: skip
        return cache

    def _on_mesh(self) -> bool:
        """Whether the parameters are placed on a mesh (as serve.py's restore places them);
        else the first cache is uncommitted and the returned one committed, which the
        shardings do not tell apart."""
        sharding = getattr(jax.tree.leaves(self.params)[0], "sharding", None)
        return isinstance(sharding, jax.sharding.NamedSharding)

    # ----- control (any thread)

    def warm_up(self) -> float:
        """Compiles (and runs once) the prefill of every prompt bucket and the decoding step;
        returns the seconds it took. Call before `start`."""
        start = time.perf_counter()
        # A second pass only if the programs return the cache placed otherwise than they took
        # it (a sharded model's mesh may decide so): the next call would compile anew.
        for _ in range(2):
            taken = _shardings(self._cache)
            for bucket in slots.prompt_buckets(self.block_size):
                _, self._cache = slots.prefill_slot(
                    self.model, self.params, self._cache, np.int32(0),
                    np.zeros((1, bucket), np.int32), np.int32(1), np.uint32(0),
                    np.float32(1.0), np.int32(0), np.float32(1.0),
                )  # fmt: skip
            tokens = self._step(np.zeros(self.num_slots, bool))
            if self._on_mesh() and _shardings(self._cache) == taken:
                break
        if self.slide_window:
            window = np.zeros((1, self.block_size), np.int32)
            tokens = slots.window_step(
                self.model, self.params, window, np.uint32(0), np.int32(0), np.float32(1.0),
                np.int32(0), np.float32(1.0),
            )  # fmt: skip
        jax.block_until_ready(tokens)
        return time.perf_counter() - start

    def start(self) -> None:
        """Starts the decoding thread."""
        self._thread = threading.Thread(target=self._loop, name="lm-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Refuses new sequences, finishes those in slots or waiting, and ends the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, sequences: list[Sequence]) -> None:
        """Queues `sequences` for slots, all or none. Raises OverloadedError when the waiting
        line cannot take them all, or the engine is stopping."""
        with self._cv:
            if self._stopping:
                raise OverloadedError("the server is shutting down")
            if len(self._waiting) + len(sequences) > self.max_waiting:
                raise OverloadedError(
                    f"{len(self._waiting)} sequences are waiting for one of {self.num_slots} "
                    f"slots (at most {self.max_waiting} may wait)"
                )
            for seq in sequences:
                seq.output = IncrementalText(self.tokenizer, seq.stop)
            self._waiting.extend(sequences)
            self._cv.notify_all()

    def cancel(self, sequences: list[Sequence]) -> None:
        """Marks sequences as abandoned: each frees its slot (or place in line) before the next
        step."""
        with self._cv:
            for seq in sequences:
                seq.cancelled = True
            self._cv.notify_all()

    def stats(self) -> dict[str, int]:
        """Slots in use, sequences waiting, steps run and tokens generated so far."""
        with self._cv:
            busy = sum(s is not None for s in self._slots)
            return {
                "slots": self.num_slots,
                "active": busy + len(self._sliding),
                "waiting": len(self._waiting),
                "decode_steps": self.decode_steps,
                "generated_tokens": self.generated_tokens,
            }

    # ----- the decoding thread

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._busy() and not self._stopping:
                    self._cv.wait()
                if self._stopping and not self._waiting and not self._busy():
                    return
                admitted = []
                for slot in range(self.num_slots):
                    if self._slots[slot] is None or self._slots[slot].cancelled:
                        self._slots[slot] = None
                        while self._waiting and self._slots[slot] is None:
                            seq = self._waiting.popleft()
                            if not seq.cancelled:
                                self._slots[slot] = seq
                                admitted.append(slot)
            try:
                # Every prefill is dispatched before the host waits for the first token.
                first_tokens = [self._prefill(slot) for slot in admitted]
                for slot, token in zip(admitted, first_tokens, strict=True):
                    self._advance(slot, int(token))
                active = np.array([s is not None for s in self._slots])
                if active.any():
                    self._deliver(np.asarray(self._step(active)), active)
                if self._sliding:
                    self._slide()
            except Exception as e:  # a bug: end what is in flight loudly, keep serving
                logging.exception("decoding failed")
                self._fail_all(f"{type(e).__name__}: {e}")

    def _busy(self) -> bool:
        return bool(self._sliding) or any(s is not None for s in self._slots)

    def _prefill(self, slot: int) -> jax.Array:
        """Writes the slot's prompt into its cache; returns its first token (on device, not
        waited for)."""
        seq = self._slots[slot]
        prompt_len = len(seq.prompt_ids)
        padded = np.zeros((1, slots.bucket_for(prompt_len, self.block_size)), np.int32)
        padded[0, :prompt_len] = seq.prompt_ids
        token, self._cache = slots.prefill_slot(
            self.model, self.params, self._cache, np.int32(slot), padded, np.int32(prompt_len),
            np.uint32(seq.seed), np.float32(seq.temperature), np.int32(seq.top_k),
            np.float32(seq.top_p),
        )  # fmt: skip
        self._temperature[slot] = seq.temperature
        self._top_k[slot] = seq.top_k
        self._top_p[slot] = seq.top_p
        self._seeds[slot] = seq.seed
        self._token_index[slot] = 0
        return token

    def _step(self, active: np.ndarray) -> jax.Array:
        """One decoding step of every slot: the next token of each (garbage for idle slots)."""
        next_index = self._token_index + 1
        tokens, self._cache = slots.decode_slots(
            self.model, self.params, self._cache, self._tokens, next_index, self._seeds,
            self._temperature, self._top_k, self._top_p, active,
        )  # fmt: skip
        return tokens

    def _deliver(self, tokens: np.ndarray, active: np.ndarray) -> None:
        self.decode_steps += 1
        for slot in np.flatnonzero(active):
            self._token_index[slot] += 1
            self._advance(int(slot), int(tokens[slot]))

    def _advance(self, slot: int, token: int) -> None:
        """Appends a slot's new token (`_append`); frees the slot of a finished sequence, and
        moves one whose cache is full to the sliding window (with `slide_window`)."""
        seq = self._slots[slot]
        self._tokens[slot] = token
        finished = self._append(seq, token)
        room = slots.max_slot_tokens(len(seq.prompt_ids), self.block_size)
        if finished or len(seq.token_ids) >= room:
            with self._cv:
                self._slots[slot] = None
                if not finished:  # only with slide_window (the service checks max_tokens)
                    self._sliding.append(seq)

    def _slide(self) -> None:
        """One token of every sequence past the context: a full forward pass over its last
        block_size tokens (`slots.window_step`); drops the finished and the cancelled."""
        for seq in list(self._sliding):
            if not seq.cancelled:
                ids = np.concatenate([seq.prompt_ids, np.asarray(seq.token_ids, np.int32)])
                token = slots.window_step(
                    self.model, self.params, ids[None, -self.block_size :], np.uint32(seq.seed),
                    np.int32(len(seq.token_ids)), np.float32(seq.temperature),
                    np.int32(seq.top_k), np.float32(seq.top_p),
                )  # fmt: skip
            if seq.cancelled or self._append(seq, int(token)):
                self._sliding.remove(seq)

    def _append(self, seq: Sequence, token: int) -> bool:
        """Appends a sequence's new token and hands out the text it completes; True if the
        sequence has ended (its finish_reason set, its last update sent)."""
        self.generated_tokens += 1
        finish = None
        if self.eot_id is not None and token == self.eot_id:
            finish = "stop"
            seq.ended_by_eot = True
        else:
            seq.output.token_ids.append(token)
            if len(seq.output.token_ids) >= seq.max_tokens:
                finish = "length"
        if finish is None and not seq.stream and not seq.stop:
            return False  # nothing to hand out or check before the end
        output = seq.output
        output.update(final=finish is not None)
        if output.stop_at is not None:
            finish = "stop"
        if finish is None and not seq.stream:
            return False
        end = output.stable_length()
        new, seq.emitted = output.text[seq.emitted : end], max(end, seq.emitted)
        if finish is not None:
            seq.finish_reason = finish
        if new or finish:
            seq.on_update(new, finish)
        return finish is not None

    def _fail_all(self, message: str) -> None:
        with self._cv:
            failed = [s for s in self._slots if s is not None] + self._sliding
            self._slots = [None] * self.num_slots
            self._sliding = []
        # A failed call may have consumed the donated cache: start the slots afresh.
        self._cache = self._new_cache()
        for seq in failed:
            seq.finish_reason = "error"
            seq.on_update(message, "error")
