"""Writing samples: validated against the configured limits, deduplicated per user by sha256.

Validation happens before anything is written, so a bad request changes nothing.
"""

from __future__ import annotations

import json
import re

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from core.config import Settings
from core.db import Sample, User
from core.engine.data import clean_text, sample_fingerprint
from core.service.errors import InvalidInput, NotFound, PayloadTooLarge
from core.service.model_ids import POPULATION_COPY_SOURCE
from core.service.pagination import Page, paginate

UPLOAD_SUFFIXES = (".txt", ".jsonl")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


def validate_samples(texts: object, settings: Settings, param: str = "samples") -> list[str]:
    """The cleaned samples of a request, or `InvalidInput` naming the first bad one."""
    if not isinstance(texts, list) or not texts:
        raise InvalidInput("provide at least one writing sample", param=param)
    if len(texts) > settings.max_samples_per_request:
        raise InvalidInput(
            f"too many samples in one request: {len(texts)} > {settings.max_samples_per_request}",
            param=param,
        )
    cleaned = []
    for index, text in enumerate(texts):
        where = f"{param}[{index}]"
        if not isinstance(text, str):
            raise InvalidInput(f"{where} must be a string", param=where)
        if not _encodable(text):  # JSON can spell a lone surrogate ("\ud800"); nothing can store it
            raise InvalidInput(f"{where} is not valid Unicode (a lone UTF-16 surrogate)", param=where)
        if len(text) > settings.max_sample_chars:
            raise InvalidInput(
                f"{where} is too long: {len(text)} characters > {settings.max_sample_chars}",
                param=where,
            )
        text = clean_text(text)
        if len(text) < settings.min_sample_chars:
            raise InvalidInput(
                f"{where} is empty or shorter than {settings.min_sample_chars} characters",
                param=where,
            )
        cleaned.append(text)
    return cleaned


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_sample_file(filename: str, data: bytes, settings: Settings) -> list[str]:
    """Samples from an uploaded file: `.txt` (one sample per blank-line separated paragraph)
    or `.jsonl` (one `{"text": ...}` object per line). Raw texts; validate them afterwards."""
    if len(data) > settings.max_upload_bytes:
        raise PayloadTooLarge(
            f"file {filename!r} is {len(data)} bytes; the limit is {settings.max_upload_bytes}",
            param="file",
        )
    name = (filename or "").lower()
    if not name.endswith(UPLOAD_SUFFIXES):
        raise InvalidInput("upload a .txt or .jsonl file", param="file")
    try:
        content = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"file {filename!r} is not valid UTF-8 (byte {exc.start})", param="file") from None
    if name.endswith(".txt"):
        paragraphs = _PARAGRAPH_BREAK.split(content.replace("\r\n", "\n").replace("\r", "\n"))
        return [p for p in paragraphs if p.strip()]
    texts = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"line {number} of {filename!r} is not JSON: {exc.msg}", param="file") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise InvalidInput(f'line {number} of {filename!r} must be an object with a string "text"', param="file")
        texts.append(record["text"])
    return texts


def add_samples(
    session: Session, settings: Settings, user: User, texts: list[str], source: str
) -> tuple[list[Sample], int]:
    """Store the new samples of `texts` (already validated); (added rows, duplicates skipped)."""
    by_hash: dict[str, str] = {}
    for text in texts:
        by_hash.setdefault(sample_fingerprint(text), text)
    existing = set(
        session.execute(
            select(Sample.sha256).where(Sample.user_id == user.id, Sample.sha256.in_(list(by_hash)))
        ).scalars()
    )
    new = {digest: text for digest, text in by_hash.items() if digest not in existing}
    stored = count_samples(session, user.id)
    if stored + len(new) > settings.max_total_samples_per_user:
        raise InvalidInput(
            f"user would have {stored + len(new)} samples; the limit is {settings.max_total_samples_per_user}",
            param="samples",
        )
    rows = [Sample(user_id=user.id, text=text, sha256=digest, source=source) for digest, text in new.items()]
    session.add_all(rows)
    session.flush()
    return rows, len(texts) - len(rows)


def count_samples(session: Session, user_id: str) -> int:
    return session.execute(select(func.count()).select_from(Sample).where(Sample.user_id == user_id)).scalar_one()


def list_samples(session: Session, user: User, *, after: str | None, limit: int) -> Page[Sample]:
    statement = select(Sample).where(Sample.user_id == user.id)
    return paginate(session, statement, Sample, after=after, limit=limit, newest_first=False)


def delete_sample(session: Session, user: User, sample_id: str) -> None:
    sample = session.get(Sample, sample_id)
    if sample is None or sample.user_id != user.id:
        raise NotFound(f"no sample with id {sample_id!r}")
    session.delete(sample)
    # Its copy in the population prefix's samples goes with it (core/service/population.py).
    session.execute(
        delete(Sample).where(Sample.source == POPULATION_COPY_SOURCE + user.id, Sample.sha256 == sample.sha256)
    )
    session.flush()


def user_sample_texts(session: Session, user_id: str) -> list[str]:
    """Every sample text of a user, oldest first (the training data)."""
    return list(
        session.execute(
            select(Sample.text).where(Sample.user_id == user_id).order_by(Sample.created_at, Sample.id)
        ).scalars()
    )
