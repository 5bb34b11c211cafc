"""Request ids: every request gets one, every log line written for it carries it.

A client's own `x-request-id` (up to 128 letters, digits and `-_.:`) is kept, so a request can be
followed from a proxy's log into Steer's; otherwise one is made (`req_` + 24 hex digits). It is set
in `core.logging_setup.request_id` for the request's handling (the access line included) and
echoed in the `x-request-id` response header.
"""

from __future__ import annotations

import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.logging_setup import request_id

HEADER = "x-request-id"
_ACCEPTABLE = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == HEADER.encode()), "")
        rid = given if _ACCEPTABLE.fullmatch(given) else f"req_{uuid.uuid4().hex[:24]}"
        token = request_id.set(rid)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != HEADER.encode()]
                message["headers"] = [*headers, (HEADER.encode(), rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id.reset(token)
