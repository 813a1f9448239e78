"""The served run behind the HTTP API (serving/api.py, which only routes and renders): what a
request may ask, whether it is let in, and its answer. `Service` holds the restored run (the
batching engine of a language model, or a classifier); `Completion` is one admitted completion
request. Refusals are `ApiError`s carrying the HTTP status and OpenAI's error fields.

Admission control is the service's: a request that finds no room is refused at once with a 503
(`ApiError`, the API's Retry-After hint in its message) rather than waiting for room, so a busy
server answers quickly and clients back off. Room is:
- completions: at most `max_waiting` sequences waiting for one of the engine's `num_slots`
  decoding slots (the engine's waiting line, `Service.admit`); a request of more sequences
  than that could never fit and is a 400 naming `n`;
- classification: at most `max_waiting` requests being classified or waiting to be
  (`Service.admit_classification`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import numpy as np
from absl import logging

from serving import engine as engine_lib
from serving import slots
from serving.classifier import Classifier, ImageError
from serving.schemas import MAX_SEED, ClassifyRequest, CompletionRequest

RETRY_AFTER_S = 1  # the retry hint of a 503


class ApiError(Exception):
    """A request the server refuses: HTTP `status`, the field it names (`param`), a message,
    and OpenAI's error type (`kind`)."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error") -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


class Completion:
    """One admitted completion request: its sequences decode in the engine's thread and report
    to the event loop serving the request. Made by `Service.start_completion` (in that loop);
    read it once, with `events()` (streaming) or `result()`. Either releases the sequences
    when it ends, finished or not, so a client that leaves frees its slots.

    Args:
      sequences: the request's sequences (choice i is sequences[i]); their `on_update` is set
        here, before they are admitted, so that no update is lost.
      prompt_tokens: the request's prompt tokens, for `usage`.
      body: the request.
      model_id: the served model's id.
      release: cancels the sequences still in the engine (`Service.release`).
    """

    def __init__(self, sequences: list[engine_lib.Sequence], prompt_tokens: int,
                 body: CompletionRequest, model_id: str,
                 release: Callable[[list[engine_lib.Sequence]], None]) -> None:  # fmt: skip
        self.sequences, self.prompt_tokens, self.body = sequences, prompt_tokens, body
        self._release = release
        # (choice, new text, finish reason or None), put by the engine's thread via the loop.
        self._updates: asyncio.Queue[tuple[int, str, str | None]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        for i, seq in enumerate(sequences):
            seq.on_update = lambda text, finish, i=i: loop.call_soon_threadsafe(
                self._updates.put_nowait, (i, text, finish)
            )
        self.head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                     "created": int(time.time()), "model": model_id}  # fmt: skip

    def usage(self) -> dict[str, int]:
        """OpenAI's token counts: prompt, completion (generated so far) and total."""
        completion_tokens = sum(len(s.token_ids) for s in self.sequences)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}  # fmt: skip

    async def events(self) -> AsyncIterator[str]:
        """The server-sent events of a streamed completion: one `data: {json}` event per piece
        of a choice's text (its finish reason on the last), the usage if the request asked for
        it, then `data: [DONE]`."""
        remaining = len(self.sequences)
        try:
            while remaining:
                i, text, finish = await self._updates.get()
                remaining -= finish is not None
                choice = {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
                yield f"data: {json.dumps({**self.head, 'choices': [choice]})}\n\n"
            if self.body.stream_options and self.body.stream_options.include_usage:
                last = {**self.head, "choices": [], "usage": self.usage()}
                yield f"data: {json.dumps(last)}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # the client left (or we are done): free the slots
            self._release(self.sequences)

    async def result(self, is_disconnected: Callable[[], Awaitable[bool]]) -> dict[str, Any] | None:
        """The whole completion (OpenAI's body: choices and usage) once every choice has ended;
        None if `is_disconnected()` says the client left first (its sequences are cancelled).

        Raises RuntimeError if decoding failed (the engine's error, a bug)."""
        texts = [""] * len(self.sequences)
        remaining = len(self.sequences)
        try:
            while remaining:
                # Without streaming each sequence reports once, at its end; meanwhile, a client
                # that hung up frees the slots its sequences hold.
                try:
                    i, text, finish = await asyncio.wait_for(self._updates.get(), timeout=1.0)
                except TimeoutError:
                    if await is_disconnected():
                        return None
                    continue
                texts[i] += text
                remaining -= finish is not None
        finally:
            self._release(self.sequences)
        if any(s.finish_reason == "error" for s in self.sequences):
            raise RuntimeError("decoding failed: " + texts[0])
        choices = [
            {"index": i, "text": t, "logprobs": None, "finish_reason": s.finish_reason}
            for i, (t, s) in enumerate(zip(texts, self.sequences, strict=True))
        ]
        return {**self.head, "choices": choices, "usage": self.usage()}


class Service:
    """A restored run being served: the batching engine (language models) or the classifier,
    warmed up in the background (`warm_up`) while /healthz says 'warming_up'. Admission
    control (the module docstring) is `admit`/`release` for completions and
    `admit_classification` for classification.

    Args:
      restored: experiment.restore_run's result.
      workdir: the run's directory (its base name is the model id).
      num_slots: language models: sequences decoded together.
      max_waiting: sequences (or classify requests) that may wait; more get 503.
      classify_batch_size: classifiers: images per compiled call.
    """

    def __init__(self, restored: Any, workdir: str, *, num_slots: int = 32,
                 max_waiting: int = 64, classify_batch_size: int = 64) -> None:  # fmt: skip
        engine_lib.compilations()  # start counting before anything compiles
        self.restored = restored
        self.workdir = os.path.abspath(workdir)
        self.model_id = os.path.basename(self.workdir.rstrip("/"))
        self.task = restored.config.task
        self.max_waiting = max_waiting
        self.created = int(time.time())
        self.engine: engine_lib.LMEngine | None = None
        self.classifier: Classifier | None = None
        if self.task == "lm":
            self.engine = engine_lib.LMEngine(
                restored.model, restored.params, restored.tokenizer, num_slots, max_waiting
            )
        else:
            self.classifier = Classifier(restored, classify_batch_size)
        self._classify_waiting = 0  # classify requests admitted and not yet answered
        self._classify_lock = threading.Lock()
        self.ready = threading.Event()
        self.warmup_error: str | None = None
        self.warmup_s: float | None = None
        self.compilations_at_ready: int | None = None
        self.on_fatal: Callable[[], None] = lambda: None  # serve.py: stop the HTTP server

    def warm_up(self) -> None:
        """Compiles every program the requests will use, then marks the service ready."""
        try:
            part = self.engine if self.engine is not None else self.classifier
            self.warmup_s = part.warm_up()
            if self.engine is not None:
                self.engine.start()
            self.compilations_at_ready = engine_lib.compilations()
            self.ready.set()
            print(f"ready: {self.model_id} warmed up in {self.warmup_s:.1f} s", flush=True)
        except Exception as e:  # a bug or a model that cannot run: say so and stop serving
            logging.exception("warm-up failed")
            self.warmup_error = f"{type(e).__name__}: {e}"
            self.on_fatal()

    def shutdown(self) -> None:
        """Finishes what the engine holds and stops its thread."""
        if self.engine is not None:
            self.engine.stop()

    def health(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body) of /healthz."""
        if self.warmup_error is not None:
            return 503, {"status": "failed", "error": self.warmup_error}
        if not self.ready.is_set():
            return 503, {"status": "warming_up"}
        body: dict[str, Any] = {
            "status": "ready",
            "model": self.model_id,
            "task": self.task,
            "step": self.restored.step,
            "warmup_s": self.warmup_s,
            "compilations_since_ready": engine_lib.compilations() - self.compilations_at_ready,
        }
        if self.engine is not None:
            body.update(self.engine.stats())
        return 200, body

    def describe(self) -> dict[str, Any]:
        """The /v1/models entry: id, task, checkpoint step, parameter count and config."""
        run = self.restored.run
        entry = {
            "id": self.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "jaxlab",
            "task": self.task,
            "workdir": self.workdir,
            "step": self.restored.step,
            "num_params": run.num_params,
            "config": json.loads(run.config.to_json_best_effort()),
        }
        if self.engine is not None:
            entry.update(
                block_size=self.engine.block_size,
                tokenizer=self.restored.tokenizer.describe(),
                slots=self.engine.num_slots,
            )
        else:
            entry.update(
                image_shape=list(self.classifier.image_shape),
                num_classes=self.classifier.num_classes,
            )
        return entry

    def check_request(self, model: str | None, task: str) -> None:
        """Raises ApiError for a request to a model or task this server does not serve, or one
        that arrives before warm-up has finished."""
        if model is not None and model != self.model_id:
            raise ApiError(
                404,
                f"model: {model!r} is not served here; this server serves "
                f"{self.model_id!r} (GET /v1/models)",
                "model",
                "not_found_error",
            )
        if task != self.task:
            route = "/v1/completions" if self.task == "lm" else "/v1/classify"
            what = "language" if self.task == "lm" else self.task
            raise ApiError(404, f"this server serves a {what} model: use {route}", None,
                           "not_found_error")  # fmt: skip
        if not self.ready.is_set():
            raise ApiError(503, "the model is warming up; retry shortly", None, "unavailable")

    # ----- admission control

    def admit(self, sequences: list[engine_lib.Sequence]) -> None:
        """Queues a completion's sequences for the engine's slots, all or none; the caller
        `release`s them when it stops listening. Raises ApiError 503 (overloaded) when the
        waiting line cannot take them all or the server is shutting down."""
        try:
            self.engine.submit(sequences)
        except engine_lib.OverloadedError as e:
            raise ApiError(503, f"overloaded: {e}; retry after {RETRY_AFTER_S} s", None,
                           "unavailable") from None  # fmt: skip

    def release(self, sequences: list[engine_lib.Sequence]) -> None:
        """Cancels admitted sequences that have not ended (finished ones are unaffected): each
        frees its slot, or its place in line, before the engine's next step."""
        self.engine.cancel(sequences)

    @contextlib.contextmanager
    def admit_classification(self) -> Iterator[None]:
        """Holds one of the `max_waiting` places of classify requests for the `with` block.
        Raises ApiError 503 (overloaded), entering nothing, when every place is taken."""
        with self._classify_lock:
            if self._classify_waiting >= self.max_waiting:
                raise ApiError(
                    503,
                    f"overloaded: {self._classify_waiting} requests are "
                    f"waiting; retry after {RETRY_AFTER_S} s",
                    None,
                    "unavailable",
                )
            self._classify_waiting += 1
        try:
            yield
        finally:
            with self._classify_lock:
                self._classify_waiting -= 1

    # ----- completions

    def start_completion(self, body: CompletionRequest) -> Completion:
        """Checks the request (`check_request`, `sequences`) and admits its sequences (`admit`):
        the Completion to read. Call from the event loop that serves the request. Raises
        ApiError (4xx naming the field, or 503)."""
        self.check_request(body.model, "lm")
        sequences, prompt_tokens = self.sequences(body)
        completion = Completion(sequences, prompt_tokens, body, self.model_id, self.release)
        self.admit(sequences)
        return completion

    def sequences(self, body: CompletionRequest) -> tuple[list[engine_lib.Sequence], int]:
        """The request's sequences (prompt by prompt, n choices each; choice i draws with
        seed + i) without their callbacks, and the number of prompt tokens. Raises ApiError
        naming the field for more sequences than may wait, a prompt the tokenizer cannot
        encode, one longer than the context, or max_tokens past what the context leaves."""
        tokenizer, block_size = self.restored.tokenizer, self.engine.block_size
        prompts = body.prompts()
        total = len(prompts) * body.n
        if total > self.max_waiting:
            raise ApiError(
                400,
                f"n: {len(prompts)} prompt(s) x n={body.n} = {total} sequences; "
                f"this server takes at most {self.max_waiting} per request",
                "n",
            )
        seed = secrets.randbelow(MAX_SEED + 2 - total) if body.seed is None else body.seed
        if seed + total - 1 > MAX_SEED:
            raise ApiError(400, f"seed: seed + {total - 1} (one per choice) must stay below "
                           "2**31", "seed")  # fmt: skip
        sequences, prompt_tokens = [], 0
        for p, text in enumerate(prompts):
            field = "prompt" if isinstance(body.prompt, str) else f"prompt[{p}]"
            try:
                ids = np.asarray(tokenizer.encode(text), np.int32)
            except ValueError as e:
                raise ApiError(400, f"{field}: {e}", "prompt") from None
            if ids.size == 0:
                raise ApiError(400, f"{field}: encodes to no tokens; give at least one "
                               "character", "prompt")  # fmt: skip
            if ids.size > block_size:
                raise ApiError(400, f"{field}: {ids.size} tokens, but the model's context is "
                               f"{block_size} tokens; shorten the prompt", "prompt")  # fmt: skip
            room = slots.max_slot_tokens(int(ids.size), block_size)
            if body.max_tokens > room:
                raise ApiError(
                    400,
                    f"max_tokens={body.max_tokens}: a {ids.size}-token prompt leaves room for "
                    f"at most {room} new tokens in the model's {block_size}-token context "
                    "(the server does not slide the window; sample.py does)",
                    "max_tokens",
                )
            prompt_tokens += int(ids.size)
            for _ in range(body.n):
                sequences.append(
                    engine_lib.Sequence(
                        prompt_ids=ids,
                        max_tokens=body.max_tokens,
                        temperature=body.temperature,
                        top_k=body.top_k,
                        top_p=body.top_p,
                        seed=seed + len(sequences),
                        stop=body.stops(),
                        on_update=lambda text, finish: None,
                        stream=body.stream,
                    )
                )
        return sequences, prompt_tokens

    # ----- classification

    def classify_inputs(self, body: ClassifyRequest) -> np.ndarray:
        """The request's images as raw pixels [N, H, W, C] in the model's dtype. Raises ApiError
        for a request this server does not serve (`check_request`), a top_k beyond the classes
        or an image the model does not take (naming it, e.g. 'images[2]')."""
        self.check_request(body.model, "classification")
        classifier = self.classifier
        if body.top_k > classifier.num_classes:
            raise ApiError(400, f"top_k: {body.top_k}, but the model has "
                           f"{classifier.num_classes} classes", "top_k")  # fmt: skip
        try:
            return np.stack(
                [classifier.decode_image(f"images[{i}]", im) for i, im in enumerate(body.images)]
            )
        except ImageError as e:
            raise ApiError(400, str(e), e.field) from None

    def predict(self, images: np.ndarray) -> np.ndarray:
        """float64 class probabilities [N, classes] of `classify_inputs`' images (blocking: the
        compiled predict step, batch by batch; call it off the event loop)."""
        return self.classifier.predict(images)

    def classification(self, body: ClassifyRequest, probs: np.ndarray) -> dict[str, Any]:
        """The /v1/classify answer for probabilities [N, classes]: per image its label, every
        class's probability and the body.top_k most likely labels, most likely first."""
        data = []
        for i, p in enumerate(probs):
            top = np.argsort(-p, kind="stable")[: body.top_k]
            data.append({
                "index": i,
                "label": int(top[0]),
                "probabilities": [float(x) for x in p],
                "top": [{"label": int(c), "probability": float(p[c])} for c in top],
            })  # fmt: skip
        return {"object": "classification", "model": self.model_id, "data": data}
