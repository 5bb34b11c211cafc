"""A cap on every request body, before any route reads it (uploads have their own, equal cap)."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response
from core.service.errors import PayloadTooLarge


class BodySizeLimit:
    """Refuse bodies over `limit` bytes with 413: at once when Content-Length says so, else as
    soon as the streamed body passes the limit (a chunked upload cannot get around it)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.limit:
            response = error_response(
                413,
                f"request body of {int(declared)} bytes exceeds the limit of {self.limit}",
                "invalid_request_error",
                code="payload_too_large",
            )
            await response(scope, receive, send)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    # Raised inside the route: the error handlers answer 413 in OpenAI's format.
                    raise PayloadTooLarge(f"request body exceeds the limit of {self.limit} bytes")
            return message

        await self.app(scope, limited_receive, send)
