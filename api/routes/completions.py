"""OpenAI-compatible completion endpoints: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.

Each handler validates the body, authorizes the `model` for the caller (before anything is queued),
builds an `InferenceJob` and hands it to the app's `Completer`; the answer is one JSON object or,
with `stream: true`, server-sent events in OpenAI's chunk format ending with `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.deps import CallerDep, get_context
from api.openapi import errors, event_stream, request_schema
from api.responses import (
    ChatCompletion,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionMessage,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionUsage,
    Model,
    ModelList,
)
from api.uploads import parse_json
from core.inference import catalog, metrics
from core.inference.completer import Submission
from core.errors import CorruptArtifact
from core.inference.errors import CorruptPrefix, DeadlineExceeded, InferenceFailed
from core.inference.jobs import InferenceJob, RowFinished, TextDelta
from core.inference.service import build_completer
from core.inference.requests import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    DEFAULT_MAX_TOKENS,
    ChatCompletionBody,
    CompletionBody,
    parse_body,
)
from core.prompts import chat_prompt_ids, text_ids
from core.service.api_keys import Caller
from core.service.errors import InvalidInput
from core.service.registry import quarantine_version

log = logging.getLogger(__name__)
MAX_CORRUPT_FALLBACKS = 3


@asynccontextmanager
async def _serving(app: FastAPI) -> AsyncIterator[None]:
    """Start the mode's `Completer` (unless one was given in `app.state.completer`) for the app's life."""
    ctx = app.state.ctx
    completer = getattr(app.state, "completer", None)
    if completer is None:
        completer = build_completer(ctx.settings, ctx.base_model, ctx.store)
        app.state.completer = completer
    registry = getattr(app.state, "metrics_registry", None)
    if registry is not None:
        metrics.register_all(registry)
    await completer.start()
    try:
        yield
    finally:
        await completer.close()


router = APIRouter(prefix="/v1", tags=["completions"], lifespan=_serving)

# The bodies are parsed by hand (`parse_body`: errors name the parameter, extra fields are
# ignored as OpenAI clients send many); the schema still documents them.
_GENERATION_ERRORS = errors(413, 429, 504)


def _generated(model: type, chunk: type) -> dict:
    """`responses=` of a generation route: `model` as JSON, or `chunk` events with `stream: true`."""
    description = f"A {model.__name__} object; with `stream: true`, server-sent {chunk.__name__} events"
    content = {"text/event-stream": event_stream(chunk)}
    return {200: {"model": model, "description": description, "content": content}, **_GENERATION_ERRORS}


def _json_body(model) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": request_schema(model)}}}}

_DISCONNECT_POLL_S = 0.25


@router.get("/models")
async def list_models(request: Request, caller: CallerDep) -> ModelList:
    context = get_context(request)
    card = context.model_card()

    def query():
        with context.session_factory() as session:
            return catalog.list_models(session, caller, card.model_id)

    entries = await run_in_threadpool(query)
    return ModelList(data=[Model(id=e.id, created=e.created, owned_by=e.owned_by) for e in entries])


@router.post(
    "/chat/completions",
    openapi_extra=_json_body(ChatCompletionBody),
    responses=_generated(ChatCompletion, ChatCompletionChunk),
)
async def chat_completions(request: Request, caller: CallerDep):
    body: ChatCompletionBody = parse_body(ChatCompletionBody, await _json(request))
    card = get_context(request).model_card()
    params = body.sampling(DEFAULT_MAX_TOKENS, card.max_context)
    try:
        prompt_ids = chat_prompt_ids(card.tokenizer, body.plain_messages())
    except InvalidInput:
        raise
    except Exception as exc:  # the chat template refused the conversation
        raise InvalidInput(f"messages cannot be rendered: {exc}", param="messages") from exc
    job = await _job(request, caller, body, prompt_ids, params)
    return await _answer(request, caller, body, job, chat=True)


@router.post(
    "/completions", openapi_extra=_json_body(CompletionBody), responses=_generated(Completion, CompletionChunk)
)
async def completions(request: Request, caller: CallerDep):
    body: CompletionBody = parse_body(CompletionBody, await _json(request))
    card = get_context(request).model_card()
    params = body.sampling(DEFAULT_COMPLETION_MAX_TOKENS, card.max_context)
    prompt = body.prompt_text_or_ids()
    prompt_ids = text_ids(card.tokenizer, prompt) if isinstance(prompt, str) else prompt
    if any(not 0 <= t < len(card.tokenizer) for t in prompt_ids):
        raise InvalidInput("prompt holds token ids outside the vocabulary", param="prompt")
    job = await _job(request, caller, body, prompt_ids, params)
    return await _answer(request, caller, body, job, chat=False)


# -- shared steps ----------------------------------------------------------------------------------


async def _json(request: Request) -> Any:
    return parse_json(await request.body())


async def _resolve(request: Request, caller: Caller, model: str):
    context = get_context(request)

    def resolve():
        with context.session_factory() as session:
            return catalog.resolve_model(session, caller, model, context.model_card().model_id)

    return await run_in_threadpool(resolve)


async def _job(request: Request, caller: Caller, body, prompt_ids: list[int], params) -> InferenceJob:
    """Authorize the model for the caller and build the job (nothing is queued yet)."""
    context = get_context(request)
    if not prompt_ids:
        raise InvalidInput("the prompt is empty", param="prompt")
    prefix = await _resolve(request, caller, body.model)
    return InferenceJob(
        prompt_ids=prompt_ids,
        params=params,
        n=body.n,
        prefix=prefix,
        deadline=time.time() + context.settings.request_timeout_s,
    )


async def _submit(request: Request, caller: Caller, body, job: InferenceJob) -> tuple[InferenceJob, Submission]:
    """Queue the job. A prefix whose stored bytes fail their checksum is never used: its version
    is quarantined (marked corrupt, the previous good version activated) and the model is
    resolved again, so `user:<id>` falls back while an explicit corrupt version gets a clear error."""
    completer = request.app.state.completer
    for _ in range(MAX_CORRUPT_FALLBACKS):
        try:
            submission = await completer.submit(job)  # QueueFull / InvalidRequest / ... surface here
            if job.prefix is not None:
                await submission.wait_started()  # distributed: the worker reports a corrupt prefix
            return job, submission
        except (CorruptArtifact, CorruptPrefix) as exc:
            if job.prefix is None:
                raise
            ref = job.prefix
            log.error("request_id=%s: prefix v%d of user %s failed verification: %s",
                      job.request_id, ref.version, ref.user_id, exc)
            factory = get_context(request).session_factory
            await run_in_threadpool(quarantine_version, factory, ref.user_id, ref.version, str(exc))
            prefix = await _resolve(request, caller, body.model)
            job = dataclasses.replace(job, prefix=prefix, request_id=uuid.uuid4().hex)
    raise InferenceFailed("no intact prefix version could be loaded for this model")


async def _answer(request: Request, caller: Caller, body, job: InferenceJob, *, chat: bool):
    job, submission = await _submit(request, caller, body, job)
    shape = _Shape(job, body.model, chat)
    if body.stream:
        return StreamingResponse(
            _sse(submission, shape, body.include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Request-Id": job.request_id},
        )
    rows = await _results_unless_disconnected(request, submission)
    if rows is None:
        return JSONResponse({}, status_code=499)  # nobody is listening any more
    return JSONResponse(shape.full(rows).model_dump(mode="json"), headers={"X-Request-Id": job.request_id})


async def _results_unless_disconnected(request: Request, submission: Submission) -> list[RowFinished] | None:
    """Wait for the job; cancel it (freeing its batch slot) if the client goes away first."""
    task = asyncio.ensure_future(submission.results())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                await submission.cancel()
                return None
    finally:
        if not task.done():
            task.cancel()


async def _sse(submission: Submission, shape: _Shape, include_usage: bool) -> AsyncIterator[str]:
    finished = False
    rows: list[RowFinished] = []
    try:
        for index in range(shape.job.n):
            yield _data(shape.opening(index))
        async for event in submission.events():
            if isinstance(event, TextDelta):
                yield _data(shape.delta(event.index, event.text))
            elif isinstance(event, RowFinished):
                rows.append(event)
                yield _data(shape.finish(event))
        finished = True
        if include_usage:
            yield _data(shape.usage_chunk(rows))
        yield "data: [DONE]\n\n"
    except (DeadlineExceeded, InferenceFailed) as exc:
        finished = True
        code = "timeout" if isinstance(exc, DeadlineExceeded) else "inference_failed"
        yield _data({"error": {"message": str(exc), "type": "server_error", "param": None, "code": code}})
    finally:
        if not finished:  # the client disconnected mid-stream: free the slot
            await submission.cancel()


def _data(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


class _Shape:
    """OpenAI's response and chunk objects for one job (chat or legacy completions)."""

    def __init__(self, job: InferenceJob, model: str, chat: bool):
        self.job = job
        self.model = model
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _chunk(self, choices: list[dict]) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def _usage(self, rows: list[RowFinished]) -> dict:
        completion = sum(r.completion_tokens for r in rows)
        prompt = len(self.job.prompt_ids)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _choice(self, index: int, text: str | None, finish_reason: str | None) -> dict:
        """One streamed choice (chunks stay plain dicts: one per token, checked against their
        schema by the tests rather than built through pydantic on the hot path)."""
        if not self.chat:
            return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        delta = {} if text is None else {"content": text}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def full(self, rows: list[RowFinished]) -> ChatCompletion | Completion:
        """The whole answer, built through its response model: a field out of shape fails here."""
        usage = CompletionUsage(**self._usage(rows))
        if self.chat:
            chat_choices = [
                ChatCompletionChoice(
                    index=r.index, message=ChatCompletionMessage(content=r.text), finish_reason=r.finish_reason
                )
                for r in rows
            ]
            return ChatCompletion(id=self.id, created=self.created, model=self.model, choices=chat_choices, usage=usage)
        choices = [CompletionChoice(index=r.index, text=r.text, finish_reason=r.finish_reason) for r in rows]
        return Completion(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def opening(self, index: int) -> dict:
        if self.chat:
            choice = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        else:
            choice = self._choice(index, "", None)
        return self._chunk([choice])

    def delta(self, index: int, text: str) -> dict:
        return self._chunk([self._choice(index, text, None)])

    def finish(self, row: RowFinished) -> dict:
        return self._chunk([self._choice(row.index, None if self.chat else "", row.finish_reason)])

    def usage_chunk(self, rows: list[RowFinished]) -> dict:
        return {**self._chunk([]), "usage": self._usage(rows)}
