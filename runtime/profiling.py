"""config.profile_steps: a jax.profiler trace of chosen training steps (train.py's loop)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax


class StepProfiler:
    """Captures a jax.profiler trace of the training steps `config.profile_steps` names.

    profile_steps = (first_step, num_steps): steps counted as the state's step counter (the
    update from step s to s+1 is step s). The trace covers whole compiled calls (with
    steps_per_dispatch > 1 a call runs several steps), so it widens to the calls holding those
    steps, and it never includes this process's first call, which compiles the step. It is
    written where TensorBoard's profile plugin (and XProf) look:
    <tb_dir>/plugins/profile/<run>/<host>.xplane.pb, with the same trace for Perfetto beside
    it (perfetto_trace.json.gz) and in the Chrome trace format (<host>.trace.json.gz).

    Use it as a context manager around the training loop, calling `before_call` and
    `after_call` around each compiled call and `stop` after the last."""

    def __init__(
        self,
        profile_steps: Any,
        tb_dir: str,
        first_step_here: int,
        log: Callable[[str], None] = print,
    ):
        self.window = None if profile_steps is None else tuple(int(v) for v in profile_steps)
        self.tb_dir = tb_dir
        self.first_step_here = first_step_here  # the first call of this process compiles
        self.started_at: int | None = None
        self.done = False
        self._log = log

    def __enter__(self) -> StepProfiler:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        """Ends a trace still running when the loop ends inside the window (a preemption, an
        error), so the trace is written and the profiler freed."""
        if self.started_at is not None and not self.done:
            jax.profiler.stop_trace()
            self.done = True

    def before_call(self, step: int, n: int) -> None:
        """Starts the trace before the call that runs steps [step, step + n) if it is due."""
        if self.window is None or self.done or self.started_at is not None:
            return
        first, count = self.window
        if step + n <= first or step >= first + count or step == self.first_step_here:
            if step >= first + count:
                self.done = True  # resumed past the window, or it held only the compiling call
                self._log(
                    f"config.profile_steps={self.window}: no step of it left to profile after "
                    "the compiling call of this run; nothing traced."
                )
            return
        jax.profiler.start_trace(self.tb_dir, create_perfetto_trace=True)
        self.started_at = step

    def after_call(self, done: int, state: Any) -> None:
        """Stops the trace once the call that ends at step `done` holds the window's last
        step (waiting for the device to finish it)."""
        if self.started_at is None or self.done:
            return
        first, count = self.window
        if done >= first + count:
            self.stop(done, state)

    def stop(self, done: int, state: Any) -> None:
        """Finishes the trace (also when the loop ends or fails inside the window); at the end
        of a run that never reached the window, says that nothing was traced."""
        if self.window is not None and self.started_at is None and not self.done:
            self.done = True
            self._log(
                f"config.profile_steps={self.window}: the run ended at step {done}, before the "
                "window; nothing traced."
            )
            return
        if self.started_at is None or self.done:
            return
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        self.done = True
        where = os.path.join(self.tb_dir, "plugins", "profile")
        self._log(
            f"Profiled steps {self.started_at}-{done - 1} into {where} "
            "(docs/training.md: TensorBoard, XProf, Perfetto)"
        )
