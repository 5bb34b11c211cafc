"""A cap on every request body, before any route reads it (uploads have their own, equal cap)."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response
from core.service.errors import PayloadTooLarge


class BodySizeLimit:
    """Refuse bodies over `limit` bytes with 413: at once when Content-Length says so, else as
    soon as the streamed body passes the limit (a chunked upload cannot get around it).

    A streamed body is cut off inside whatever reads it, and a reader may wrap the error in its
    own (FastAPI's body parser answers 400 "There was an error parsing the body"). So once the
    limit is passed, this middleware owns the answer: whatever the app then sends or raises is
    dropped, and the client gets the 413."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.limit:
            await self._too_large(f"request body of {int(declared)} bytes exceeds the limit of {self.limit}")(
                scope, receive, send
            )
            return
        seen = 0
        exceeded = False
        started = False

        async def limited_receive() -> Message:
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    exceeded = True
                    raise PayloadTooLarge(f"request body exceeds the limit of {self.limit} bytes")
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded and not started:
                return  # the app's answer to a body it could not read: replaced below
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not exceeded or started:
                raise
        if exceeded and not started:
            await self._too_large(f"request body exceeds the limit of {self.limit} bytes")(scope, receive, send)

    @staticmethod
    def _too_large(message: str):
        return error_response(413, message, "invalid_request_error", code="payload_too_large")
