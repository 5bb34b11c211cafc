"""OpenAI-compatible completion endpoints: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.

Each generation handler validates the body once into a `CompletionRequest`, hands it to the app's
`CompletionService` (which authorizes the `model` for the caller before anything is queued) and
answers with `api.answers.answer`: one JSON object or, with `stream: true`, server-sent events.

The body is capped (`STEER_MAX_COMPLETION_BODY_BYTES`, 413) before it is parsed, and parsing,
chat templating and tokenizing run on worker threads, a few at a time: one client's huge prompt
must not stall the event loop that serves everyone else.
"""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from api.answers import Answered, answer
from api.deps import CallerDep, get_context
from api.openapi import errors, event_stream, request_schema
from api.responses import (
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    Model,
    ModelDeleted,
    ModelList,
)
from api.uploads import parse_json, read_body_limited
from core.inference import catalog
from core.inference.prefix_cache import PrefixRef
from core.inference.requests import ChatCompletionBody, CompletionBody, CompletionRequest, parse_body
from core.inference.service import CompletionService
from core.service.api_keys import Caller
from core.service.feedback import remember_completion, subject_user

router = APIRouter(prefix="/v1", tags=["completions"])

# The bodies are parsed by hand (`parse_body`: errors name the parameter, extra fields are
# ignored as OpenAI clients send many); the schema still documents them.
_GENERATION_ERRORS = errors(413, 429, 504)
# Large bodies are read by at most this many threads at once: tokenizing one holds the GIL for
# tens of milliseconds at a time, and more of them in parallel would starve the event loop (and the
# shared thread pool). Small bodies, the usual case, never queue behind them.
_LARGE_BODY_BYTES = 64_000
_LARGE_BODY_READERS = 2
_large_body_readers: anyio.CapacityLimiter | None = None


def _generated(model: type, chunk: type) -> dict:
    """`responses=` of a generation route: `model` as JSON, or `chunk` events with `stream: true`."""
    description = f"A {model.__name__} object; with `stream: true`, server-sent {chunk.__name__} events"
    content = {"text/event-stream": event_stream(chunk)}
    return {200: {"model": model, "description": description, "content": content}, **_GENERATION_ERRORS}


def _json_body(model) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": request_schema(model)}}}}


@router.get("/models")
async def list_models(request: Request, caller: CallerDep) -> ModelList:
    context = get_context(request)
    card = context.model_card()

    def query():
        with context.session_factory() as session:
            return catalog.list_models(session, caller, card.model_id)

    entries = await run_in_threadpool(query)
    return ModelList(data=[Model(id=e.id, created=e.created, owned_by=e.owned_by) for e in entries])


@router.get("/models/{model}")
async def retrieve_model(model: str, request: Request, caller: CallerDep) -> Model:
    """One model the key may use (any id `/v1/models` lists it); 404 otherwise."""
    context = get_context(request)
    card = context.model_card()

    def query():
        with context.session_factory() as session:
            return catalog.retrieve_model(session, caller, model, card.model_id)

    entry = await run_in_threadpool(query)
    return Model(id=entry.id, created=entry.created, owned_by=entry.owned_by)


@router.delete("/models/{model}")
async def delete_model(model: str, request: Request, caller: CallerDep) -> ModelDeleted:
    """Retire one prefix version, `ft:<base>:<external_id>:v<N>` (admin or its user): it stops being
    the active one (the newest other retired version takes over) and stays stored for rollback."""
    context = get_context(request)
    card = context.model_card()

    def retire():
        with context.session_factory.begin() as session:
            catalog.retire_model(session, caller, model, card.model_id)

    await run_in_threadpool(retire)
    return ModelDeleted(id=model, deleted=True)


@router.post(
    "/chat/completions",
    openapi_extra=_json_body(ChatCompletionBody),
    responses=_generated(ChatCompletion, ChatCompletionChunk),
)
async def chat_completions(request: Request, caller: CallerDep) -> Response:
    return await _complete(request, caller, ChatCompletionBody)


@router.post(
    "/completions", openapi_extra=_json_body(CompletionBody), responses=_generated(Completion, CompletionChunk)
)
async def completions(request: Request, caller: CallerDep) -> Response:
    return await _complete(request, caller, CompletionBody)


async def _complete(request: Request, caller: Caller, body_type: type[ChatCompletionBody | CompletionBody]) -> Response:
    context = get_context(request)
    raw = await read_body_limited(request, context.settings.max_completion_body_bytes)
    limiter = _large_readers() if len(raw) > _LARGE_BODY_BYTES else None
    completion = await anyio.to_thread.run_sync(_read, body_type, raw, context, limiter=limiter)
    card = context.model_card()
    service: CompletionService = request.app.state.completions
    # The model is resolved before the quota counts it: a refused model (404, 400) costs nothing.
    prefixes = await service.resolve(caller, completion, card.model_id)
    completion = completion.with_loop_guard(prefixes, context.settings.greedy_no_repeat_ngram)
    quota = await _count_against_quota(request, caller, completion)
    submission = await service.submit(caller, completion, card.model_id, prefixes)
    response = await answer(request, completion, submission, _kept_for_feedback(context, completion, prefixes))
    response.headers.update(quota)
    return response


def _kept_for_feedback(context, completion: CompletionRequest, prefixes: list[PrefixRef]) -> Answered | None:
    """Where the deployment takes feedback, a chat answer on a user's model is kept for it
    (core/service/feedback.py); the base model's answers and legacy completions never are."""
    if not (completion.chat and context.settings.feedback_enabled and prefixes):
        return None

    def keep(answer_id: str, answers: list[str]) -> None:
        with context.session_factory.begin() as session:
            user_id = subject_user(session, [ref.user_id for ref in prefixes])
            if user_id is not None:
                messages = [dict(m) for m in completion.messages]
                remember_completion(session, context.settings, answer_id, user_id, completion.model, messages, answers)

    async def kept(answer_id: str, answers: list[str]) -> None:
        await run_in_threadpool(keep, answer_id, answers)

    return kept


async def _count_against_quota(request: Request, caller: Caller, completion: CompletionRequest) -> dict[str, str]:
    """A user key's per-minute quotas (core/service/quotas.py): the `x-ratelimit-*` headers, or 429.
    Off the event loop: in distributed mode it is a Redis round trip."""
    if caller.is_admin:
        return {}
    tokens = len(completion.prompt_ids) + completion.params.max_tokens * completion.n
    return await run_in_threadpool(request.app.state.rate_limiter.admit, caller.user_id, tokens)


def _read(body_type: type[ChatCompletionBody | CompletionBody], raw: bytes, context) -> CompletionRequest:
    """Parse, validate, template and tokenize a body: CPU-bound, so on a worker thread."""
    return parse_body(body_type, parse_json(raw)).to_request(
        context.model_card(), context.settings.style_strength_default
    )


def _large_readers() -> anyio.CapacityLimiter:
    global _large_body_readers
    if _large_body_readers is None:
        _large_body_readers = anyio.CapacityLimiter(_LARGE_BODY_READERS)
    return _large_body_readers
