"""Service settings, read from `STEER_*` environment variables (and an optional env file).

One `Settings` object describes both deployment shapes:

* embedded mode (no `STEER_REDIS_URL`): one process, SQLite file and blobs under `data_dir`;
* distributed mode (`STEER_REDIS_URL` set): API + Celery workers, usually Postgres and S3.

Every field carries a `description`; `settings_table_markdown()` turns them into the README's
settings table so the documentation cannot drift from the code.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.tuners.registry import PREFIX, SERVED_METHODS

ENV_PREFIX = "STEER_"
ENV_FILE_VARIABLE = "STEER_ENV_FILE"
DEFAULT_ENV_FILE = ".env"

MiB = 1024 * 1024


class Settings(BaseSettings):
    """All knobs of the service. Field `x` is read from the environment variable `STEER_X`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=None,  # chosen at construction time by get_settings(), see STEER_ENV_FILE
        env_file_encoding="utf-8",
        # An env file may hold variables for other tools; do not refuse to start because of them.
        extra="ignore",
        validate_default=True,
    )

    # --- where state lives -------------------------------------------------------------------
    data_dir: Path = Field(
        default=Path("~/.steer"),
        description="Local state directory: the SQLite database, local blobs and the model cache "
        "(embedded mode keeps everything here). `~` is expanded.",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy database URL, e.g. `postgresql+psycopg2://user@host/steer`. "
        "Unset: a SQLite file `steer.db` inside the data directory.",
    )
    redis_url: str | None = Field(
        default=None,
        description="Redis URL for the Celery broker and result backend. Unset: embedded mode "
        "(training runs in-process, no Redis needed); set: distributed mode.",
    )

    # --- blob storage ------------------------------------------------------------------------
    blob_store: Literal["auto", "local", "s3"] = Field(
        default="auto",
        description="Where prefix artifacts are stored: `local` (files under the data directory), "
        "`s3` (an S3-compatible server), or `auto` (s3 when an S3 endpoint is set, else local).",
    )
    s3_endpoint: str | None = Field(
        default=None,
        description="S3 endpoint as `host:port` without scheme, e.g. `127.0.0.1:9000`.",
    )
    s3_access_key: str | None = Field(default=None, description="S3 access key id.")
    s3_secret_key: SecretStr | None = Field(default=None, description="S3 secret access key.")
    s3_bucket: str = Field(default="steer", description="S3 bucket for artifacts; created if it does not exist.")
    s3_secure: bool = Field(default=False, description="Use HTTPS to talk to the S3 endpoint.")
    s3_region: str | None = Field(default=None, description="S3 region; unset lets the client discover it.")

    # --- access ------------------------------------------------------------------------------
    admin_key: SecretStr | None = Field(
        default=None,
        description="Key that authorizes admin endpoints (creating users, issuing keys, batch "
        "jobs). Unset: admin endpoints are disabled.",
    )

    # --- model -------------------------------------------------------------------------------
    base_model: str = Field(
        default="smollm2",
        description="Frozen base model: `smollm2` (the bundled SmolLM2), `tiny` (a tiny random "
        "model for tests), or a path to a local model directory: a Llama-type, GPT-2 or Qwen2 decoder "
        "(no sliding-window attention), or a T5 or BART encoder-decoder.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="Torch device; `auto` picks CUDA when available."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="Torch dtype of the base model; `auto` = float32 on CPU, bfloat16 on CUDA.",
    )

    # --- input limits ------------------------------------------------------------------------
    max_samples_per_request: int = Field(
        default=1000, gt=0, description="Most writing samples accepted in one upload request."
    )
    max_sample_chars: int = Field(default=20_000, gt=0, description="Longest accepted writing sample, in characters.")
    min_sample_chars: int = Field(default=1, ge=1, description="Shortest accepted writing sample, in characters.")
    max_upload_bytes: int = Field(
        default=5_000_000, gt=0, description="Largest accepted request body for sample uploads."
    )
    max_total_samples_per_user: int = Field(
        default=10_000, gt=0, description="Most writing samples one user may store."
    )
    max_files_per_user: int = Field(
        default=100, gt=0, description="Most training files (`/v1/files`) one user key may keep stored."
    )
    max_file_bytes_per_user: int = Field(
        default=25_000_000,
        gt=0,
        description="Most bytes of training files one user key may keep stored (all its files together).",
    )
    feedback_enabled: bool = Field(
        default=False,
        description="Keep each chat completion on a user's model (request and answers) so the application "
        "can report what the user did with it (`POST /v1/chat/completions/{id}/feedback`); off: nothing "
        "is kept and feedback is 404.",
    )
    feedback_retention_days: float = Field(
        default=30.0,
        gt=0,
        le=3650,
        description="How long a kept completion may still take feedback; then it is deleted. What feedback "
        "made of it (a sample, a preference pair) stays with the user until they are erased.",
    )
    feedback_retrain_after: int = Field(
        default=0,
        ge=0,
        description="Queue a user's training job after this many new feedback items since their last job "
        "(DPO when they have preference pairs, else supervised; within the user's job quota). 0: never.",
    )
    max_completion_body_bytes: int = Field(
        default=1_000_000,
        gt=0,
        description="Largest accepted request body for `/v1/chat/completions` and `/v1/completions`, "
        "refused (413) before it is parsed; every body is also bounded by `STEER_MAX_UPLOAD_BYTES`.",
    )

    # --- inference ---------------------------------------------------------------------------
    max_batch_size: int = Field(default=32, gt=0, description="Most generation requests batched into one forward pass.")
    max_queue: int = Field(
        default=256,
        gt=0,
        description="Most generation requests waiting for a batch; beyond it requests get 429 with Retry-After.",
    )
    request_timeout_s: float = Field(default=120, gt=0, description="Seconds a generation request may wait and run.")
    instant_wait_s: float = Field(
        default=15,
        ge=0,
        le=120,
        description="A request for `user:<id>` made before the user's first version exists, while a job "
        "trains them, waits up to this many seconds for the job's instant version instead of answering 400 "
        "`model_not_ready` at once (0: at once; no wait when STEER_TRAIN_INSTANT_VERSION is off).",
    )
    greedy_no_repeat_ngram: int = Field(
        default=4,
        ge=0,
        le=16,
        description="Greedy (temperature 0) requests on a user's prefix never write an n-gram of this many "
        "tokens twice (a loop guard; the base model's greedy answers are untouched) unless the request sets "
        "`no_repeat_ngram` itself. 0: off. 4: on the speeches' request bank (docs/EVALUATION.md, issue 24) "
        "it took the new recipe's degenerate greedy answers from 13.1% to 0% and relevance from 0.971x to "
        "1.021x the base model's.",
    )
    style_strength_default: float = Field(
        default=1.0,
        ge=0.0,
        le=2.0,
        description="How strongly a user's prefix applies when a request names no `style_strength`: "
        "logits = base + s * (personalised - base), the base model's row beside it in the batch "
        "(1 = the personalised model alone, 0 = the base model).",
    )
    infer_claim_idle_s: float = Field(
        default=30,
        gt=0,
        description="Distributed mode: seconds an inference request may sit unacknowledged with a "
        "silent worker before another worker reclaims it.",
    )
    infer_worker_timeout_s: float = Field(
        default=5,
        gt=0,
        description="Distributed mode: an inference worker announces itself to Redis every fifth of this; "
        "one silent this long is taken to be gone. With none left completions answer 503 "
        "`inference_unavailable` at once, and a request left with a gone worker ends with a clean error. "
        "Training workers send the same heartbeat (for `/v1/admin/workers` and `/readyz`).",
    )
    prefix_cache_bytes: int = Field(
        default=256 * MiB,
        ge=0,
        description=(
            "Memory budget of the in-process LRU cache of loaded user prefixes, in bytes (held as "
            "stored, fp16: a 16-token SmolLM2 prefix is 360 KiB, so 256 MiB holds ~720 and 10,000 "
            "need ~3.5 GiB)."
        ),
    )

    # --- training ----------------------------------------------------------------------------
    train_time_limit_s: float = Field(
        default=3600, gt=0, description="Wall-clock limit of one training job, in seconds."
    )
    job_lease_s: float = Field(
        default=60,
        gt=0,
        description="Distributed mode: a running job whose worker has not renewed its lease for this "
        "many seconds is taken to be lost (its host died) and is run again by another worker.",
    )
    job_redispatch_after_s: float = Field(
        default=900,
        gt=0,
        description="Distributed mode: a job still queued this many seconds after it was handed to the "
        "broker is handed over again (its message may have been lost with a broker restart); a "
        "duplicate is harmless.",
    )
    job_sweep_interval_s: float = Field(
        default=30,
        gt=0,
        description="Distributed mode: how often each API process looks for lost jobs to dispatch again.",
    )
    train_max_steps_default: int | None = Field(
        default=50,
        gt=0,
        description="Optimizer steps of a training job unless it asks otherwise (early stopping may end it "
        "sooner). 50: the fewest steps that kept 98% of the validation-loss gain of the engine's 100 (99%) on "
        "the quality-vs-steps curve (docs/BENCHMARKS.md, time to value), in 59% of the time.",
    )
    train_prefix_len_default: int | None = Field(
        default=None,
        gt=0,
        description="Virtual prefix tokens per layer unless a job asks otherwise. Unset: the engine's default.",
    )
    train_prefix_len_candidates: tuple[int, ...] = Field(
        default=(),
        description="JSON list, e.g. `[8,16,32]`: when a job leaves `prefix_len` on auto, train one prefix per "
        "length in the same batched passes and keep the best on the user's validation split (costs one "
        "row group per candidate; worth it on a GPU). Empty: no search.",
    )
    train_learning_rate_default: float | None = Field(
        default=None,
        gt=0,
        description="Learning rate of a training job unless it asks otherwise. Unset: the engine's default.",
    )
    train_batch_size_default: int | None = Field(
        default=None,
        gt=0,
        description=(
            "Training batch size (rows per user per step) unless a job asks otherwise. Unset: the engine's default."
        ),
    )
    train_max_seq_len: int | None = Field(
        default=None,
        gt=0,
        description="Longest training sequence in tokens; longer text is chunked. Unset: the engine's default.",
    )
    train_preservation_weight_default: float | None = Field(
        default=None,
        ge=0,
        description="Weight of the KL-to-base term on base-model samples that keeps a prefix from changing "
        "the model on unrelated text, unless a job asks otherwise (0: off). Unset: the engine's default.",
    )
    train_chat_requests: Literal["generic", "derived"] = Field(
        default="derived",
        description='The request each chat training row pairs a sample with: `generic` (one of four "write '
        'in my voice" requests) or `derived` (a request the sample answers, from its own topic words: '
        "core/engine/data.py), so the prefix learns how the user answers a request, not to ignore it. `derived`, "
        "with `requests` anchors (STEER_TRAIN_PRESERVATION_PROMPTS): degenerate greedy answers 28.7% -> "
        "13.1% and relevance 0.786x -> 0.971x the base model's greedy (docs/EVALUATION.md, issue 24).",
    )
    train_preservation_prompts: Literal["none", "requests"] = Field(
        default="requests",
        description="What the preservation anchors are: `none` (text the base model samples from nothing) or "
        "`requests` (the base model's own answers to everyday requests: the KL term then keeps its instruction "
        "following too). `requests`, with `derived` chat requests: the measured better recipe "
        "(docs/EVALUATION.md, issue 24; see STEER_TRAIN_CHAT_REQUESTS).",
    )
    train_method_default: str = Field(
        default=PREFIX,
        description="What a job trains per user unless it asks otherwise (hyperparameter `method`): `prefix` "
        "(prefix tuning), `lora` (a LoRA per user), `pt-peft` (a prefix, then a LoRA with that prefix) or "
        "`auto` (all three on the job's budget; per user, the lowest validation loss). Controls always "
        "train prefixes.",
    )
    train_instant_version: bool = Field(
        default=True,
        description="When a user with no version starts training, publish and activate an instant version "
        "first: the model's own KV of the first tokens of the user's writing, no gradient step (seconds), "
        "so `user:<id>` answers while the job trains; the trained version replaces it if no worse.",
    )
    train_lora_rank_default: int = Field(
        default=3,
        ge=1,
        le=64,
        description="Rank of a user's LoRA (methods `lora`, `pt-peft`) unless a job asks otherwise "
        "(hyperparameter `lora_rank`). 3: as many parameters as a 16-token prefix on SmolLM2, and a "
        "`pt-peft` user (both) stays under 0.3% of the base model.",
    )
    train_users_per_pass: int = Field(
        default=8,
        ge=1,
        le=1024,
        description="At most this many users' rows in one forward/backward pass of a multi-user job; "
        "a step runs several passes and adds up their gradients (the same result): training memory "
        "stays bounded however many users a job holds.",
    )
    train_compute_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto",
        description="The base model's arithmetic while training. `bfloat16` runs each step on a "
        "bfloat16 copy of the weights (+2 bytes per weight in the training process; the trained "
        "prefixes stay float32 and are served in float32): for the same validation loss, 0.63x the step "
        "time on a CPU with AMX and 0.46x on one with AVX-512-bf16 alone, where the training process's "
        "memory also grows with every job (docs/BENCHMARKS.md); far slower than float32 on a CPU without "
        "bfloat16 instructions. `auto`: bfloat16 on a CPU with AMX or a CUDA GPU that supports it.",
    )
    control_companions: int = Field(
        default=0,
        ge=0,
        le=64,
        description="Users' active prefixes a control prefix trains beside (composed before it, one per row "
        "in turn). 0: controls train alone, which kept users' own text closer in docs/EVALUATION.md.",
    )
    population_prefix: bool = Field(
        default=True,
        description="Once the deployment's population prefix is trained (the control named `population`, from "
        "a sample of every user's text: automatically, STEER_POPULATION_AUTO_USERS, or POST "
        "/v1/admin/population), each user's prefix trains "
        "on top of it and serves composed with the population version it was trained on, so the user's "
        "capacity goes to what is theirs (docs/EVALUATION.md, issue 11). Off: new jobs train alone (versions "
        "already trained on a population keep serving with it).",
    )
    population_auto_users: int = Field(
        default=10,
        ge=0,
        description="With the population prefix on: once this many users have samples and there is no "
        "population yet, or twice as many as the active population was drawn from, an onboarding also "
        "queues the population's training (as POST /v1/admin/population with its defaults), ahead of the "
        "user's job. 0: only the admin trains it. Not after a failed population job (the admin retries).",
    )
    # --- per-user quotas (user keys; the admin key is the operator's own and is not limited) ----
    user_max_active_jobs: int = Field(
        default=2,
        ge=1,
        description="Training jobs a user key may have queued or running at once; beyond it 429.",
    )
    user_max_steps_per_job: int = Field(
        default=2000, ge=1, description="Most optimizer steps a job created with a user key may ask for."
    )
    user_requests_per_minute: int = Field(
        default=600, ge=0, description="Completion requests per minute per user key (0: unlimited); beyond it 429."
    )
    user_tokens_per_minute: int = Field(
        default=200_000,
        ge=0,
        description="Prompt plus requested completion tokens per minute per user key (0: unlimited); beyond it 429.",
    )
    worker_metrics_port: int | None = Field(
        default=None,
        gt=0,
        lt=65536,
        description="Distributed mode: the TCP port on which a training worker serves its training step "
        "metrics (Prometheus); `steer worker train --metrics-port` sets it. Unset: not served.",
    )

    log_format: Literal["text", "json"] = Field(
        default="text",
        description="Log lines of every process: `text` (UTC timestamp, level, logger, request id, message) "
        "or `json` (one object a line with the same fields, for log shippers).",
    )

    @field_validator("train_method_default")
    @classmethod
    def _served_method(cls, value: str) -> str:
        if value not in SERVED_METHODS:
            raise ValueError(f"one of {', '.join(SERVED_METHODS)}, not {value!r}")
        return value

    @field_validator("data_dir", mode="after")
    @classmethod
    def _expand_data_dir(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("database_url", "redis_url", "s3_endpoint", "s3_region", mode="before")
    @classmethod
    def _empty_means_unset(cls, value: Any) -> Any:
        # `STEER_REDIS_URL=` in an env file should mean "not set", not "empty URL".
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @property
    def mode(self) -> Literal["embedded", "distributed"]:
        """Embedded without Redis (single process); distributed with Redis + Celery workers."""
        return "embedded" if self.redis_url is None else "distributed"

    @property
    def effective_database_url(self) -> str:
        """The database URL actually used: the configured one, else SQLite in the data dir."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'steer.db'}"

    @property
    def effective_blob_store(self) -> Literal["local", "s3"]:
        """`blob_store` with `auto` resolved."""
        if self.blob_store == "auto":
            return "s3" if self.s3_endpoint else "local"
        return self.blob_store

    @property
    def local_blob_dir(self) -> Path:
        """Root of the local blob store."""
        return self.data_dir / "blobs"

    @property
    def model_cache_dir(self) -> Path:
        """Where downloaded or converted base model files are cached."""
        return self.data_dir / "models"


def env_var_name(field_name: str) -> str:
    """The environment variable that sets a `Settings` field."""
    return f"{ENV_PREFIX}{field_name.upper()}"


def load_settings(**overrides: Any) -> Settings:
    """Build fresh settings from the environment and the env file named by `STEER_ENV_FILE`.

    Uncached; tests and tools that change the environment use this, the service uses
    `get_settings()`.
    """
    env_file = os.environ.get(ENV_FILE_VARIABLE, DEFAULT_ENV_FILE)
    return Settings(_env_file=env_file or None, **overrides)  # type: ignore[call-arg]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once. Call `get_settings.cache_clear()` to reread."""
    return load_settings()


def _display_default(field_name: str) -> str:
    field = Settings.model_fields[field_name]
    default = field.get_default(call_default_factory=True)
    if default is None:
        return "unset"
    if isinstance(default, bool):
        return "true" if default else "false"
    if isinstance(default, int) and default >= MiB and default % MiB == 0:
        return f"{default} ({default // MiB} MiB)"
    return str(default)


def settings_table_markdown() -> str:
    """A markdown table of every setting: environment variable, default and description."""
    lines = ["| Variable | Default | Description |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        description = (field.description or "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{env_var_name(name)}` | `{_display_default(name)}` | {description} |")
    return "\n".join(lines) + "\n"
