"""OpenAI request bodies for completions, validated into an `InferenceJob`'s parts.

Everything a client can get wrong is caught here and raised as `InvalidInput` (HTTP 400) with the
offending parameter named, before the request goes anywhere near a queue.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from core.errors import InvalidRequest
from core.sampling import SamplingParams
from core.service.errors import InvalidInput

MAX_N = 16
DEFAULT_MAX_TOKENS = 256
DEFAULT_COMPLETION_MAX_TOKENS = 16  # what OpenAI's legacy completions endpoint defaults to


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    @field_validator("temperature", "top_p", mode="before")
    @classmethod
    def _finite(cls, value: Any) -> Any:
        if value is None:
            return 1.0
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))

    def sampling(self, default_max_tokens: int, max_context: int) -> SamplingParams:
        max_tokens = self.max_tokens or default_max_tokens
        if max_tokens >= max_context:
            raise InvalidInput(f"max_tokens must be below the context window of {max_context}", param="max_tokens")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        params = SamplingParams(max_tokens, float(self.temperature), float(self.top_p), stop, self.seed)
        try:
            params.validate()
        except InvalidRequest as exc:
            raise InvalidInput(str(exc), param=_param_of(str(exc))) from exc
        return params


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str = Field(json_schema_extra={"enum": ["system", "developer", "user", "assistant"]})
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionBody(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def sampling(self, default_max_tokens: int, max_context: int) -> SamplingParams:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return super().sampling(default_max_tokens, max_context)

    def plain_messages(self) -> list[dict[str, str]]:
        allowed = {"system", "user", "assistant", "developer"}
        out = []
        for i, message in enumerate(self.messages):
            if message.role not in allowed:
                raise InvalidInput(f"unsupported role {message.role!r}", param=f"messages[{i}].role")
            try:
                text = message.text()
            except ValueError as exc:
                raise InvalidInput(str(exc), param=f"messages[{i}].content") from exc
            out.append({"role": "system" if message.role == "developer" else message.role, "content": text})
        return out


class CompletionBody(_Common):
    prompt: str | list[str] | list[int]
    echo: bool = False

    def prompt_text_or_ids(self) -> str | list[int]:
        prompt = self.prompt
        if isinstance(prompt, str):
            return prompt
        if prompt and all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            return list(prompt)
        if len(prompt) == 1 and isinstance(prompt[0], str):
            return prompt[0]
        raise InvalidInput("prompt must be one string (or one list of token ids)", param="prompt")


def parse_body(cls: type[_Common], data: Any) -> Any:
    """Validate a JSON body into `cls`, turning pydantic's errors into one `InvalidInput`."""
    if not isinstance(data, dict):
        raise InvalidInput("the request body must be a JSON object")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput.from_validation(exc) from exc


def _param_of(message: str) -> str | None:
    for name in ("max_tokens", "temperature", "top_p", "stop"):
        if message.startswith(name):
            return name
    return None
