"""The JSON bodies of successful answers, as published in the OpenAPI schema.

Field names and values are exactly what the API has always sent (OpenAI's where one exists: the
official `openai` client reads them). Every field is always present; a nullable one is sent as
`null`. Unknown fields are refused, so the schema says `additionalProperties: false` and the fuzz
suite (`tests/test_fuzz_api.py`) catches a route that sends more, or less, than it declares.

The builders in `api/schemas.py` turn database rows into these; the routes declare them as their
return type, so FastAPI documents them and checks every outgoing body against them. The OpenAI
completion bodies are built as plain dicts on the generation path (`api/routes/completions.py`)
and are checked against these models by the tests.
"""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

# Kept equal to core.db.models.JOB_KINDS / JOB_STATUSES / PREFIX_STATUSES (a test checks it).
JobKind = Literal["onboarding", "retrain", "admin-batch", "control"]
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
PrefixStatus = Literal["active", "retired", "corrupt", "candidate"]
EventLevel = Literal["info", "warning", "error"]
FinishReason = Literal["stop", "length"]

Timestamp = int  # Unix seconds, as OpenAI's API returns times


class Body(BaseModel):
    """A response body: no fields beyond the declared ones; a field with a default (the fixed
    `object` names) is still always sent, so the schema lists it as required."""

    model_config = ConfigDict(extra="forbid", json_schema_serialization_defaults_required=True)


# -- users, samples, prefixes ----------------------------------------------------------------------


class User(Body):
    object: Literal["user"] = "user"
    id: str
    external_id: str
    created_at: Timestamp
    fine_tuned_model: str | None = Field(
        description="The model id serving the user's active prefix; null before the first training."
    )


class Sample(Body):
    object: Literal["sample"] = "sample"
    id: str
    user_id: str
    text: str
    sha256: str
    source: str = Field(description='How the sample arrived: "api" (JSON) or "upload" (a file).')
    created_at: Timestamp


class PrefixVersion(Body):
    object: Literal["prefix_version"] = "prefix_version"
    id: str
    model: str = Field(description="The model id of this version, `ft:<base>:<external_id>:v<version>`.")
    version: int
    status: PrefixStatus
    base_model: str
    base_fingerprint: str
    method: str = Field(
        description="What the version holds: `prefix`, `lora` or `pt-peft` (a prefix and a LoRA); a job with "
        "method `auto` keeps one of them per user (its `metrics.auto` has each method's validation loss)."
    )
    prefix_len: int = Field(description="Virtual tokens of the version's prefix (0: a LoRA alone).")
    population_version: int | None = Field(
        default=None,
        description="The version of the population prefix (`control:population`) this version trained on "
        "top of and is served composed with; null: served alone.",
    )
    bytes: int
    sha256: str
    metrics: dict[str, Any]
    job_id: str | None
    created_at: Timestamp


class ApiKey(Body):
    object: Literal["api_key"] = "api_key"
    key: str
    note: str


class ApiKeyInfo(Body):
    """A user's API key as listings show it: never the key itself."""

    object: Literal["api_key.info"] = "api_key.info"
    id: str
    user_id: str
    prefix: str = Field(description="The key's first characters (`sk-steer-` and 8 more), to tell keys apart.")
    created_at: Timestamp
    last_used_at: Timestamp | None = Field(description="Last request with this key (to the minute); null if never.")
    revoked_at: Timestamp | None = Field(description="When it was revoked; null for a live key.")


class ApiKeyRotated(Body):
    object: Literal["api_key.rotated"] = "api_key.rotated"
    key: str = Field(description="The new key, shown once.")
    note: str
    api_key: ApiKeyInfo = Field(description="The new key's listing entry.")
    revoked: ApiKeyInfo = Field(description="The old key, revoked: it answers 401 from now on.")


class Control(Body):
    object: Literal["control"] = "control"
    id: str
    name: str
    model: str = Field(description="How to name it: `control:<name>` alone, or `+<name>` after any model id.")
    created_at: Timestamp
    active_version: int | None = Field(description="The version requests use; null until one is trained.")
    samples: int


class ControlDeleted(Body):
    object: Literal["control.deleted"] = "control.deleted"
    id: str
    name: str
    deleted: bool


class UserDeleted(Body):
    object: Literal["user.deleted"] = "user.deleted"
    id: str
    deleted: bool


class SampleDeleted(Body):
    object: Literal["sample.deleted"] = "sample.deleted"
    id: str
    deleted: bool


# -- fine-tuning jobs ------------------------------------------------------------------------------


class FineTuningJobError(Body):
    code: Literal["training_failed"] = "training_failed"
    message: str
    param: None = None


class FineTuningJob(Body):
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    id: str
    kind: JobKind
    model: str = Field(description="The served base model.")
    status: JobStatus
    user_ids: list[str]
    user: str | None = Field(description="The user trained, when the job trains exactly one.")
    hyperparameters: dict[str, Any]
    fine_tuned_model: str | None
    result: dict[str, Any] | None
    progress: dict[str, Any]
    attempts: int
    error: FineTuningJobError | None
    created_at: Timestamp
    started_at: Timestamp | None
    finished_at: Timestamp | None


class FineTuningJobEvent(Body):
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    id: str
    created_at: Timestamp
    level: EventLevel
    message: str
    data: dict[str, Any] | None
    type: Literal["message", "metrics"]


class FineTuningJobCheckpoint(Body):
    """A prefix version a job published, in the shape of OpenAI's fine-tuning checkpoints."""

    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    id: str = Field(description="The prefix version's id.")
    created_at: Timestamp
    fine_tuned_model_checkpoint: str = Field(description="The version's model id, `ft:<base>:<external_id>:v<N>`.")
    fine_tuning_job_id: str
    step_number: int = Field(description="Optimizer steps the version was trained for.")
    metrics: dict[str, Any] = Field(description="`step`, `train_loss`, `valid_loss` (null when not measured).")
    user_id: str
    version: int
    status: PrefixStatus


# -- files -----------------------------------------------------------------------------------------


class File(Body):
    object: Literal["file"] = "file"
    id: str
    bytes: int
    created_at: Timestamp
    filename: str
    purpose: Literal["fine-tune"]
    status: Literal["processed"] = Field(default="processed", description="Checked when uploaded.")
    user_id: str | None = Field(description="The owner (the uploading user key's user); null for an admin upload.")


class FileDeleted(Body):
    object: Literal["file"] = "file"
    id: str
    deleted: bool


# -- lists -----------------------------------------------------------------------------------------

T = TypeVar("T")


class ListObject(Body, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool


class ControlList(ListObject[Control]):
    pass


class ApiKeyInfoList(ListObject[ApiKeyInfo]):
    pass


class UserList(ListObject[User]):
    pass


class SampleList(ListObject[Sample]):
    pass


class SamplesAdded(ListObject[Sample]):
    """The samples stored by this request (`has_more` is always false)."""

    duplicates: int = Field(description="Samples skipped as duplicates of stored ones.")


class PrefixVersionList(ListObject[PrefixVersion]):
    pass


class FineTuningJobList(ListObject[FineTuningJob]):
    pass


class FineTuningJobEventList(ListObject[FineTuningJobEvent]):
    pass


class FineTuningJobCheckpointList(ListObject[FineTuningJobCheckpoint]):
    pass


class FileList(ListObject[File]):
    pass


# -- onboarding ------------------------------------------------------------------------------------


class OnboardingSamples(Body):
    added: int
    duplicates: int


class ControlCreated(Body):
    object: Literal["control.created"] = "control.created"
    control: Control
    samples: OnboardingSamples
    job: FineTuningJob


class PopulationTraining(Body):
    object: Literal["population.training"] = "population.training"
    control: Control = Field(description="The population prefix is the control named `population`.")
    users: int = Field(description="Users whose samples were drawn.")
    samples: int = Field(description="Samples the population trains on.")
    job: FineTuningJob


class Onboarding(Body):
    object: Literal["onboarding"] = "onboarding"
    user: User
    created: bool = Field(description="Whether the user was created by this request.")
    api_key: str | None = Field(description="The new user's API key (shown once); null for an existing user.")
    samples: OnboardingSamples
    job: FineTuningJob


# -- operators -------------------------------------------------------------------------------------


class Health(Body):
    status: Literal["ok"] = "ok"


class Readiness(Body):
    status: Literal["ready", "unavailable"]
    checks: dict[str, str] = Field(description='Each dependency checked: "ok" or what is wrong with it.')
    inference_workers: int | None = Field(
        default=None,
        description="Inference capacity, reported without deciding `status` (the API serves everything "
        "else without it): distributed mode, the inference workers with a recent heartbeat (0: completions "
        "answer 503 `inference_unavailable`); embedded mode, 1 while the in-process engine runs; null when "
        "it cannot be told (the broker is down).",
    )
    training_workers: int | None = Field(
        default=None,
        description="Training capacity, reported without deciding `status` (jobs wait queued without it): "
        "distributed mode, the training workers with a recent heartbeat; embedded mode, 1 (the in-process "
        "executor); null when it cannot be told (the broker is down).",
    )


class Worker(Body):
    id: str = Field(description="The worker's name: `<host>-<pid>` (an inference worker's Redis consumer name).")
    kind: Literal["training", "inference"]
    host: str
    pid: int
    started_at: int = Field(description="Unix seconds, by the worker host's clock.")
    last_seen: int = Field(description="Unix seconds of its last heartbeat, by the Redis server's clock.")
    current: str | None = Field(
        description="What it works on: a training job's id, or an inference worker's rows in its batch; null when idle."
    )


class WorkerList(Body):
    object: Literal["list"] = "list"
    data: list[Worker]
    has_more: bool = False


# -- OpenAI-compatible inference -------------------------------------------------------------------


class Model(Body):
    id: str
    object: Literal["model"] = "model"
    created: Timestamp
    owned_by: str


class ModelDeleted(Body):
    """A prefix version retired by `DELETE /v1/models/{model}`."""

    id: str
    object: Literal["model"] = "model"
    deleted: bool


class ModelList(Body):
    object: Literal["list"] = "list"
    data: list[Model]


class CompletionUsage(Body):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionMessage(Body):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatCompletionChoice(Body):
    index: int
    message: ChatCompletionMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletion(Body):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: Timestamp
    model: str
    choices: list[ChatCompletionChoice]
    usage: CompletionUsage


class CompletionChoice(Body):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason


class Completion(Body):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: Timestamp
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage


# Streamed chunks (`stream: true`): each server-sent event's `data` is one of these, an error
# object if generation fails mid-stream, or `[DONE]` at the end. `usage` is only in the last
# chunk, with `stream_options.include_usage` (and `choices` empty); delta fields may be absent.


class Chunk(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChatCompletionChunkDelta(Chunk):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatCompletionChunkChoice(Chunk):
    index: int
    delta: ChatCompletionChunkDelta
    logprobs: None
    finish_reason: FinishReason | None


class ChatCompletionChunk(Chunk):
    id: str
    object: Literal["chat.completion.chunk"]
    created: Timestamp
    model: str
    choices: list[ChatCompletionChunkChoice]
    usage: CompletionUsage | None = None


class CompletionChunkChoice(Chunk):
    index: int
    text: str
    logprobs: None
    finish_reason: FinishReason | None


class CompletionChunk(Chunk):
    id: str
    object: Literal["text_completion"]
    created: Timestamp
    model: str
    choices: list[CompletionChunkChoice]
    usage: CompletionUsage | None = None


class FeedbackRecorded(Body):
    object: Literal["chat.completion.feedback"] = "chat.completion.feedback"
    id: str
    completion_id: str
    choice_index: int
    kind: str
    samples_added: int = Field(description="Writing samples the feedback added (0 or 1).")
    pairs_added: int = Field(description="Preference pairs the feedback added (0 or 1).")
    job: str | None = Field(description="The training job this feedback queued (STEER_FEEDBACK_RETRAIN_AFTER).")
    created_at: Timestamp
