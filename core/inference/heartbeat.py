"""Workers' heartbeats: which workers are alive, by the Redis server's clock, and what they do.

    steer:infer:workers       sorted set: each live inference worker's name, scored with the Redis
                              server time of its last heartbeat (completions are refused without one)
    steer:workers             sorted set: every worker (training and inference), scored the same way
    steer:workers:info        hash: name -> JSON {id, kind, host, pid, started_at, current}
    steer:workers:metrics:<name>  string with a TTL: the worker's Prometheus exposition text, which
                              the API's `/metrics` appends with a `worker` label

Kept apart from the transport so a worker process can announce itself before it imports torch and
loads its model: the API queues requests for a worker that is starting instead of refusing them.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import redis

log = logging.getLogger("steer.inference.heartbeat")

WORKERS_KEY = "steer:infer:workers"
ALL_WORKERS_KEY = "steer:workers"
INFO_KEY = "steer:workers:info"
METRICS_KEY_PREFIX = "steer:workers:metrics:"
_FORGET_AFTER_TIMEOUTS = 100  # heartbeats this many timeouts old are dropped from the sets

WorkerKind = Literal["inference", "training"]

# A heartbeat scored with the Redis server's clock, so the hosts' clocks do not have to agree.
# KEYS: kind set, all-workers set, info hash. ARGV: name, forget-after seconds, info JSON.
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local old = now - tonumber(ARGV[2])
if KEYS[1] ~= KEYS[2] then
  redis.call('ZADD', KEYS[1], now, ARGV[1])
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', old)
end
redis.call('ZADD', KEYS[2], now, ARGV[1])
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', old)) do
  redis.call('HDEL', KEYS[3], gone)
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', old)
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
return 1
"""


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def live_workers(server_time: tuple[int, int], heartbeats: list, timeout_s: float) -> set[str]:
    """Names of the workers whose last heartbeat (`ZRANGE WORKERS_KEY 0 -1 WITHSCORES`) is at most
    `timeout_s` old by the Redis server's clock (`TIME`)."""
    now = server_time[0] + server_time[1] / 1e6
    return {text(name) for name, score in heartbeats if now - score <= timeout_s}


@dataclass(frozen=True)
class WorkerStatus:
    """One live worker as `GET /v1/admin/workers` shows it. `started_at` is the worker host's clock,
    `last_seen` the Redis server's (both Unix seconds); `current`: the job or batch it works on."""

    id: str
    kind: str
    host: str
    pid: int
    started_at: int
    last_seen: int
    current: str | None


def list_workers(client: redis.Redis, timeout_s: float, kind: str | None = None) -> list[WorkerStatus]:
    """The workers (of `kind`, or all) with a heartbeat at most `timeout_s` old, oldest first."""
    pipe = client.pipeline(transaction=False)
    pipe.time()
    pipe.zrange(ALL_WORKERS_KEY, 0, -1, withscores=True)
    pipe.hgetall(INFO_KEY)
    server_time, heartbeats, infos = pipe.execute()
    now = server_time[0] + server_time[1] / 1e6
    infos = {text(name): json.loads(text(value)) for name, value in infos.items()}
    workers = []
    for name, score in heartbeats:
        name = text(name)
        info = infos.get(name)
        if info is None or now - score > timeout_s or (kind is not None and info.get("kind") != kind):
            continue
        workers.append(
            WorkerStatus(
                id=name,
                kind=info.get("kind", "inference"),
                host=info.get("host", ""),
                pid=int(info.get("pid", 0)),
                started_at=int(info.get("started_at", 0)),
                last_seen=int(score),
                current=info.get("current"),
            )
        )
    return sorted(workers, key=lambda w: (w.started_at, w.id))


def worker_metrics(client: redis.Redis, names: list[str]) -> dict[str, str]:
    """The Prometheus exposition text each of `names` last published (those with none are left out)."""
    if not names:
        return {}
    values = client.mget([METRICS_KEY_PREFIX + name for name in names])
    return {name: text(value) for name, value in zip(names, values, strict=True) if value}


def worker_name() -> str:
    """`<host>-<pid>`: unique among the live workers, and what the inference consumer is called."""
    return f"{socket.gethostname()}-{os.getpid()}"


class WorkerHeartbeat:
    """A worker process announcing itself every fifth of `timeout_s`, on its own thread: from its
    start (while it loads its model, requests wait for it rather than being refused) until `stop()`,
    which leaves the sets at once (a killed process just times out). A long prefix load or Redis
    call in the serving loop does not make a busy worker look gone.

    `current()` says what the worker works on now (a job id, a batch); `metrics()` returns its
    Prometheus exposition text, published beside the heartbeat for the API's `/metrics`."""

    def __init__(
        self,
        client: redis.Redis,
        name: str,
        timeout_s: float,
        *,
        kind: WorkerKind = "inference",
        current: Callable[[], str | None] | None = None,
        metrics: Callable[[], bytes | str] | None = None,
    ):
        self.client = client
        self.name = name
        self.timeout_s = timeout_s
        self.kind = kind
        self._kind_key = WORKERS_KEY if kind == "inference" else ALL_WORKERS_KEY
        self._current = current or (lambda: None)
        self._metrics = metrics
        self._started_at = int(time.time())
        self._script = client.register_script(_HEARTBEAT)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> WorkerHeartbeat:
        if self._thread is None:
            self._beat()
            self._thread = threading.Thread(target=self._run, name="steer-worker-heartbeat", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.zrem(WORKERS_KEY, self.name)
            pipe.zrem(ALL_WORKERS_KEY, self.name)
            pipe.hdel(INFO_KEY, self.name)
            pipe.delete(METRICS_KEY_PREFIX + self.name)
            pipe.execute()
        except redis.RedisError:
            pass

    def _run(self) -> None:
        while not self._stop.wait(self.timeout_s / 5):
            self._beat()

    def _info(self) -> str:
        info = {
            "id": self.name,
            "kind": self.kind,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": self._started_at,
            "current": self._current(),
        }
        return json.dumps(info)

    def _beat(self) -> None:
        try:
            keys = [self._kind_key, ALL_WORKERS_KEY, INFO_KEY]
            self._script(keys=keys, args=[self.name, self.timeout_s * _FORGET_AFTER_TIMEOUTS, self._info()])
            if self._metrics is not None:
                # Kept a few heartbeats: a dead worker's last figures leave `/metrics` soon after it.
                ttl_ms = max(1000, int(self.timeout_s * 3000))
                self.client.set(METRICS_KEY_PREFIX + self.name, self._metrics(), px=ttl_ms)
        except redis.RedisError as exc:  # Redis restarting: the serving loop reports it
            log.debug("heartbeat not sent: %s", exc)
        except Exception:  # a failing `current`/`metrics` must not end the heartbeat thread
            log.exception("heartbeat not sent")
