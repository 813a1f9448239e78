"""The HTTP API (FastAPI): OpenAI-style completions (with log-probabilities and echo) and chat
completions with continuous batching, classification, health, model description and the
tokenizer routes of vLLM's server that lm-eval's remote tokenizer calls. `create_app(service)`
makes the ASGI app that serve.py runs under uvicorn: a thin layer over serving/service.py's
`Service`, which holds the restored run, checks requests, admits them (or refuses with 503)
and makes their answers.

Every mistake in a request is a 4xx JSON error in OpenAI's shape, naming the field:
`{"error": {"message": "max_tokens: ...", "type": "invalid_request_error", "param":
"max_tokens", "code": null}}`; overload and warm-up are 503 with a Retry-After header.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import AsyncIterator
from typing import Any

from absl import logging
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.completion import Completion
from serving.schemas import (
    ChatCompletionRequest,
    ClassifyRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from serving.service import RETRY_AFTER_S, ApiError, Service

# The body schema of each POST route: a validation error there lists its accepted fields.
SCHEMAS = {
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/classify": ClassifyRequest,
    "/tokenize": TokenizeRequest,
    "/detokenize": DetokenizeRequest,
}


def error_response(status: int, message: str, param: str | None = None,
                   kind: str = "invalid_request_error") -> JSONResponse:  # fmt: skip
    """OpenAI's error body; 503s carry Retry-After."""
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


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


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's JSON error body: request validation (400 naming the field),
    ApiError (its status), Starlette's routing errors (404, 405) and bugs (500, logged)."""

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        schema = SCHEMAS.get(request.url.path)
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


async def _answer(completion: Completion, request: Request) -> Any:
    """A completion's answer: its event stream, or its whole body (499 if the client left)."""
    if completion.body.stream:
        return StreamingResponse(completion.events(), media_type="text/event-stream")
    reply = await completion.result(request.is_disconnected)
    if reply is None:
        return JSONResponse({}, status_code=499)  # the client left: nobody reads it
    return reply


def create_app(service: Service) -> FastAPI:
    """The ASGI app: /v1/completions, /v1/chat/completions, /v1/classify, /healthz, /v1/models
    (and /v1/models/{id}), /tokenizer_info, /tokenize, /detokenize, each route one or two
    calls of `service` (which raises ApiError for what it refuses)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=service.warm_up, name="warm-up", daemon=True).start()
        yield
        # uvicorn has stopped accepting and finished every in-flight request by now.
        await run_in_threadpool(service.shutdown)

    app = FastAPI(title="jaxlab serve", lifespan=lifespan)
    _add_error_handlers(app)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        status, body = service.health()
        headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
        return JSONResponse(body, status_code=status, headers=headers)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [service.describe()]}

    @app.get("/v1/models/{model_id}")
    async def retrieve_model(model_id: str) -> dict[str, Any]:
        return service.model(model_id)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await _answer(service.start_completion(body), request)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        return await _answer(service.start_chat(body), request)

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        return service.tokenizer_info()

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        return service.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        return service.detokenize(body)

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest) -> dict[str, Any]:
        images = service.classify_inputs(body)
        with service.admit_classification():
            probs = await run_in_threadpool(service.predict, images)
        return service.classification(body, probs)

    return app
