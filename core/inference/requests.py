"""OpenAI request bodies for completions, validated once into a `CompletionRequest`.

    body = parse_body(ChatCompletionBody, data)      # shape: types, ranges, required fields
    request = body.to_request(card)                  # meaning: sampling, prompt tokens, context

Everything a client can get wrong is caught here and raised as `InvalidInput` (HTTP 400) with the
offending parameter named, before the request goes anywhere near a queue. The `CompletionRequest`
is what travels on: it becomes the `InferenceJob` whose prompt and sampling parameters the engine
puts in its batch rows as they are. The engine checks a job once more where its prefix is loaded
(the prefix and the prompt must fit the context window together), once per job.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from core.engine.prompts import chat_prompt_ids, text_ids
from core.engine.sampling import MAX_STYLE_STRENGTH, SamplingParams
from core.errors import InvalidRequest
from core.inference.jobs import InferenceJob
from core.inference.prefix_cache import PrefixRef
from core.service.errors import InvalidInput

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from core.engine.model import ModelCard

MAX_N = 16
DEFAULT_MAX_TOKENS = 256
DEFAULT_COMPLETION_MAX_TOKENS = 16  # what OpenAI's legacy completions endpoint defaults to
MAX_MODEL_CHARS = 1024
"""Longer than any model id with its controls (an external id is at most 128 characters, a model
string names at most four controls of 64): a longer `model` is refused before it is parsed."""

# OpenAI parameters this server does not serve, and the values of each that ask for nothing (sent
# by clients that fill every field): any other value is a 400 naming the parameter, never a 200
# that silently lacks what was asked for.
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none"),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
}


@dataclass(frozen=True)
class CompletionRequest:
    """One validated completion request: what to generate, and how the client wants the answer."""

    model: str
    chat: bool
    """`/v1/chat/completions` (True) or the legacy `/v1/completions`: decides the answer's shape."""
    prompt_ids: list[int]
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    controls: tuple[str, ...] = ()
    """Control prefixes named in the body, composed after those of the `model` string."""
    loop_guard_set: bool = False
    """The request set `no_repeat_ngram` itself (else the deployment's guard for greedy personalised rows)."""
    messages: tuple[dict[str, str], ...] = ()
    """A chat request's messages as plain turns (kept with the answer where feedback is on)."""

    def with_loop_guard(self, prefixes: Sequence[PrefixRef], n: int) -> CompletionRequest:
        """This request as served on `prefixes`: a greedy request on a user's prefix gets the
        deployment's loop guard `n` unless it chose its own; the base model's answers are untouched."""
        if not prefixes or not self.params.greedy or self.loop_guard_set or n == 0:
            return self
        return replace(self, params=replace(self.params, stop=list(self.params.stop), no_repeat_ngram=n))

    def job(self, prefixes: Sequence[PrefixRef], deadline: float) -> InferenceJob:
        """The job that runs this request with `prefixes` composed (none: the base model)."""
        return InferenceJob(self.prompt_ids, self.params, self.n, tuple(prefixes), deadline=deadline)


def _finite_number(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    chat: ClassVar[bool]
    default_max_tokens: ClassVar[int]

    model: str = Field(min_length=1, max_length=MAX_MODEL_CHARS)
    # Integers must be JSON integers, as OpenAI requires: "5" or 5.0 or true is a 400.
    max_tokens: int | None = Field(default=None, ge=1, strict=True)
    temperature: float = 1.0
    top_p: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    n: int = Field(default=1, ge=1, le=MAX_N, strict=True)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1, strict=True)
    stream: bool = Field(default=False, strict=True)  # "yes" or 1 is a 400, as OpenAI answers
    stream_options: dict[str, Any] | None = None
    controls: list[str] = Field(default_factory=list, max_length=16)
    no_repeat_ngram: int | None = Field(
        default=None,
        ge=0,
        le=16,
        strict=True,
        description="Never write an n-gram of this many tokens twice (`extra_body`); 0: off; left out: the "
        "deployment's loop guard for greedy personalised requests.",
    )
    style_strength: float | None = Field(
        default=None,
        ge=0.0,
        le=MAX_STYLE_STRENGTH,
        description="How strongly the user's voice applies (`extra_body` in the openai client): the "
        "answer decodes from base + s * (personalised - base); 1 = the personalised model, 0 = the base "
        "model's answer; the deployment's default when left out.",
    )

    @field_validator("temperature", "top_p", mode="before")
    @classmethod
    def _finite(cls, value: Any) -> Any:
        return 1.0 if value is None else _finite_number(value)

    @field_validator("frequency_penalty", "presence_penalty", mode="before")
    @classmethod
    def _finite_penalty(cls, value: Any) -> Any:
        return 0.0 if value is None else _finite_number(value)

    @field_validator("style_strength", mode="before")
    @classmethod
    def _finite_strength(cls, value: Any) -> Any:
        return None if value is None else _finite_number(value)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))

    def to_request(self, card: ModelCard, style_strength_default: float = 1.0) -> CompletionRequest:
        """The request this body asks for on the base model of `card`, or `InvalidInput`."""
        params = self.sampling(card.max_context)
        if self.style_strength is None:
            params.style_strength = style_strength_default
        prompt_ids = self.prompt_ids(card.tokenizer)
        param = "messages" if self.chat else "prompt"
        if not prompt_ids:
            raise InvalidInput("the prompt is empty", param=param)
        if len(prompt_ids) >= card.max_context:
            # Refused here, not by a worker: a job never carries more tokens than a model can read.
            raise InvalidInput(
                f"prompt of {len(prompt_ids)} tokens does not fit the context window of {card.max_context} tokens",
                param=param,
            )
        return CompletionRequest(
            self.model,
            self.chat,
            prompt_ids,
            params,
            self.n,
            self.stream,
            self.include_usage,
            tuple(self.controls),
            loop_guard_set=self.no_repeat_ngram is not None,
            messages=tuple(self.plain_messages()) if isinstance(self, ChatCompletionBody) else (),
        )

    def prompt_ids(self, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        raise NotImplementedError

    def sampling(self, max_context: int) -> SamplingParams:
        max_tokens = self.max_tokens or self.default_max_tokens
        if max_tokens >= max_context:
            raise InvalidInput(f"max_tokens must be below the context window of {max_context}", param="max_tokens")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        params = SamplingParams(
            max_tokens,
            float(self.temperature),
            float(self.top_p),
            stop,
            self.seed,
            frequency_penalty=float(self.frequency_penalty),
            presence_penalty=float(self.presence_penalty),
            style_strength=1.0 if self.style_strength is None else float(self.style_strength),
            no_repeat_ngram=self.no_repeat_ngram or 0,
        )
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
    chat: ClassVar[bool] = True
    default_max_tokens: ClassVar[int] = DEFAULT_MAX_TOKENS

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, strict=True)

    def sampling(self, max_context: int) -> SamplingParams:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return super().sampling(max_context)

    def prompt_ids(self, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        messages = self.plain_messages()
        try:
            return chat_prompt_ids(tokenizer, messages)
        except Exception as exc:  # the chat template refused the conversation
            raise InvalidInput(f"messages cannot be rendered: {exc}", param="messages") from exc

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
    chat: ClassVar[bool] = False
    default_max_tokens: ClassVar[int] = DEFAULT_COMPLETION_MAX_TOKENS

    prompt: str | list[str] | list[int]
    echo: bool = Field(default=False, strict=True)

    def prompt_ids(self, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        prompt = self.prompt_text_or_ids()
        ids = text_ids(tokenizer, prompt) if isinstance(prompt, str) else prompt
        if any(not 0 <= t < len(tokenizer) for t in ids):
            raise InvalidInput("prompt holds token ids outside the vocabulary", param="prompt")
        return ids

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
    refuse_lone_surrogates(data)
    refuse_unsupported(data)
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput.from_validation(exc) from exc


def refuse_unsupported(data: dict[str, Any]) -> None:
    """400 naming the first parameter that asks for something this server does not do."""
    for name, harmless in _UNSUPPORTED.items():
        value = data.get(name)
        if not any(type(value) is type(ok) and value == ok for ok in harmless):
            raise InvalidInput(f"{name} is not supported by this server; leave it out", param=name)


def refuse_lone_surrogates(data: Any) -> None:
    """JSON may spell a lone UTF-16 surrogate (`"\\ud800"`), which no tokenizer or database can
    encode: refuse it up front (400 naming the field) instead of failing deep inside.
    Iterative, so any depth the JSON parser accepted is fine here too."""
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidInput(
                    f"{where or 'the body'} is not valid Unicode (a lone UTF-16 surrogate)", param=where or None
                ) from None
        elif isinstance(value, dict):
            stack.extend((item, f"{where}.{key}" if where else str(key)) for key, item in value.items())
            stack.extend((key, where) for key in value if isinstance(key, str))
        elif isinstance(value, list):
            stack.extend((item, f"{where}[{i}]") for i, item in enumerate(value))


def _param_of(message: str) -> str | None:
    for name in (
        "max_tokens",
        "temperature",
        "top_p",
        "stop",
        "frequency_penalty",
        "presence_penalty",
        "style_strength",
    ):
        if message.startswith(name):
            return name
    return None
