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


def install_console(app: FastAPI) -> None:
    """Serve the console's pages at `/console/` and its session route."""
    app.include_router(router)
    app.mount("/console", StaticFiles(directory=STATIC_DIR, html=True), name="console")
