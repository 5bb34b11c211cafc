"""What travels between the API and the engine: a job going in, events coming out.

Plain dataclasses with dict round-trips, so the in-process path and the Redis path carry exactly
the same values.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field, replace

from core.engine.sampling import SamplingParams
from core.inference.prefix_cache import PrefixRef


@dataclass
class InferenceJob:
    """One API request: `n` rows sampled from one prompt under `prefixes` composed in order (a
    user's, then controls'; none = the base model).

    Row i uses seed `params.seed + i` (when a seed is given), so `n` choices differ but each is
    reproducible. `deadline` is a Unix time: after it the engine drops the job and the API answers
    with an error, wherever the job is.
    """

    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    n: int = 1
    prefixes: tuple[PrefixRef, ...] = ()
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    deadline: float = field(default_factory=lambda: time.time() + 120)

    def row_params(self, index: int) -> SamplingParams:
        p = self.params
        return replace(p, stop=list(p.stop), seed=None if p.seed is None else p.seed + index)

    def to_dict(self) -> dict:
        return {
            "prompt_ids": self.prompt_ids,
            "params": asdict(self.params),
            "n": self.n,
            "prefixes": [ref.to_dict() for ref in self.prefixes],
            "request_id": self.request_id,
            "deadline": self.deadline,
        }

    @classmethod
    def from_dict(cls, data: dict) -> InferenceJob:
        return cls(
            prompt_ids=[int(t) for t in data["prompt_ids"]],
            params=SamplingParams(**data["params"]),
            n=int(data["n"]),
            prefixes=tuple(PrefixRef.from_dict(ref) for ref in data.get("prefixes", ())),
            request_id=str(data["request_id"]),
            deadline=float(data["deadline"]),
        )


@dataclass
class TextDelta:
    """New text of choice `index` (never part of a stop string)."""

    index: int
    text: str


@dataclass
class RowFinished:
    """Choice `index` is complete."""

    index: int
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class JobFailed:
    """The whole job ended without a result. `kind`: "timeout", "error", "corrupt_prefix"
    (a prefix failed its checksum before anything was generated; `prefix` says which) or
    "unavailable" (withdrawn before any engine took it: none is running)."""

    kind: str
    message: str
    prefix: dict | None = None


Event = TextDelta | RowFinished | JobFailed
_EVENT_TYPES = {"delta": TextDelta, "finished": RowFinished, "failed": JobFailed}
_EVENT_NAMES = {v: k for k, v in _EVENT_TYPES.items()}


def event_to_dict(event: Event) -> dict:
    return {"type": _EVENT_NAMES[type(event)], **asdict(event)}


def event_from_dict(data: dict) -> Event:
    data = dict(data)
    return _EVENT_TYPES[data.pop("type")](**data)
