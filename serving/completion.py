"""One admitted completion request (serving/service.py makes it): its sequences decode in the
engine's thread and report to the event loop serving the request, which renders OpenAI's
answer, a completion (`text_completion`) or a chat completion (`chat.completion`), whole or
streamed. The prompt's echo and the log-probabilities (serving/logprobs.py) are added once the
choices have ended.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np

from serving import engine as engine_lib
from serving import logprobs as logprobs_lib
from serving.schemas import CompletionRequest


@dataclasses.dataclass
class Prompt:
    """One prompt of a request: its token ids and its text (a string prompt's own text, or the
    decoding of a token-id prompt)."""

    ids: np.ndarray  # int32 [prompt_len], prompt_len >= 1
    text: str


def listed_ids(tokenizer: Any, seq: engine_lib.Sequence, text: str) -> list[int]:
    """The generated ids a choice's logprobs list: those whose text the choice holds (a stop
    string cuts the text, and the tokens past the cut), then the end-of-text token if it ended
    the choice."""
    ids = list(seq.token_ids)
    if seq.output is not None and seq.output.stop_at is not None:
        m = 0
        while m < len(ids) and len(tokenizer.decode(np.asarray(ids[:m], np.int32))) < len(text):
            m += 1
        ids = ids[:m]
    if seq.ended_by_eot and tokenizer.eot_id is not None:
        ids.append(int(tokenizer.eot_id))
    return ids


class Completion:
    """One admitted completion request. Made by `Service.start_completion` (in the event loop
    that serves it); read it once, with `events()` (streaming) or `result()`. Either releases
    the sequences when it ends, finished or not, so a client that leaves frees its slots.

    Args:
      sequences: the request's sequences (choice i is sequences[i]; none when max_tokens is 0,
        the prompts only being echoed and scored); their `on_update` is set here, before they
        are admitted, so that no update is lost.
      prompts: the request's prompts (choice i is of prompts[i // n]).
      body: the request (a chat request arrives converted to one).
      model_id: the served model's id.
      release: cancels the sequences still in the engine (`Service.release`).
      tokenizer: the run's tokenizer (for echo and logprobs).
      score: `logprobs.Scorer.score` (blocking; called off the event loop), for logprobs.
      chat: render the answer as a chat completion (`message`, `delta`) instead.
    """

    def __init__(self, sequences: list[engine_lib.Sequence], prompts: list[Prompt],
                 body: CompletionRequest, model_id: str,
                 release: Callable[[list[engine_lib.Sequence]], None], tokenizer: Any = None,
                 score: Callable[[list[np.ndarray]], list[logprobs_lib.Scores]] | None = None,
                 chat: bool = False) -> None:  # fmt: skip
        self.sequences, self.prompts, self.body = sequences, prompts, body
        self.prompt_tokens = sum(len(p.ids) for p in prompts)
        self._release, self._tokenizer, self._score, self.chat = release, tokenizer, score, chat
        # (choice, new text, finish reason or None), put by the engine's thread via the loop.
        self._updates: asyncio.Queue[tuple[int, str, str | None]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        for i, seq in enumerate(sequences):
            seq.on_update = lambda text, finish, i=i: loop.call_soon_threadsafe(
                self._updates.put_nowait, (i, text, finish)
            )
        kind = "chat.completion" if chat else "text_completion"
        prefix = "chatcmpl" if chat else "cmpl"
        self.head = {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind,
                     "created": int(time.time()), "model": model_id}  # fmt: skip

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.body.n

    def usage(self) -> dict[str, int]:
        """OpenAI's token counts: prompt, completion (generated so far) and total."""
        completion_tokens = sum(len(s.token_ids) for s in self.sequences)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}  # fmt: skip

    def _event(self, i: int, text: str, finish: str | None, first: bool) -> dict[str, Any]:
        if not self.chat:
            choice = {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
            return {**self.head, "choices": [choice]}
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {**self.head, "object": "chat.completion.chunk", "choices": [choice]}

    async def events(self) -> AsyncIterator[str]:
        """The server-sent events of a streamed completion: one `data: {json}` event per piece
        of a choice's text (its finish reason on the last; a chat's first piece of each choice
        names the assistant's role), the usage if the request asked for it, then
        `data: [DONE]`."""
        remaining = len(self.sequences)
        started: set[int] = set()
        try:
            while remaining:
                i, text, finish = await self._updates.get()
                remaining -= finish is not None
                event = self._event(i, text, finish, i not in started)
                started.add(i)
                yield f"data: {json.dumps(event)}\n\n"
            if self.body.stream_options and self.body.stream_options.include_usage:
                last = {**self.head, "choices": [], "usage": self.usage()}
                if self.chat:
                    last["object"] = "chat.completion.chunk"
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
        if self.body.logprobs is not None:
            choices = await asyncio.to_thread(self._choices, texts)
        else:
            choices = self._choices(texts)
        return {**self.head, "choices": choices, "usage": self.usage()}

    def _choices(self, texts: list[str]) -> list[dict[str, Any]]:
        """OpenAI's choices from the generated texts: the prompt's text before each with echo,
        and each choice's `logprobs` (serving/logprobs.py) when asked (blocking: the scoring
        program runs)."""
        body, tok = self.body, self._tokenizer
        choices, sequences_to_score, firsts = [], [], []
        for i in range(self.num_choices):
            prompt = self.prompts[i // body.n]
            seq = self.sequences[i] if self.sequences else None
            text = texts[i] if seq is not None else ""
            finish = seq.finish_reason if seq is not None else "length"
            if self.chat:
                message = {"role": "assistant", "content": text}
                choices.append({"index": i, "message": message, "logprobs": None,
                                "finish_reason": finish})  # fmt: skip
                continue
            echoed = prompt.text + text if body.echo else text
            choices.append({"index": i, "text": echoed, "logprobs": None, "finish_reason": finish})
            if body.logprobs is not None:
                generated = listed_ids(tok, seq, text) if seq is not None else []
                ids = np.concatenate([prompt.ids, np.asarray(generated, np.int32)])
                sequences_to_score.append(ids)
                firsts.append(0 if body.echo else len(prompt.ids))
        if sequences_to_score:
            scores = self._score(sequences_to_score)
            for choice, ids, score, first in zip(
                choices, sequences_to_score, scores, firsts, strict=True
            ):
                choice["logprobs"] = logprobs_lib.completion_logprobs(
                    tok, ids, score, first, body.logprobs
                )
        return choices
