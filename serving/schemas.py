"""Request bodies of the HTTP API (pydantic): OpenAI's completion and chat fields (OpenAI API
reference, "Completions" and "Chat"), the tokenizer routes lm-eval's remote tokenizer calls
(vLLM's /tokenize and /detokenize), and classification.

Every model forbids unknown fields, so a misspelt field is a 400 naming it, never ignored. A
null is the field's default, as in OpenAI's API (clients send `"logprobs": null`). The value
checks that need the model (prompt characters and ids, lengths against the context, image
shapes) and the refusal of values the server cannot honour (a non-zero penalty, `best_of`
above `n`, ...) are serving/service.py's, which knows the run.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_SEED = 2**31 - 1
MAX_LOGPROBS = 5  # serving/logprobs.py's (OpenAI's limit); the schemas import no JAX


class OpenAIRequest(BaseModel):
    """Unknown fields forbidden, types strict, and a null taken as the field's default."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data

    @field_validator("stop", check_fields=False)
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop strings, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return value

    def stops(self) -> tuple[str, ...]:
        """The stop string(s) as a tuple."""
        stop = getattr(self, "stop", None)
        return (stop,) if isinstance(stop, str) else tuple(stop or ())


class StreamOptions(BaseModel):
    """OpenAI's stream_options: include_usage adds a last event with the token counts."""

    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


class CompletionRequest(OpenAIRequest):
    """POST /v1/completions, as OpenAI's completions API. The fields that change nothing at
    their neutral value (penalties 0, best_of = n, no logit_bias or suffix) are accepted and
    other values refused by the service; `user` is accepted and ignored."""

    model: str | None = Field(None, description="The served model's id (optional).")
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="A prompt, a list of prompts, or prompts as token ids (a list of ids, or "
        "a list of such lists)."
    )
    max_tokens: int = Field(
        16, ge=0, description="New tokens per choice, at most; 0 only with echo (scoring)."
    )
    temperature: float = Field(1.0, ge=0.0, description="Softmax temperature; 0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus mass in (0, 1]; 1 = all.")
    top_k: int = Field(0, ge=0, description="Keep the k most likely tokens; 0 = all.")
    n: int = Field(1, ge=1, le=16, description="Choices per prompt.")
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="Choice i draws with seed + i; random if omitted."
    )
    stop: str | list[str] | None = Field(None, description="Up to 4 stop strings.")
    stream: bool = Field(False, description="Stream the text as server-sent events.")
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS,
        description="Log-probabilities of each listed token and of this many alternatives.",
    )  # fmt: skip
    echo: bool = Field(False, description="Return the prompt before the completion.")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Only 0 is served.")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Only 0 is served.")
    best_of: int | None = Field(None, ge=1, description="Only n (or 1) is served.")
    logit_bias: dict[str, float] | None = Field(None, description="Only {} is served.")
    suffix: str | None = Field(None, description="Only '' is served.")
    user: str | None = Field(None, description="The end user's id (accepted, not used).")

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("give at least one prompt")
        if isinstance(value, list):
            ids = [type(x) is int for x in value]
            if any(ids) and not all(ids):
                raise ValueError(
                    "a list of prompts holds strings, or lists of token ids, and a prompt of "
                    "token ids holds integers only, not a mix"
                )
        return value

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list: each a string or a list of token ids."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)


class ClassifyRequest(BaseModel):
    """POST /v1/classify: images as nested lists of raw pixels or base64 PNG strings."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(None, description="The served model's id (optional).")
    images: list[str | list] = Field(
        min_length=1, max_length=1024, description="[H, W, C] (or [H, W]) pixels, or PNG base64."
    )
    top_k: int = Field(5, ge=1, description="How many of the most likely labels to list.")


class ChatMessage(BaseModel):
    """One message of a chat: its role and its text (a string, or OpenAI's list of text
    parts)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, str]]
    name: str | None = None

    def text(self) -> str:
        """The content as one string (text parts joined); ValueError for a non-text part."""
        if isinstance(self.content, str):
            return self.content
        if any(part.get("type") != "text" or "text" not in part for part in self.content):
            raise ValueError("only text parts ({'type': 'text', 'text': ...}) are served")
        return "".join(part["text"] for part in self.content)


class ChatCompletionRequest(OpenAIRequest):
    """POST /v1/chat/completions: OpenAI's chat fields that a text model can honour; the
    service renders the messages with the run's chat template into one prompt."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    n: int = Field(1, ge=1, le=16)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class TokenizeRequest(BaseModel):
    """POST /tokenize (vLLM's, which lm-eval's remote tokenizer calls)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: str
    add_special_tokens: bool = False


class DetokenizeRequest(BaseModel):
    """POST /detokenize (vLLM's)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    tokens: list[int]
