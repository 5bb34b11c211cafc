"""Inference workers' heartbeats: which workers are alive, by the Redis server's clock.

    steer:infer:workers   sorted set: each live worker's name, scored with the Redis server time
                          of its last heartbeat

Kept apart from the transport so a worker process can announce itself before it imports torch and
loads its model: the API queues requests for a worker that is starting instead of refusing them.
"""

from __future__ import annotations

import logging
import threading

import redis

log = logging.getLogger("steer.inference.heartbeat")

WORKERS_KEY = "steer:infer:workers"
_FORGET_AFTER_TIMEOUTS = 100  # heartbeats this many timeouts old are dropped from the set

# A heartbeat scored with the Redis server's clock, so the hosts' clocks do not have to agree.
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
return 1
"""


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def live_workers(server_time: tuple[int, int], heartbeats: list, timeout_s: float) -> set[str]:
    """Names of the workers whose last heartbeat (`ZRANGE WORKERS_KEY 0 -1 WITHSCORES`) is at most
    `timeout_s` old by the Redis server's clock (`TIME`)."""
    now = server_time[0] + server_time[1] / 1e6
    return {text(name) for name, score in heartbeats if now - score <= timeout_s}


class WorkerHeartbeat:
    """A worker process announcing itself in `WORKERS_KEY` every fifth of `timeout_s`, on its own
    thread: from its start (while it loads its model, requests wait for it rather than being
    refused) until `stop()`, which leaves the set at once (a killed process just times out). A long
    prefix load or Redis call in the serving loop does not make a busy worker look gone."""

    def __init__(self, client: redis.Redis, name: str, timeout_s: float):
        self.client = client
        self.name = name
        self.timeout_s = timeout_s
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
            self.client.zrem(WORKERS_KEY, self.name)
        except redis.RedisError:
            pass

    def _run(self) -> None:
        while not self._stop.wait(self.timeout_s / 5):
            self._beat()

    def _beat(self) -> None:
        try:
            self._script(keys=[WORKERS_KEY], args=[self.name, self.timeout_s * _FORGET_AFTER_TIMEOUTS])
        except redis.RedisError as exc:  # Redis restarting: the serving loop reports it
            log.debug("heartbeat not sent: %s", exc)
