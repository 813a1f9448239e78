"""The served run behind the HTTP API (serving/api.py, which only routes and renders): what a
request may ask, whether it is let in, and its answer. `Service` holds the restored run (the
batching engine and the scorer of a language model, or a classifier);
serving/completion.py's `Completion` is one admitted completion request. Refusals are
`ApiError`s carrying the HTTP status and OpenAI's error fields.

What the server cannot honour is refused with the reason, never ignored: a non-zero penalty,
`best_of` above `n`, a `logit_bias` or a `suffix`, log-probabilities or echo while streaming.
What changes nothing is accepted (penalties 0, `best_of` = n, `user`, nulls).

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

import contextlib
import json
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from absl import logging

from serving import chat as chat_lib
from serving import engine as engine_lib
from serving import logprobs as logprobs_lib
from serving import slots
from serving.classifier import Classifier, ImageError
from serving.completion import Completion, Prompt
from serving.schemas import (
    MAX_SEED,
    ChatCompletionRequest,
    ClassifyRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)

RETRY_AFTER_S = 1  # the retry hint of a 503


class ApiError(Exception):
    """A request the server refuses: HTTP `status`, the field it names (`param`), a message,
    and OpenAI's error type (`kind`)."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error") -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


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
      slide_window: language models: generate past the context, nanoGPT's way
        (serving/engine.py); else max_tokens is bounded by what the context leaves.
      score_rows: language models: windows per call of the scoring program (logprobs, echo).
      chat_template: language models: a chat template file (serving/chat.py says where a
        run's own is looked for); chat is refused without one.

    Raises chat.TemplateError for a chat template that cannot be read.
    """

    def __init__(self, restored: Any, workdir: str, *, num_slots: int = 32,
                 max_waiting: int = 64, classify_batch_size: int = 64,
                 slide_window: bool = False, score_rows: int = 8,
                 chat_template: str | None = None) -> None:  # fmt: skip
        engine_lib.compilations()  # start counting before anything compiles
        self.restored = restored
        self.workdir = os.path.abspath(workdir)
        self.model_id = os.path.basename(self.workdir.rstrip("/"))
        self.task = restored.config.task
        self.max_waiting = max_waiting
        self.created = int(time.time())
        self.engine: engine_lib.LMEngine | None = None
        self.classifier: Classifier | None = None
        self.scorer: logprobs_lib.Scorer | None = None
        self.chat_template: str | None = None
        if self.task == "lm":
            self.engine = engine_lib.LMEngine(
                restored.model, restored.params, restored.tokenizer, num_slots, max_waiting,
                slide_window,
            )  # fmt: skip
            self.scorer = logprobs_lib.Scorer(restored, score_rows)
            self.chat_template = chat_lib.find_template(self.workdir, chat_template)
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
            start = time.perf_counter()
            part = self.engine if self.engine is not None else self.classifier
            part.warm_up()
            if self.engine is not None:
                self.scorer.warm_up()
                self.engine.start()
            self.warmup_s = time.perf_counter() - start
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
                slide_window=self.engine.slide_window,
                chat_template=self.chat_template is not None,
            )
        else:
            entry.update(
                image_shape=list(self.classifier.image_shape),
                num_classes=self.classifier.num_classes,
            )
        return entry

    def model(self, model_id: str) -> dict[str, Any]:
        """GET /v1/models/{id}: `describe()` if `model_id` is the served model; else ApiError
        404 naming it."""
        if model_id != self.model_id:
            raise ApiError(404, f"model: {model_id!r} is not served here; this server serves "
                           f"{self.model_id!r}", "model", "not_found_error")  # fmt: skip
        return self.describe()

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

    def start_completion(self, body: CompletionRequest, chat: bool = False) -> Completion:
        """Checks the request (`check_request`, `check_served`, `prompts`, `sequences`) and
        admits its sequences (`admit`): the Completion to read. Call from the event loop that
        serves the request. Raises ApiError (4xx naming the field, or 503)."""
        self.check_request(body.model, "lm")
        self.check_served(body)
        self.first_seed(body)  # the request's size, before encoding its prompts
        prompts = self.prompts(body)
        sequences = self.sequences(body, prompts)
        completion = Completion(sequences, prompts, body, self.model_id, self.release,
                                self.restored.tokenizer, self.scorer.score, chat)  # fmt: skip
        if sequences:
            self.admit(sequences)
        return completion

    def check_served(self, body: CompletionRequest) -> None:
        """Raises ApiError 400 naming the field for a value the server cannot honour (a
        penalty, best_of above n, logit_bias, suffix, logprobs or echo with stream, max_tokens
        0 without echo); values that change nothing pass."""

        def refuse(field: str, message: str) -> None:
            raise ApiError(400, f"{field}: {message}", field)

        for field in ("presence_penalty", "frequency_penalty"):
            if getattr(body, field) != 0:
                refuse(field, f"{getattr(body, field)}: the server applies no penalties; send 0 "
                       "or leave it out")  # fmt: skip
        if body.best_of is not None and body.best_of != body.n:
            refuse("best_of", f"{body.best_of}: ranking extra choices by log-probability is not "
                   f"served; leave it out (or send n={body.n})")  # fmt: skip
        if body.logit_bias:
            refuse("logit_bias", "biasing tokens is not served; leave it out (or send {})")
        if body.suffix:
            refuse("suffix", "text after the completion (insertion) is not served by a "
                   "left-to-right model; leave it out")  # fmt: skip
        if body.stream and (body.logprobs is not None or body.echo):
            field = "logprobs" if body.logprobs is not None else "echo"
            refuse(field, "not served with stream: true; send stream: false")
        if body.max_tokens == 0 and not body.echo:
            refuse("max_tokens", "0 generates nothing; send at least 1, or echo: true to score "
                   "the prompt alone")  # fmt: skip

    def first_seed(self, body: CompletionRequest) -> int:
        """The seed of the request's first choice (random if not given). Raises ApiError
        naming the field for more sequences than may wait, or seeds past 2**31 - 1."""
        num_prompts = len(body.prompts())
        total = num_prompts * body.n
        if total > self.max_waiting:
            raise ApiError(
                400,
                f"n: {num_prompts} prompt(s) x n={body.n} = {total} sequences; "
                f"this server takes at most {self.max_waiting} per request",
                "n",
            )
        seed = secrets.randbelow(MAX_SEED + 2 - total) if body.seed is None else body.seed
        if seed + total - 1 > MAX_SEED:
            raise ApiError(400, f"seed: seed + {total - 1} (one per choice) must stay below "
                           "2**31", "seed")  # fmt: skip
        return seed

    def prompts(self, body: CompletionRequest) -> list[Prompt]:
        """Each prompt's token ids and text (a string encoded, token ids checked against the
        vocabulary and decoded). Raises ApiError 400 naming the prompt for text the tokenizer
        cannot encode, an id outside the vocabulary, no tokens, or more tokens than the
        context."""
        tokenizer, block_size = self.restored.tokenizer, self.engine.block_size
        prompts = []
        for p, given in enumerate(body.prompts()):
            single = isinstance(body.prompt, str) or isinstance(body.prompt[0], int)
            field = "prompt" if single else f"prompt[{p}]"
            try:
                if isinstance(given, str):
                    ids, text = np.asarray(tokenizer.encode(given), np.int32), given
                else:
                    ids = np.asarray(given, np.int32)
                    if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
                        bad = int(ids[(ids < 0) | (ids >= tokenizer.vocab_size)][0])
                        raise ValueError(f"token id {bad} is outside the vocabulary [0, "
                                         f"{tokenizer.vocab_size})")  # fmt: skip
                    text = tokenizer.decode(ids)
            except (ValueError, OverflowError) as e:
                raise ApiError(400, f"{field}: {e}", "prompt") from None
            if ids.size == 0:
                raise ApiError(400, f"{field}: encodes to no tokens; give at least one "
                               "character", "prompt")  # fmt: skip
            if ids.size > block_size:
                raise ApiError(400, f"{field}: {ids.size} tokens, but the model's context is "
                               f"{block_size} tokens; shorten the prompt", "prompt")  # fmt: skip
            prompts.append(Prompt(ids, text))
        return prompts

    def sequences(
        self, body: CompletionRequest, prompts: list[Prompt]
    ) -> list[engine_lib.Sequence]:
        """The request's sequences (prompt by prompt, n choices each; choice i draws with
        seed + i) without their callbacks; none for max_tokens 0. Raises ApiError naming the
        field for more sequences than may wait (`first_seed`), or (without the sliding window)
        max_tokens past what the context leaves."""
        block_size = self.engine.block_size
        seed = self.first_seed(body)
        if body.max_tokens == 0:
            return []
        sequences = []
        for prompt in prompts:
            room = slots.max_slot_tokens(len(prompt.ids), block_size)
            if body.max_tokens > room and not self.engine.slide_window:
                raise ApiError(
                    400,
                    f"max_tokens={body.max_tokens}: a {len(prompt.ids)}-token prompt leaves "
                    f"room for at most {room} new tokens in the model's {block_size}-token "
                    "context (this server does not slide the window: serve.py --slide_window "
                    "does, as sample.py)",
                    "max_tokens",
                )
            for _ in range(body.n):
                sequences.append(
                    engine_lib.Sequence(
                        prompt_ids=prompt.ids,
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
        return sequences

    def start_chat(self, body: ChatCompletionRequest) -> Completion:
        """A chat completion: the messages rendered by the run's chat template into one prompt
        (serving/chat.py), then `start_completion`. max_tokens defaults to what the context
        leaves (OpenAI's chat has no fixed default). Raises ApiError 400 for a run without a
        chat template (pointing to /v1/completions), a template that refuses the
        conversation, or a field the server cannot honour."""
        self.check_request(body.model, "lm")
        if self.chat_template is None:
            raise ApiError(400, "messages: this model has no chat template (a base model "
                           "trained on plain text); send the text as a prompt to "
                           "/v1/completions", "messages")  # fmt: skip
        if body.logprobs:
            raise ApiError(400, "logprobs: not served for chat; /v1/completions serves "
                           "logprobs and echo", "logprobs")  # fmt: skip
        if body.logit_bias:
            raise ApiError(400, "logit_bias: biasing tokens is not served; leave it out",
                           "logit_bias")  # fmt: skip
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            eot = self.restored.tokenizer.eot_id
            eos = None if eot is None else logprobs_lib.token_text(self.restored.tokenizer, eot)
            prompt = chat_lib.render(self.chat_template, messages, eos)
        except ValueError as e:  # a non-text part, or the template's own refusal
            raise ApiError(400, f"messages: {e}", "messages") from None
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:
            try:
                length = len(self.restored.tokenizer.encode(prompt))
            except ValueError as e:
                raise ApiError(400, f"messages: {e}", "messages") from None
            max_tokens = max(1, slots.max_slot_tokens(length, self.engine.block_size))
        fields = ("temperature", "top_p", "top_k", "n", "seed", "stop", "stream",
                  "stream_options", "presence_penalty", "frequency_penalty")  # fmt: skip
        request = CompletionRequest.model_construct(
            prompt=prompt, max_tokens=max_tokens, model=None, logprobs=None, echo=False,
            best_of=None, logit_bias=None, suffix=None, user=None,
            **{f: getattr(body, f) for f in fields},
        )  # fmt: skip
        return self.start_completion(request, chat=True)

    # ----- the tokenizer (vLLM's routes, which lm-eval's remote tokenizer calls)

    def tokenizer_info(self) -> dict[str, Any]:
        """GET /tokenizer_info: the end-of-text token's text (eos_token; null if the vocabulary
        has none), no bos or pad token, the chat template (or null), the context length, the
        tokenizer's kind and vocabulary size."""
        self.check_request(None, "lm")
        tokenizer = self.restored.tokenizer
        eot = tokenizer.eot_id
        return {
            "eos_token": None if eot is None else logprobs_lib.token_text(tokenizer, eot),
            "bos_token": None,
            "pad_token": None,
            "chat_template": self.chat_template,
            "model_max_length": self.engine.block_size,
            "tokenizer_class": type(tokenizer).__name__,
            "vocab_size": tokenizer.vocab_size,
        }

    def tokenize(self, body: TokenizeRequest) -> dict[str, Any]:
        """POST /tokenize: the prompt's token ids (as /v1/completions encodes it: ordinary
        text), except that the end-of-text token's own text gives its id, as Hugging Face
        tokenizers give special tokens' (lm-eval finds the id so). Raises ApiError 400 naming
        the prompt for text the tokenizer cannot encode."""
        self.check_request(body.model, "lm")
        tokenizer = self.restored.tokenizer
        eot = tokenizer.eot_id
        if eot is not None and body.prompt == logprobs_lib.token_text(tokenizer, eot):
            tokens = [int(eot)]
        else:
            try:
                tokens = [int(t) for t in tokenizer.encode(body.prompt)]
            except ValueError as e:
                raise ApiError(400, f"prompt: {e}", "prompt") from None
        return {"tokens": tokens, "count": len(tokens), "max_model_len": self.engine.block_size}

    def detokenize(self, body: DetokenizeRequest) -> dict[str, Any]:
        """POST /detokenize: the text of token ids. Raises ApiError 400 naming tokens for an id
        outside the vocabulary."""
        self.check_request(body.model, "lm")
        try:
            return {"prompt": self.restored.tokenizer.decode(np.asarray(body.tokens, np.int64))}
        except (ValueError, OverflowError) as e:
            raise ApiError(400, f"tokens: {e}", "tokens") from None

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
