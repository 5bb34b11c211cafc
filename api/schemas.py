"""Request bodies, and the builders of response bodies from database rows (the response models
themselves are in `api/responses.py`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from api import responses
from core.db import ApiKey as ApiKeyRow
from core.db import Job, JobEvent, PrefixVersion, Sample, User
from core.service.api_keys import shown_prefix
from core.service.model_ids import CONTROL_NAME_PATTERN, EXTERNAL_ID_PATTERN


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Documented precisely in the schema; checked by the service (`validate_samples`), whose errors
# name the offending sample (`samples[3]`).
_SAMPLES_SCHEMA = {"minItems": 1, "items": {"type": "string", "minLength": 1}}


class OnboardingRequest(_Strict):
    external_id: str = Field(
        description="The caller's own id of the user (letters, digits, . _ @ + -).",
        json_schema_extra={"pattern": EXTERNAL_ID_PATTERN.pattern, "maxLength": 128},
    )
    samples: list[Any] = Field(description="Writing samples, one string each.", json_schema_extra=_SAMPLES_SCHEMA)
    hyperparameters: dict[str, Any] | None = Field(
        default=None, description='Training hyperparameters; each may be "auto".'
    )


class ControlRequest(_Strict):
    name: str = Field(
        description="The control's name: lowercase letters, digits, _ and -, starting with a letter.",
        json_schema_extra={"pattern": CONTROL_NAME_PATTERN.pattern, "maxLength": 64},
    )
    samples: list[Any] = Field(
        description="Example texts of the attribute, one string each.", json_schema_extra=_SAMPLES_SCHEMA
    )
    hyperparameters: dict[str, Any] | None = Field(
        default=None, description='Training hyperparameters; each may be "auto".'
    )


class RetrainControlRequest(_Strict):
    hyperparameters: dict[str, Any] | None = Field(
        default=None, description='Training hyperparameters; each may be "auto".'
    )


class SamplesRequest(_Strict):
    samples: list[Any] = Field(description="Writing samples, one string each.", json_schema_extra=_SAMPLES_SCHEMA)


class CreateJobRequest(_Strict):
    user: str | None = Field(default=None, description="User id; a user key may omit it (itself).")
    hyperparameters: dict[str, Any] | None = None
    model: str | None = Field(
        default=None, description="Accepted for OpenAI compatibility; must be the served base model."
    )


class RetrainRequest(_Strict):
    user_ids: list[str] | None = Field(default=None, description="Retrain exactly these users.")
    all: bool = Field(default=False, description="Retrain every user that has samples.")
    trained_before: datetime | None = Field(
        default=None, description="Retrain users whose active prefix is older than this (ISO 8601, with zone)."
    )
    other_base_model: bool = Field(
        default=False, description="Retrain users whose active prefix was trained on another base model."
    )
    users_per_job: int = Field(default=8, description="Users trained together in one batched job.")
    hyperparameters: dict[str, Any] | None = None


def ts(value: datetime | None) -> int | None:
    """Unix seconds, as OpenAI's API returns times."""
    return None if value is None else int(value.timestamp())


def user_object(user: User, active: PrefixVersion | None = None) -> responses.User:
    from core.service.registry import model_id_of

    return responses.User(
        id=user.id,
        external_id=user.external_id,
        created_at=ts(user.created_at),
        fine_tuned_model=model_id_of(user, active) if active is not None else None,
    )


def control_object(control: User, active: PrefixVersion | None, samples: int) -> responses.Control:
    from core.service.controls import name_of

    return responses.Control(
        id=control.id,
        name=name_of(control),
        model=control.external_id,
        created_at=ts(control.created_at),
        active_version=None if active is None else active.version,
        samples=samples,
    )


def sample_object(sample: Sample) -> responses.Sample:
    return responses.Sample(
        id=sample.id,
        user_id=sample.user_id,
        text=sample.text,
        sha256=sample.sha256,
        source=sample.source,
        created_at=ts(sample.created_at),
    )


def prefix_object(user: User, row: PrefixVersion) -> responses.PrefixVersion:
    from core.service.registry import model_id_of

    return responses.PrefixVersion(
        id=row.id,
        model=model_id_of(user, row),
        version=row.version,
        status=row.status,
        base_model=row.base_model_id,
        base_fingerprint=row.base_fingerprint,
        prefix_len=row.prefix_len,
        bytes=row.bytes,
        sha256=row.sha256,
        metrics=row.metrics,
        job_id=row.job_id,
        created_at=ts(row.created_at),
    )


def job_object(job: Job, base_model_id: str) -> responses.FineTuningJob:
    error = responses.FineTuningJobError(message=job.error) if job.error else None
    return responses.FineTuningJob(
        id=job.id,
        kind=job.kind,
        model=base_model_id,
        status=job.status,
        user_ids=job.user_ids,
        user=job.user_ids[0] if len(job.user_ids) == 1 else None,
        hyperparameters=job.hyperparameters,
        fine_tuned_model=job.fine_tuned_model,
        result=job.result,
        progress=job.progress,
        attempts=job.attempts,
        error=error,
        created_at=ts(job.created_at),
        started_at=ts(job.started_at),
        finished_at=ts(job.finished_at),
    )


def event_object(event: JobEvent) -> responses.FineTuningJobEvent:
    return responses.FineTuningJobEvent(
        id=f"ftevent-{event.id}",
        created_at=ts(event.created_at),
        level=event.level,
        message=event.message,
        data=event.data,
        type="metrics" if event.data and "step" in event.data else "message",
    )


def api_key_object(key: str) -> responses.ApiKey:
    return responses.ApiKey(key=key, note="shown once; store it now")


def api_key_info_object(row: ApiKeyRow) -> responses.ApiKeyInfo:
    return responses.ApiKeyInfo(
        id=row.id,
        user_id=row.user_id,
        prefix=shown_prefix(row),
        created_at=ts(row.created_at),
        last_used_at=ts(row.last_used_at),
        revoked_at=ts(row.revoked_at),
    )


def api_key_rotated_object(key: str, new: ApiKeyRow, old: ApiKeyRow) -> responses.ApiKeyRotated:
    return responses.ApiKeyRotated(
        key=key,
        note="shown once; store it now. The old key is revoked.",
        api_key=api_key_info_object(new),
        revoked=api_key_info_object(old),
    )
