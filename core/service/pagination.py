"""OpenAI-style cursor pagination: `after` is the id of the last item of the previous page."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import Session

from core.service.errors import InvalidInput

T = TypeVar("T")
MAX_LIMIT = 100


@dataclass
class Page(Generic[T]):
    items: list[T]
    has_more: bool


def paginate(
    session: Session,
    statement: Select[Any],
    model: Any,
    *,
    after: str | None,
    limit: int,
    newest_first: bool,
) -> Page[Any]:
    """One page of `statement` (rows of `model`), ordered by (created_at, id).

    The cursor is looked up through `statement` itself, so it must be an item of this very
    listing: an id the caller may not see (another user's) answers exactly like one that never
    existed, and the cursor reveals nothing."""
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidInput(f"limit must be between 1 and {MAX_LIMIT}", param="limit")
    created, ident = model.created_at, model.id
    if after is not None:
        cursor = session.execute(statement.with_only_columns(created).where(ident == after)).scalar_one_or_none()
        if cursor is None:
            raise InvalidInput(f"unknown cursor 'after={after}'", param="after")
        if newest_first:
            statement = statement.where(or_(created < cursor, and_(created == cursor, ident < after)))
        else:
            statement = statement.where(or_(created > cursor, and_(created == cursor, ident > after)))
    order = (created.desc(), ident.desc()) if newest_first else (created.asc(), ident.asc())
    rows = list(session.execute(statement.order_by(*order).limit(limit + 1)).scalars())
    return Page(items=rows[:limit], has_more=len(rows) > limit)
