"""The web console under `/console`: static pages that call the JSON API from the browser.

The pages (`static/`: HTML, one script, one stylesheet, vendored Alpine.js and Chart.js) hold the
key the operator types in `sessionStorage` and send it as `Authorization: Bearer` to the same
`/v1` endpoints any client uses, so the console can see and do exactly what its key may: the
admin key everything, a user key only its own user. The one route of its own,
`GET /console/api/session`, tells the pages who the key belongs to and which base model serves.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import BaseModelIdDep, CallerDep

STATIC_DIR = Path(__file__).parent / "static"

router = APIRouter(prefix="/console/api", tags=["console"], include_in_schema=False)


class ConsoleSession(BaseModel):
    role: str  # "admin" or "user"
    user_id: str | None
    base_model: str


@router.get("/session")
def session(caller: CallerDep, base_model_id: BaseModelIdDep) -> ConsoleSession:
    """Who the key in `Authorization` is (401 for a bad key): the login check of the pages."""
    return ConsoleSession(role="admin" if caller.is_admin else "user", user_id=caller.user_id, base_model=base_model_id)


# The pages load only their own files and talk only to their own origin, and no other site may
# frame them (clickjacking a console that holds an admin key). Alpine.js evaluates its `x-` attribute
# expressions with `new Function`, hence 'unsafe-eval' for scripts: the page still runs no inline
# script and nothing from elsewhere.
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; script-src 'self' 'unsafe-eval'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


class _WithSecurityHeaders:
    """An ASGI app that sends `SECURITY_HEADERS` with every answer of the app it wraps."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).update(SECURITY_HEADERS)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def install_console(app: FastAPI) -> None:
    """Serve the console's pages at `/console/` and its session route."""
    app.include_router(router)
    app.mount("/console", _WithSecurityHeaders(StaticFiles(directory=STATIC_DIR, html=True)), name="console")
