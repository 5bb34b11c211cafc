"""What the API knows of the workers (distributed mode): their heartbeats and published metrics.

The workers announce themselves in Redis (`core/inference/heartbeat.py`); this module reads that
for `GET /v1/admin/workers`, `/readyz` and `/metrics`. One synchronous Redis client per app, made
on first use; callers run it off the event loop. Embedded mode has no worker processes: the
training executor and the inference engine run inside the API process.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import redis
from prometheus_client import CollectorRegistry, generate_latest

from core.config import Settings
from core.inference.heartbeat import WorkerStatus, list_workers, worker_metrics

log = logging.getLogger(__name__)

_lock = threading.Lock()


def _client(state, settings: Settings) -> redis.Redis:
    with _lock:
        client = getattr(state, "workers_redis", None)
        if client is None:
            client = redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
            state.workers_redis = client
        return client


def live_workers(state, settings: Settings, kind: str | None = None) -> list[WorkerStatus]:
    """The live workers (none in embedded mode). Redis errors propagate."""
    if settings.redis_url is None:
        return []
    return list_workers(_client(state, settings), settings.infer_worker_timeout_s, kind)


def metrics_exposition(state, settings: Settings, own: CollectorRegistry) -> bytes:
    """The API's own metrics, then every live worker's, each sample labelled `worker="<id>"`; one
    HELP/TYPE per family even when several processes report it. Without Redis: the API's alone."""
    families: dict[str, _Family] = {}
    _merge(families, generate_latest(own).decode(), worker=None)
    if settings.redis_url is not None:
        try:
            client = _client(state, settings)
            names = [w.id for w in list_workers(client, settings.infer_worker_timeout_s)]
            for name, exposition in sorted(worker_metrics(client, names).items()):
                _merge(families, exposition, worker=name)
        except redis.RedisError as exc:  # Redis down: the API's own metrics still count
            log.warning("workers' metrics left out: Redis unavailable (%s)", exc)
    lines = []
    for family in families.values():
        lines += [*family.header, *family.samples]
    return ("\n".join(lines) + "\n").encode()


@dataclass
class _Family:
    header: list[str] = field(default_factory=list)  # its `# HELP` and `# TYPE` lines
    samples: list[str] = field(default_factory=list)


def _merge(families: dict[str, _Family], exposition: str, worker: str | None) -> None:
    """Add the families of one process's exposition (Prometheus text format, as `generate_latest`
    writes it: `# HELP`, `# TYPE`, then the family's samples) to `families`, by family name."""
    family = _Family()
    for line in exposition.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            name = line.split(" ", 3)[2]
            family = families.setdefault(name, _Family())
            if len(family.header) < 2 and line not in family.header:
                family.header.append(line)
        elif line and not line.startswith("#"):
            family.samples.append(line if worker is None else _with_label(line, "worker", worker))


def _with_label(sample: str, label: str, value: str) -> str:
    """`name{a="b"} 1` -> `name{label="value",a="b"} 1`; `name 1` -> `name{label="value"} 1`."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    name_end = min(i for i in (sample.find("{"), sample.find(" ")) if i >= 0)
    if sample[name_end] == "{":
        rest = sample[name_end + 1 :]
        return f'{sample[:name_end]}{{{label}="{escaped}"{"," if not rest.startswith("}") else ""}{rest}'
    return f'{sample[:name_end]}{{{label}="{escaped}"}}{sample[name_end:]}'
