"""The HTTP API (FastAPI): OpenAI-style completions with continuous batching, classification,
health and model description. `Service` holds the restored run; `create_app(service)` makes
the ASGI app that serve.py runs under uvicorn.

Every mistake in a request is a 4xx JSON error in OpenAI's shape, naming the field:
`{"error": {"message": "max_tokens: ...", "type": "invalid_request_error", "param":
"max_tokens", "code": null}}`; overload and warm-up are 503 with a Retry-After header.
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
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
from absl import logging
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import sampling
from serving import engine as engine_lib
from serving.classifier import Classifier, ImageError
from serving.schemas import MAX_SEED, ClassifyRequest, CompletionRequest

RETRY_AFTER_S = 1  # the retry hint of a 503


class ApiError(Exception):
    """A request the server refuses: HTTP `status`, the field it names (`param`), a message."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error") -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_response(status: int, message: str, param: str | None = None,
                   kind: str = "invalid_request_error") -> JSONResponse:  # fmt: skip
    """OpenAI's error body; 503s carry Retry-After."""
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


class Service:
    """A restored run being served: the batching engine (language models) or the classifier,
    warmed up in the background (`warm_up`) while /healthz says 'warming_up'.

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
        self._classify_waiting = 0
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

    # ----- completions

    def sequences(self, body: CompletionRequest) -> tuple[list[engine_lib.Sequence], int]:
        """The request's sequences (prompt by prompt, n choices each; choice i draws with
        seed + i) without their callbacks, and the number of prompt tokens. Raises ApiError
        naming the field for a prompt the tokenizer cannot encode, one longer than the
        context, or max_tokens past what the context leaves."""
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
            room = sampling.max_slot_tokens(int(ids.size), block_size)
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


def _field_of(loc: tuple) -> str:
    """pydantic's error location -> the field as a client names it ('prompt[2]')."""
    parts = [p for p in loc if p != "body"]
    if not parts or not isinstance(parts[0], str):
        return "body"
    return parts[0] + "".join(f"[{p}]" for p in parts[1:] if isinstance(p, int))


def _validation_message(errors: list[dict[str, Any]], accepted: list[str]) -> tuple[str, str]:
    """(message, field) of the first pydantic error, in one line."""
    first = max(errors, key=lambda e: len(e.get("loc", ())))  # the most precise location
    field = _field_of(tuple(first.get("loc", ())))
    kind = first.get("type", "")
    if kind == "json_invalid":
        return f"body: not valid JSON ({first.get('ctx', {}).get('error', first['msg'])})", "body"
    if kind == "missing":
        return (
            (f"{field}: required", field)
            if field != "body"
            else ("body: a JSON object is required", "body")
        )
    if kind == "extra_forbidden":
        return f"{field}: unknown field; the accepted fields are {', '.join(accepted)}", field
    if kind == "model_type" or (field == "body" and kind.endswith("_type")):
        return "body: must be a JSON object", "body"
    same = [e for e in errors if _field_of(tuple(e.get("loc", ()))) == field]
    message = " or ".join(dict.fromkeys(e["msg"] for e in same))
    return f"{field}: {message} (got {json.dumps(first.get('input'))[:80]})", field


def create_app(service: Service) -> FastAPI:
    """The ASGI app: /v1/completions, /v1/classify, /healthz, /v1/models."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=service.warm_up, name="warm-up", daemon=True).start()
        yield
        # uvicorn has stopped accepting and finished every in-flight request by now.
        await run_in_threadpool(service.shutdown)

    app = FastAPI(title="jaxlab serve", lifespan=lifespan)
    schemas = {"/v1/completions": CompletionRequest, "/v1/classify": ClassifyRequest}

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        schema = schemas.get(request.url.path)
        accepted = list(schema.model_fields) if schema else []
        message, field = _validation_message(list(exc.errors()), accepted)
        if field == "body" and "json" not in request.headers.get("content-type", ""):
            message = "body: send a JSON object with the header Content-Type: application/json"
        return error_response(400, message, field)

    @app.exception_handler(ApiError)
    async def refused(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.kind)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, f"{request.url.path}: {exc.detail}", None, kind)

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        logging.exception("unexpected error")
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", None,
                              "server_error")  # fmt: skip

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        status, body = service.health()
        headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
        return JSONResponse(body, status_code=status, headers=headers)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [service.describe()]}

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        service.check_request(body.model, "lm")
        sequences, prompt_tokens = service.sequences(body)
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()
        for i, seq in enumerate(sequences):
            seq.on_update = lambda text, finish, i=i: loop.call_soon_threadsafe(
                updates.put_nowait, (i, text, finish)
            )
        try:
            service.engine.submit(sequences)
        except engine_lib.OverloadedError as e:
            raise ApiError(503, f"overloaded: {e}; retry after {RETRY_AFTER_S} s", None,
                           "unavailable") from None  # fmt: skip
        completion_id = f"cmpl-{uuid.uuid4().hex}"
        head = {"id": completion_id, "object": "text_completion", "created": int(time.time()),
                "model": service.model_id}  # fmt: skip

        def usage() -> dict[str, int]:
            completion_tokens = sum(len(s.token_ids) for s in sequences)
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip

        if body.stream:

            async def events() -> AsyncIterator[str]:
                remaining = len(sequences)
                try:
                    while remaining:
                        i, text, finish = await updates.get()
                        remaining -= finish is not None
                        choice = {"index": i, "text": text, "logprobs": None,
                                  "finish_reason": finish}  # fmt: skip
                        yield f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"
                    if body.stream_options and body.stream_options.include_usage:
                        last = {**head, "choices": [], "usage": usage()}
                        yield f"data: {json.dumps(last)}\n\n"
                    yield "data: [DONE]\n\n"
                finally:  # the client left (or we are done): free the slots
                    service.engine.cancel(sequences)

            return StreamingResponse(events(), media_type="text/event-stream")

        texts = [""] * len(sequences)
        remaining = len(sequences)
        try:
            while remaining:
                # Without streaming each sequence reports once, at its end; meanwhile, a client
                # that hung up frees the slots its sequences hold.
                try:
                    i, text, finish = await asyncio.wait_for(updates.get(), timeout=1.0)
                except TimeoutError:
                    if await request.is_disconnected():
                        return JSONResponse({}, status_code=499)  # nobody reads it
                    continue
                texts[i] += text
                remaining -= finish is not None
        finally:
            service.engine.cancel(sequences)
        if any(s.finish_reason == "error" for s in sequences):
            raise RuntimeError("decoding failed: " + texts[0])
        choices = [
            {"index": i, "text": t, "logprobs": None, "finish_reason": s.finish_reason}
            for i, (t, s) in enumerate(zip(texts, sequences, strict=True))
        ]
        return {**head, "choices": choices, "usage": usage()}

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest) -> dict[str, Any]:
        service.check_request(body.model, "classification")
        classifier = service.classifier
        if body.top_k > classifier.num_classes:
            raise ApiError(400, f"top_k: {body.top_k}, but the model has "
                           f"{classifier.num_classes} classes", "top_k")  # fmt: skip
        try:
            images = np.stack(
                [classifier.decode_image(f"images[{i}]", im) for i, im in enumerate(body.images)]
            )
        except ImageError as e:
            raise ApiError(400, str(e), e.field) from None
        with service._classify_lock:
            if service._classify_waiting >= service.max_waiting:
                raise ApiError(
                    503,
                    f"overloaded: {service._classify_waiting} requests are "
                    f"waiting; retry after {RETRY_AFTER_S} s",
                    None,
                    "unavailable",
                )
            service._classify_waiting += 1
        try:
            probs = await run_in_threadpool(classifier.predict, images)
        finally:
            with service._classify_lock:
                service._classify_waiting -= 1
        data = []
        for i, p in enumerate(probs):
            top = np.argsort(-p, kind="stable")[: body.top_k]
            data.append({
                "index": i,
                "label": int(top[0]),
                "probabilities": [float(x) for x in p],
                "top": [{"label": int(c), "probability": float(p[c])} for c in top],
            })  # fmt: skip
        return {"object": "classification", "model": service.model_id, "data": data}

    return app
