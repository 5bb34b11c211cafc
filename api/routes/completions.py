"""OpenAI-compatible completion endpoints: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.

Each generation handler validates the body once into a `CompletionRequest`, hands it to the app's
`CompletionService` (which authorizes the `model` for the caller before anything is queued) and
answers with `api.answers.answer`: one JSON object or, with `stream: true`, server-sent events.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from api.answers import answer
from api.deps import CallerDep, get_context
from api.openapi import errors, event_stream, request_schema
from api.responses import ChatCompletion, ChatCompletionChunk, Completion, CompletionChunk, Model, ModelList
from api.uploads import parse_json
from core.inference import catalog
from core.inference.requests import ChatCompletionBody, CompletionBody, parse_body
from core.inference.service import CompletionService
from core.service.api_keys import Caller

router = APIRouter(prefix="/v1", tags=["completions"])

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
async def chat_completions(request: Request, caller: CallerDep) -> Response:
    return await _complete(request, caller, ChatCompletionBody)


@router.post(
    "/completions", openapi_extra=_json_body(CompletionBody), responses=_generated(Completion, CompletionChunk)
)
async def completions(request: Request, caller: CallerDep) -> Response:
    return await _complete(request, caller, CompletionBody)


async def _complete(request: Request, caller: Caller, body_type: type[ChatCompletionBody | CompletionBody]) -> Response:
    body = parse_body(body_type, parse_json(await request.body()))
    card = get_context(request).model_card()
    completion = body.to_request(card)
    service: CompletionService = request.app.state.completions
    submission = await service.submit(caller, completion, card.model_id)
    return await answer(request, completion, submission)
