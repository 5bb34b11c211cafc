"""Training files (OpenAI's Files API): uploaded once, named by id in a fine-tuning job.

A file is checked when it is uploaded (so a bad one is refused then, and nothing is stored) and
kept as uploaded, so `content` gives back exactly those bytes. Its texts are the writing samples
it carries:

    .jsonl   one JSON object per line, either OpenAI's chat format `{"messages": [...]}`, whose
             assistant turns are the user's writing (system and user turns are prompts, not the
             user's voice, and are left out), or `{"text": "..."}`
    .txt     one sample per blank-line separated paragraph

and, for preference tuning (DPO), OpenAI's preference lines:
`{"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", "content": ...}],
"non_preferred_output": [...]}` (core/service/preferences.py). A job takes the lines its method
uses: a supervised job refuses a preference line, a DPO job any other line, by its number.

A user key owns what it uploads; an admin upload has no owner and only the admin sees it.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.config import Settings
from core.db.models import FILE_ID_PREFIX, File
from core.service.api_keys import Caller
from core.service.errors import InvalidInput, NotFound, PayloadTooLarge, StorageLimitExceeded
from core.service.pagination import Page, paginate
from core.service.preferences import PreferencePair, message_role, message_text, preference_pair
from core.service.samples import parse_sample_file, validate_samples

PURPOSE = "fine-tune"
_FILE_ID = re.compile(re.escape(FILE_ID_PREFIX) + r"[0-9a-f]{32}")
_MAX_FILENAME = 255
_UNPRINTABLE = {"Cc", "Cf", "Zl", "Zp"}  # control and format characters, line/paragraph separators


@dataclass
class TrainingFile:
    """What a training file holds: writing samples (supervised) and/or preference pairs (DPO), each
    with the line it came from, so a job that cannot use a line can name it."""

    filename: str
    texts: list[tuple[int, str]] = field(default_factory=list)
    pairs: list[tuple[int, PreferencePair]] = field(default_factory=list)


def read_training_file(filename: str, data: bytes, settings: Settings, param: str = "file") -> TrainingFile:
    """The samples and pairs of a training file, or `InvalidInput` naming the bad line."""
    if len(data) > settings.max_upload_bytes:
        raise PayloadTooLarge(
            f"file {filename!r} is {len(data)} bytes; the limit is {settings.max_upload_bytes}", param=param
        )
    name = (filename or "").lower()
    if name.endswith(".txt"):
        parsed = TrainingFile(filename, texts=list(enumerate(parse_sample_file(filename, data, settings), start=1)))
    elif name.endswith(".jsonl"):
        parsed = _jsonl_lines(filename, data, settings, param)
    else:
        raise InvalidInput("upload a .jsonl (chat, text or preference lines) or .txt file", param=param)
    if not parsed.texts and not parsed.pairs:
        raise InvalidInput(f"file {filename!r} holds no writing samples", param=param)
    if parsed.texts:
        cleaned = validate_samples([text for _, text in parsed.texts], settings, param=param)
        parsed.texts = [(number, text) for (number, _), text in zip(parsed.texts, cleaned)]
    return parsed


def training_texts(parsed: TrainingFile, param: str) -> list[str]:
    """A supervised job's samples: a preference line in the file is refused, by its number."""
    if parsed.pairs:
        number = parsed.pairs[0][0]
        raise InvalidInput(
            f'line {number} of {parsed.filename!r} is a preference example; train it with method={{"type": "dpo"}}',
            param=param,
        )
    return [text for _, text in parsed.texts]


def training_pairs(parsed: TrainingFile, param: str) -> list[PreferencePair]:
    """A DPO job's pairs: a line that is not a preference example is refused, by its number."""
    if parsed.texts:
        number = parsed.texts[0][0]
        where = f"line {number}" if parsed.filename.lower().endswith(".jsonl") else f"paragraph {number}"
        raise InvalidInput(
            f"{where} of {parsed.filename!r} is not a preference example (input, preferred_output, "
            "non_preferred_output), which a DPO job needs",
            param=param,
        )
    return [pair for _, pair in parsed.pairs]


def _jsonl_lines(filename: str, data: bytes, settings: Settings, param: str) -> TrainingFile:
    try:
        content = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"file {filename!r} is not valid UTF-8 (byte {exc.start})", param=param) from None
    parsed = TrainingFile(filename)
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            raise InvalidInput(f"line {number} of {filename!r} is not JSON", param=param) from None
        where = f"line {number} of {filename!r}"
        if isinstance(record, dict) and isinstance(record.get("text"), str):
            parsed.texts.append((number, record["text"]))
        elif isinstance(record, dict) and "preferred_output" in record:
            parsed.pairs.append((number, preference_pair(record, settings, where, param)))
        elif isinstance(record, dict) and isinstance(record.get("messages"), list):
            turns = record["messages"]
            written = [message_text(t, where, param) for t in turns if message_role(t, where, param) == "assistant"]
            if not written:
                raise InvalidInput(f"{where} has no assistant message (the user's writing)", param=param)
            parsed.texts.extend((number, text) for text in written)
        else:
            expected = 'an object with "messages" (chat format), a string "text", or a preference example'
            raise InvalidInput(f"{where} must be {expected}", param=param)
    return parsed


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
    read_training_file(filename, data, settings)
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
    """The writing samples of a file the caller may use in a supervised job (404 for anyone else's)."""
    return training_texts(_read_file(session, settings, caller, file_id, param), param)


def file_pairs(session: Session, settings: Settings, caller: Caller, file_id: str, param: str) -> list[PreferencePair]:
    """The preference pairs of a file the caller may use in a DPO job (404 for anyone else's)."""
    return training_pairs(_read_file(session, settings, caller, file_id, param), param)


def _read_file(session: Session, settings: Settings, caller: Caller, file_id: str, param: str) -> TrainingFile:
    if not isinstance(file_id, str) or not file_id:
        raise InvalidInput(f"{param} must be a file id", param=param)
    row = get_file(session, caller, file_id)
    return read_training_file(row.filename, row.data, settings, param=param)
