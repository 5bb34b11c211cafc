"""A running completion answered in OpenAI's format, for both completion endpoints.

Without `stream` the answer is one `ChatCompletion` / `Completion` object; with `stream: true` it
is server-sent events (sse-starlette) of chunk objects ending with `data: [DONE]`; an error after
the stream began arrives as one last `data: {"error": ...}` event. A client that goes away, before
or during the answer, has its job cancelled so that its batch slots free at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse

from api.errors import public_message
from api.responses import (
    ChatCompletion,
    ChatCompletionChoice,
    ChatCompletionMessage,
    Completion,
    CompletionChoice,
    CompletionUsage,
)
from core.inference.completer import DEADLINE_GRACE_S, Submission
from core.inference.errors import DeadlineExceeded, InferenceFailed, InferenceUnavailable
from core.inference.jobs import RowFinished, TextDelta
from core.inference.requests import CompletionRequest

log = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away first": nobody reads it


Answered = Callable[[str, list[str]], Awaitable[None]]
"""Called with the answer's id and each choice's text once every choice has finished."""


async def answer(
    request: Request, completion: CompletionRequest, submission: Submission, on_answered: Answered | None = None
) -> Response:
    shape = _Shape(submission, completion)
    headers = {"X-Request-Id": submission.job.request_id}
    if completion.stream:
        # "\n" line ends and no keep-alive comments (ping=0): the bytes this API has always sent.
        # A server shutting down lets the stream run to its end, which its job's deadline bounds.
        return EventSourceResponse(
            _events(submission, shape, completion.include_usage, on_answered),
            headers={"Cache-Control": "no-cache", **headers},
            ping=0,
            sep="\n",
            shutdown_grace_period=max(0.0, submission.job.deadline + DEADLINE_GRACE_S - time.time()),
        )
    rows = await _results_unless_disconnected(request, submission)
    if rows is None:
        return JSONResponse({}, status_code=CLIENT_CLOSED_REQUEST)
    await _tell(on_answered, shape.id, rows)
    return JSONResponse(shape.full(rows).model_dump(mode="json"), headers=headers)


async def _results_unless_disconnected(request: Request, submission: Submission) -> list[RowFinished] | None:
    """The finished rows; None (and the job cancelled) if the client disconnects first."""
    results = asyncio.ensure_future(submission.results())
    disconnected = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({results, disconnected}, return_when=asyncio.FIRST_COMPLETED)
        if results.done():
            return results.result()
        await submission.cancel()
        return None
    finally:
        results.cancel()
        disconnected.cancel()


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away: the body has been read, so the next ASGI message is
    the disconnect (waited for, not polled)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _tell(on_answered: Answered | None, answer_id: str, rows: list[RowFinished]) -> None:
    """Hand the finished answer on; a failure there is logged, never the client's problem."""
    if on_answered is None:
        return
    try:
        await on_answered(answer_id, [row.text for row in sorted(rows, key=lambda row: row.index)])
    except Exception:  # noqa: BLE001 - the answer stands whatever happens to its copy
        log.warning("could not keep answer %s for feedback", answer_id, exc_info=True)


async def _events(
    submission: Submission, shape: _Shape, include_usage: bool, on_answered: Answered | None = None
) -> AsyncIterator[str]:
    finished = False
    rows: list[RowFinished] = []
    try:
        for index in range(shape.n):
            yield _data(shape.opening(index))
        async for event in submission.events():
            if isinstance(event, TextDelta):
                yield _data(shape.delta(event.index, event.text))
            elif isinstance(event, RowFinished):
                rows.append(event)
                yield _data(shape.finish(event))
        finished = True
        await _tell(on_answered, shape.id, rows)
        if include_usage:
            yield _data(shape.usage_chunk(rows))
        yield "[DONE]"
    except (DeadlineExceeded, InferenceFailed, InferenceUnavailable) as exc:
        finished = True
        codes = {DeadlineExceeded: "timeout", InferenceUnavailable: "inference_unavailable"}
        code = codes.get(type(exc), "inference_failed")
        message = public_message(exc, code)
        if message != str(exc):
            log.warning("stream ended with %s: %s", code, exc)
        yield _data({"error": {"message": message, "type": "server_error", "param": None, "code": code}})
    finally:
        if not finished:  # the client disconnected mid-stream: free the slot
            with anyio.CancelScope(shield=True):
                await submission.cancel()


def _data(payload: dict) -> str:
    return json.dumps(payload, separators=(",", ":"))


class _Shape:
    """OpenAI's response and chunk objects for one job (chat or legacy completions)."""

    def __init__(self, submission: Submission, completion: CompletionRequest):
        self.n = submission.job.n
        self.prompt_tokens = len(submission.job.prompt_ids)
        self.model = completion.model
        self.chat = completion.chat
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _chunk(self, choices: list[dict]) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def _usage(self, rows: list[RowFinished]) -> dict:
        completion = sum(r.completion_tokens for r in rows)
        prompt = self.prompt_tokens
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
            choice = {
                "index": index,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        else:
            choice = self._choice(index, "", None)
        return self._chunk([choice])

    def delta(self, index: int, text: str) -> dict:
        return self._chunk([self._choice(index, text, None)])

    def finish(self, row: RowFinished) -> dict:
        return self._chunk([self._choice(row.index, None if self.chat else "", row.finish_reason)])

    def usage_chunk(self, rows: list[RowFinished]) -> dict:
        return {**self._chunk([]), "usage": self._usage(rows)}
