"""Preemption notices (SIGTERM): every process agrees on a step at which to save and exit."""

from __future__ import annotations

import signal
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils


class PreemptionWatcher:
    """`should_stop(step)` turns True at the same step on all processes after a SIGTERM.

    With several processes, JAX's distributed runtime catches the signal and its preemption sync
    point makes every process stop at the same step. In one process, our own handler sets a flag.
    """

    def __init__(self):
        self._event = threading.Event()
        self._multi = jax.process_count() > 1
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        logging.warning("Received signal %d: saving a checkpoint and exiting.", signum)
        self._event.set()

    def should_stop(self, step: int) -> bool:
        """True once a preemption notice has arrived (call it every step, on every process)."""
        if self._multi:
            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # distributed runtime without a preemption service
                return False
        return self._event.is_set()

    def close(self) -> None:
        """Restores the previous SIGTERM handler."""
        if not self._multi and hasattr(self, "_previous"):
            signal.signal(signal.SIGTERM, self._previous)
