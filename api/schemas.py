"""Request bodies, and the builders of response bodies from database rows (the response models
themselves are in `api/responses.py`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from api import responses
from core.db import ApiKey as ApiKeyRow
from core.db import Job, JobEvent, PrefixVersion, Sample, User
from core.db.models import File as FileRow
from core.service import population, retrain
from core.service.api_keys import shown_prefix
from core.service.hyperparameters import MAX_SEED
from core.service.model_ids import CONTROL_NAME_PATTERN, EXTERNAL_ID_PATTERN
from core.tuners.registry import PREFIX


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
    user: str | None = Field(
        default=None, description="User id to train; a user key may omit it (itself). Admin key: this or `suffix`."
    )
    hyperparameters: dict[str, Any] | None = None
    model: str | None = Field(
        default=None,
        description="The served base model, or a model id of the user trained (`user:<external_id>`, "
        "`ft:<base>:<external_id>[:v<N>]`), which also names that user.",
    )
    training_file: str | None = Field(
        default=None,
        description="A file id (`POST /v1/files`): its texts are added to the user's writing samples "
        "(deduplicated) and the job trains on them all.",
    )
    validation_file: str | None = Field(
        default=None,
        description="A file id, checked like `training_file`; its texts are not trained on. The job "
        "holds out its own validation rows from the user's samples.",
    )
    suffix: str | None = Field(
        default=None, description="The external id of the user to train (admin key); a user key's own, if given."
    )
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="Same as `hyperparameters.seed`.")
    method: dict[str, Any] | None = Field(
        default=None,
        description='OpenAI\'s method: `{"type": "supervised"}` (the default) or `{"type": "dpo", "dpo": '
        '{"hyperparameters": {"beta": 0.1}}}` (preference tuning on a file of preference lines).',
    )
    metadata: dict[str, str] | None = Field(default=None, description="Accepted for OpenAI compatibility; not stored.")


class FeedbackRequest(_Strict):
    kind: Literal["accepted", "edited", "rejected"] = Field(
        description="accepted: sent as it was; edited: sent `final_text`, an edit of it; rejected: thrown "
        "away (with `final_text`: what the user wrote instead)."
    )
    final_text: str | None = Field(default=None, description="The text the user sent instead of the answer.")
    choice_index: int = Field(default=0, ge=0, le=127, description="Which choice of the answer (`n` > 1).")


class RetrainRequest(_Strict):
    user_ids: list[str] | None = Field(default=None, description="Retrain exactly these users.")
    all: bool = Field(default=False, description="Retrain every user that has samples.")
    trained_before: datetime | None = Field(
        default=None, description="Retrain users whose active prefix is older than this (ISO 8601, with zone)."
    )
    other_base_model: bool = Field(
        default=False, description="Retrain users whose active prefix was trained on another base model."
    )
    users_per_job: int = Field(
        default=8, ge=1, le=retrain.MAX_USERS_PER_JOB, description="Users trained together in one batched job."
    )
    hyperparameters: dict[str, Any] | None = None


class PopulationRequest(_Strict):
    samples_per_user: int = Field(
        default=population.SAMPLES_PER_USER,
        ge=1,
        le=population.MAX_SAMPLES_PER_USER,
        description="Samples drawn from each user (fewer if a user has fewer).",
    )
    max_users: int = Field(
        default=population.MAX_USERS,
        ge=1,
        le=population.MAX_DRAWN_USERS,
        description="Users drawn at random when more have samples.",
    )
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="Seed of the random draw.")
    hyperparameters: dict[str, Any] | None = Field(
        default=None,
        description='Training hyperparameters; each may be "auto" (batch_size: the rows of several users).',
    )


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
        method=(row.metrics or {}).get("method", PREFIX),
        prefix_len=row.prefix_len,
        population_version=(row.metrics or {}).get("population_version") if row.population_version_id else None,
        bytes=row.bytes,
        sha256=row.sha256,
        metrics=row.metrics,
        job_id=row.job_id,
        created_at=ts(row.created_at),
    )


def job_object(job: Job, base_model_id: str, viewer: str | None = None) -> responses.FineTuningJob:
    """The job as `viewer` (a user key's user id; None: the admin) may see it: a batch job that
    trains several users shows a user key only that user's part (id, result, model)."""
    error = responses.FineTuningJobError(message=job.error) if job.error else None
    user_ids, result, fine_tuned_model = list(job.user_ids), job.result, job.fine_tuned_model
    if viewer is not None and len(user_ids) > 1:
        user_ids = [viewer]
        if result is not None:
            result = {
                key: ({k: v for k, v in value.items() if k == viewer} if isinstance(value, dict) else value)
                for key, value in result.items()
            }
        mine = (result or {}).get("users", {}).get(viewer)
        fine_tuned_model = mine.get("model") if isinstance(mine, dict) else None
        if error is not None and any(uid in error.message for uid in job.user_ids if uid != viewer):
            error = responses.FineTuningJobError(message="the batch job failed; the admin can read why")
    return responses.FineTuningJob(
        id=job.id,
        kind=job.kind,
        model=base_model_id,
        status=job.status,
        user_ids=user_ids,
        user=user_ids[0] if len(user_ids) == 1 else None,
        hyperparameters=job.hyperparameters,
        fine_tuned_model=fine_tuned_model,
        result=result,
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


def checkpoint_object(user: User, row: PrefixVersion) -> responses.FineTuningJobCheckpoint:
    from core.service.registry import model_id_of

    metrics = row.metrics or {}
    steps = metrics.get("steps")
    step = steps if isinstance(steps, int) and not isinstance(steps, bool) else 0
    return responses.FineTuningJobCheckpoint(
        id=row.id,
        created_at=ts(row.created_at),
        fine_tuned_model_checkpoint=model_id_of(user, row),
        fine_tuning_job_id=row.job_id or "",
        step_number=step,
        metrics={"step": step, "train_loss": metrics.get("train_loss"), "valid_loss": metrics.get("val_loss")},
        user_id=user.id,
        version=row.version,
        status=row.status,
    )


def file_object(row: FileRow) -> responses.File:
    return responses.File(
        id=row.id,
        bytes=row.bytes,
        created_at=ts(row.created_at),
        filename=row.filename,
        purpose=row.purpose,
        user_id=row.user_id,
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
