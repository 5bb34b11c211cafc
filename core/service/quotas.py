"""Per-user quotas: what one user key may ask of the service, so one tenant cannot crowd out the
others. The admin key (the operator's own backend) is not limited.

- training: at most `user_max_active_jobs` queued or running jobs, and `user_max_steps_per_job`
  steps per job (`check_job_quota`, when a user key creates a job); the training executor also
  takes jobs fairly across users (core/service/executor.py);
- completions: requests and tokens (prompt + requested completion tokens) per minute
  (`RateLimiter`), counted in fixed one-minute windows: in this process (embedded mode) or in
  Redis, shared by every API process (distributed mode).

Refusals raise `RateLimited` (HTTP 429 with `Retry-After` and OpenAI's `x-ratelimit-*` headers).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError
from sqlalchemy.orm import Session

from core.config import Settings
from core.service.errors import InvalidInput, ServiceError
from core.service.hyperparameters import validate_hyperparameters
from core.service.jobs import members_of_jobs_in_flight
from core.tuners.registry import AUTO, STORED_METHODS

log = logging.getLogger(__name__)
WINDOW_S = 60
ACTIVE_JOB_RETRY_S = 30


class RateLimited(ServiceError):
    """A quota is used up; retry after `retry_after_s` seconds. `headers` go with the answer."""

    code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after_s: int, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.headers = headers or {}


def check_job_quota(session: Session, settings: Settings, user_id: str, hyperparameters: object) -> None:
    """Refuse a user key's new job over its step cap (400) or beyond its active-job quota (429)."""
    values = validate_hyperparameters(hyperparameters)
    steps = values["max_steps"]
    runs = len(STORED_METHODS) if values.get("method") == AUTO else 1  # auto trains every method on max_steps
    if isinstance(steps, int) and steps * runs > settings.user_max_steps_per_job:
        cap = settings.user_max_steps_per_job
        raise InvalidInput(
            f"max_steps may be at most {cap} for a user key"
            + (f" ({cap // runs} with method auto, which trains {runs} methods)" if runs > 1 else ""),
            param="hyperparameters.max_steps",
        )
    active = sum(1 for user_ids in members_of_jobs_in_flight(session, user_id) if user_ids == [user_id])
    if active >= settings.user_max_active_jobs:
        raise RateLimited(
            f"this user already has {active} training jobs queued or running (the limit is "
            f"{settings.user_max_active_jobs}); wait for one to finish or cancel one",
            retry_after_s=ACTIVE_JOB_RETRY_S,
        )


@dataclass(frozen=True)
class Usage:
    """One window's counts after a request was admitted."""

    requests: int
    tokens: int
    reset_s: float


class RateLimiter:
    """Requests and tokens per minute per key, in fixed one-minute windows."""

    def __init__(self, requests_per_minute: int, tokens_per_minute: int, redis_client: Any = None):
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self._redis = redis_client
        self._lock = threading.Lock()
        self._windows: dict[str, tuple[int, int, int]] = {}  # key -> (window, requests, tokens)

    @classmethod
    def from_settings(cls, settings: Settings, redis_client: Any = None) -> RateLimiter:
        """Counting in `redis_client` (shared by every API process of a deployment), else in memory."""
        return cls(settings.user_requests_per_minute, settings.user_tokens_per_minute, redis_client)

    def admit(self, key: str, tokens: int) -> dict[str, str]:
        """Count one request of `tokens` for `key`; the `x-ratelimit-*` headers to answer with.
        Raises `RateLimited` (nothing counted) when either quota would be exceeded."""
        window = int(time.time() // WINDOW_S)
        reset_s = (window + 1) * WINDOW_S - time.time()
        usage = self._add(key, window, tokens)
        over_requests = self.requests_per_minute and usage.requests > self.requests_per_minute
        over_tokens = self.tokens_per_minute and usage.tokens > self.tokens_per_minute
        if over_requests or over_tokens:
            self._add(key, window, -tokens, requests=-1)  # a refused request uses no quota
            usage = Usage(usage.requests - 1, usage.tokens - tokens, reset_s)
            what = "requests" if over_requests else "tokens"
            limit = self.requests_per_minute if over_requests else self.tokens_per_minute
            raise RateLimited(
                f"rate limit of {limit} {what} per minute reached for this key; retry in {math.ceil(reset_s)} s",
                retry_after_s=max(1, math.ceil(reset_s)),
                headers=self._headers(usage, reset_s),
            )
        return self._headers(usage, reset_s)

    def _add(self, key: str, window: int, tokens: int, requests: int = 1) -> Usage:
        if self._redis is not None:
            name = f"steer:ratelimit:{window}:{key}"
            pipe = self._redis.pipeline()
            pipe.hincrby(name, "requests", requests)
            pipe.hincrby(name, "tokens", tokens)
            pipe.expire(name, WINDOW_S * 2)
            try:
                counted_requests, counted_tokens, _ = pipe.execute()
            except RedisError as exc:
                # Quotas are a fairness measure, not a gate: with Redis down, requests go on
                # (and meet the inference queue's own answer to the outage), uncounted.
                log.warning("rate limits not counted, Redis unavailable: %s", exc)
                return Usage(0, 0, 0)
            return Usage(int(counted_requests), int(counted_tokens), 0)
        with self._lock:
            seen, counted_requests, counted_tokens = self._windows.get(key, (window, 0, 0))
            if seen != window:
                counted_requests, counted_tokens = 0, 0
            counted = (window, counted_requests + requests, counted_tokens + tokens)
            self._windows[key] = counted
            if len(self._windows) > 100_000:  # forget keys of past windows
                self._windows = {k: v for k, v in self._windows.items() if v[0] == window}
            return Usage(counted[1], counted[2], 0)

    def _headers(self, usage: Usage, reset_s: float) -> dict[str, str]:
        headers = {}
        reset = f"{max(0, math.ceil(reset_s))}s"
        for name, limit, used in (
            ("requests", self.requests_per_minute, usage.requests),
            ("tokens", self.tokens_per_minute, usage.tokens),
        ):
            if limit:
                headers[f"x-ratelimit-limit-{name}"] = str(limit)
                headers[f"x-ratelimit-remaining-{name}"] = str(max(0, limit - used))
                headers[f"x-ratelimit-reset-{name}"] = reset
        return headers
