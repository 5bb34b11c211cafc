"""Training files (OpenAI's Files API): uploaded once, named by id in a fine-tuning job.

A file is checked when it is uploaded (so a bad one is refused then, and nothing is stored) and
kept as uploaded, so `content` gives back exactly those bytes. Its texts are the writing samples
it carries:

    .jsonl   one JSON object per line, either OpenAI's chat format `{"messages": [...]}`, whose
             assistant turns are the user's writing (system and user turns are prompts, not the
             user's voice, and are left out), or `{"text": "..."}`
    .txt     one sample per blank-line separated paragraph

A user key owns what it uploads; an admin upload has no owner and only the admin sees it.
"""

from __future__ import annotations

import json
import re
import unicodedata

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.config import Settings
from core.db.models import FILE_ID_PREFIX, File
from core.service.api_keys import Caller
from core.service.errors import InvalidInput, NotFound, PayloadTooLarge, StorageLimitExceeded
from core.service.pagination import Page, paginate
from core.service.samples import parse_sample_file, validate_samples

PURPOSE = "fine-tune"
_FILE_ID = re.compile(re.escape(FILE_ID_PREFIX) + r"[0-9a-f]{32}")
_MAX_FILENAME = 255
_UNPRINTABLE = {"Cc", "Cf", "Zl", "Zp"}  # control and format characters, line/paragraph separators


def training_texts(filename: str, data: bytes, settings: Settings, param: str = "file") -> list[str]:
    """The cleaned writing samples of a training file, or `InvalidInput` naming the bad line."""
    if len(data) > settings.max_upload_bytes:
        raise PayloadTooLarge(
            f"file {filename!r} is {len(data)} bytes; the limit is {settings.max_upload_bytes}", param=param
        )
    name = (filename or "").lower()
    if name.endswith(".txt"):
        texts = parse_sample_file(filename, data, settings)
    elif name.endswith(".jsonl"):
        texts = _jsonl_texts(filename, data, param)
    else:
        raise InvalidInput("upload a .jsonl (chat or text lines) or .txt file", param=param)
    if not texts:
        raise InvalidInput(f"file {filename!r} holds no writing samples", param=param)
    return validate_samples(texts, settings, param=param)


def _jsonl_texts(filename: str, data: bytes, param: str) -> list[str]:
    try:
        content = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"file {filename!r} is not valid UTF-8 (byte {exc.start})", param=param) from None
    texts: list[str] = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            raise InvalidInput(f"line {number} of {filename!r} is not JSON", param=param) from None
        where = f"line {number} of {filename!r}"
        if isinstance(record, dict) and isinstance(record.get("text"), str):
            texts.append(record["text"])
        elif isinstance(record, dict) and isinstance(record.get("messages"), list):
            written = [_content(turn, where, param) for turn in record["messages"] if _is_assistant(turn, where, param)]
            if not written:
                raise InvalidInput(f"{where} has no assistant message (the user's writing)", param=param)
            texts.extend(written)
        else:
            expected = 'an object with "messages" (chat format) or a string "text"'
            raise InvalidInput(f"{where} must be {expected}", param=param)
    return texts


def _is_assistant(turn: object, where: str, param: str) -> bool:
    if not isinstance(turn, dict) or not isinstance(turn.get("role"), str):
        raise InvalidInput(f'{where}: every message needs a string "role"', param=param)
    return turn["role"] == "assistant"


def _content(turn: dict, where: str, param: str) -> str:
    """An assistant message's text: a string, or OpenAI's list of `{"type": "text", "text": ...}` parts."""
    content = turn.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str) for part in content
    ):
        return "".join(part["text"] for part in content)
    raise InvalidInput(f"{where}: an assistant message's content must be text", param=param)


def create_file(session: Session, settings: Settings, caller: Caller, filename: str, purpose: str, data: bytes) -> File:
    """Store an upload after checking it; nothing is stored if it is refused."""
    if purpose != PURPOSE:
        raise InvalidInput(f"purpose must be {PURPOSE!r}", param="purpose")
    filename = (filename or "").rsplit("/", 1)[-1]
    if not filename or len(filename) > _MAX_FILENAME:
        raise InvalidInput(f"the file needs a name of 1-{_MAX_FILENAME} characters", param="file")
    if any(unicodedata.category(char) in _UNPRINTABLE for char in filename):
        # NUL, newlines, ESC ...: echoed back they corrupt logs and terminals, and PostgreSQL
        # refuses a NUL in text outright.
        raise InvalidInput("the file name may not contain control characters", param="file")
    training_texts(filename, data, settings)
    if caller.user_id is not None:
        _check_storage(session, settings, caller.user_id, len(data))
    row = File(user_id=caller.user_id, filename=filename, purpose=purpose, bytes=len(data), data=data)
    session.add(row)
    session.flush()
    return row


def _check_storage(session: Session, settings: Settings, user_id: str, new_bytes: int) -> None:
    """A user key keeps at most `max_files_per_user` files of `max_file_bytes_per_user` bytes in all
    (an admin upload belongs to no user and is the operator's own)."""
    count, stored = session.execute(
        select(func.count(File.id), func.coalesce(func.sum(File.bytes), 0)).where(File.user_id == user_id)
    ).one()
    if count >= settings.max_files_per_user:
        raise StorageLimitExceeded(
            f"this key already stores {count} files, the limit (STEER_MAX_FILES_PER_USER); delete one first",
            param="file",
        )
    if stored + new_bytes > settings.max_file_bytes_per_user:
        raise StorageLimitExceeded(
            f"this file's {new_bytes} bytes would bring this key's stored files to {stored + new_bytes} bytes; "
            f"the limit is {settings.max_file_bytes_per_user} (STEER_MAX_FILE_BYTES_PER_USER); delete files first",
            param="file",
        )


def get_file(session: Session, caller: Caller, file_id: str) -> File:
    """A file the caller may see (its own; the admin: every one); `NotFound` otherwise."""
    row = session.get(File, file_id) if isinstance(file_id, str) and _FILE_ID.fullmatch(file_id) else None
    if row is None or not (caller.is_admin or row.user_id == caller.user_id):
        raise NotFound(f"no file with id {file_id!r}")
    return row


def list_files(session: Session, caller: Caller, *, purpose: str | None, after: str | None, limit: int) -> Page[File]:
    """Newest first, as OpenAI lists files."""
    statement = select(File)
    if not caller.is_admin:
        statement = statement.where(File.user_id == caller.user_id)
    if purpose is not None:
        statement = statement.where(File.purpose == purpose)
    return paginate(session, statement, File, after=after, limit=limit, newest_first=True)


def delete_file(session: Session, caller: Caller, file_id: str) -> File:
    row = get_file(session, caller, file_id)
    session.delete(row)
    session.flush()
    return row


def file_texts(session: Session, settings: Settings, caller: Caller, file_id: str, param: str) -> list[str]:
    """The writing samples of a file the caller may use in a job (404 for anyone else's)."""
    if not isinstance(file_id, str) or not file_id:
        raise InvalidInput(f"{param} must be a file id", param=param)
    row = get_file(session, caller, file_id)
    return training_texts(row.filename, row.data, settings, param=param)
