"""Request bodies of the HTTP API (pydantic): OpenAI's completion fields, and classification.

Every model forbids unknown fields, so a misspelt field is a 400 naming it, never ignored. The
value checks that need the model (prompt characters, prompt length and max_tokens against the
context, image shapes) are done by serving/api.py, which knows the run.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_SEED = 2**31 - 1


class StreamOptions(BaseModel):
    """OpenAI's stream_options: include_usage adds a last event with the token counts."""

    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


class CompletionRequest(BaseModel):
    """POST /v1/completions, as OpenAI's completions API (the fields jaxlab implements)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(None, description="The served model's id (optional).")
    prompt: str | list[str] = Field(description="A prompt, or a list of prompts.")
    max_tokens: int = Field(16, ge=1, description="New tokens per choice, at most.")
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

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("give at least one prompt")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop strings, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return value

    def prompts(self) -> list[str]:
        """The prompt(s) as a list."""
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def stops(self) -> tuple[str, ...]:
        """The stop string(s) as a tuple."""
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class ClassifyRequest(BaseModel):
    """POST /v1/classify: images as nested lists of raw pixels or base64 PNG strings."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(None, description="The served model's id (optional).")
    images: list[str | list] = Field(
        min_length=1, max_length=1024, description="[H, W, C] (or [H, W]) pixels, or PNG base64."
    )
    top_k: int = Field(5, ge=1, description="How many of the most likely labels to list.")
