"""Users' preference pairs: read from OpenAI's preference lines, stored, and handed to DPO jobs.

A preference line (OpenAI's fine-tuning format for `method={"type": "dpo"}`):

    {"input": {"messages": [{"role": "user", "content": "..."}]},
     "preferred_output": [{"role": "assistant", "content": "..."}],
     "non_preferred_output": [{"role": "assistant", "content": "..."}]}

Pairs come from such files and from users' feedback on answers (core/service/feedback.py); a DPO
job trains a user on all their stored pairs.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.config import Settings
from core.db.models import PreferencePairRecord
from core.service.errors import InvalidInput
from core.service.samples import validate_samples
from core.tuners.preference import PreferencePair

__all__ = ["PreferencePair", "preference_pair", "store_pairs", "user_pairs", "count_pairs", "message_text"]

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def message_text(turn: object, where: str, param: str) -> str:
    """A message's text: a string, or OpenAI's list of `{"type": "text", "text": ...}` parts."""
    content = turn.get("content") if isinstance(turn, dict) else None
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str) for part in content
    ):
        return "".join(part["text"] for part in content)
    raise InvalidInput(f"{where}: a message's content must be text", param=param)


def message_role(turn: object, where: str, param: str) -> str:
    if not isinstance(turn, dict) or not isinstance(turn.get("role"), str):
        raise InvalidInput(f'{where}: every message needs a string "role"', param=param)
    return turn["role"]


def chat_messages(messages: object, where: str, param: str) -> list[dict[str, str]]:
    """A request's messages as plain `{"role", "content"}` turns (developer = system)."""
    if not isinstance(messages, list) or not messages:
        raise InvalidInput(f"{where}: input.messages must be a non-empty list", param=param)
    plain = []
    for turn in messages:
        role = message_role(turn, where, param)
        if role not in _ROLES:
            raise InvalidInput(f"{where}: unsupported role {role!r} in input.messages", param=param)
        plain.append({"role": _ROLES[role], "content": message_text(turn, where, param)})
    if plain[-1]["role"] != "user":
        raise InvalidInput(f"{where}: input.messages must end with the user's request", param=param)
    return plain


def _answer(record: dict, key: str, where: str, param: str) -> str:
    output = record.get(key)
    if not isinstance(output, list) or len(output) != 1 or message_role(output[0], where, param) != "assistant":
        raise InvalidInput(f"{where}: {key} must be a list of one assistant message", param=param)
    return message_text(output[0], where, param)


def preference_pair(record: dict, settings: Settings, where: str, param: str) -> PreferencePair:
    """One preference line as a pair, or `InvalidInput` naming the line and what is wrong."""
    request = record.get("input")
    if not isinstance(request, dict):
        raise InvalidInput(f'{where}: a preference example needs an "input" object with "messages"', param=param)
    messages = chat_messages(request.get("messages"), where, param)
    preferred = _answer(record, "preferred_output", where, param)
    rejected = _answer(record, "non_preferred_output", where, param)
    try:
        (preferred,) = validate_samples([preferred], settings, param="preferred_output")
        (rejected,) = validate_samples([rejected], settings, param="non_preferred_output")
    except InvalidInput as exc:
        raise InvalidInput(f"{where}: {exc}", param=param) from None
    if preferred == rejected:
        raise InvalidInput(f"{where}: the preferred and the non-preferred output are the same", param=param)
    return PreferencePair(tuple(messages), preferred, rejected)


def store_pairs(session: Session, user_id: str, pairs: list[PreferencePair], source: str) -> list[PreferencePairRecord]:
    rows = [
        PreferencePairRecord(
            user_id=user_id, messages=list(p.messages), preferred=p.preferred, rejected=p.rejected, source=source
        )
        for p in pairs
    ]
    session.add_all(rows)
    session.flush()
    return rows


def user_pairs(session: Session, user_id: str) -> list[PreferencePair]:
    """Every stored pair of the user, oldest first (a fixed order: the same job, the same split)."""
    rows = session.execute(
        select(PreferencePairRecord)
        .where(PreferencePairRecord.user_id == user_id)
        .order_by(PreferencePairRecord.created_at, PreferencePairRecord.id)
    ).scalars()
    return [PreferencePair(tuple(dict(m) for m in row.messages), row.preferred, row.rejected) for row in rows]


def count_pairs(session: Session, user_id: str) -> int:
    query = select(func.count()).select_from(PreferencePairRecord).where(PreferencePairRecord.user_id == user_id)
    return session.execute(query).scalar_one()
