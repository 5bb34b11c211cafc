"""An erased user's prefixes leave the serving caches too, not only the store and the index.

Embedded mode: the API process holds the engine, so erasure drops the user from its `PrefixCache`
at once. Distributed mode: the API appends the user's id to the Redis stream `steer:infer:erased`
(capped), and every inference worker follows it (`ErasureListener`, a thread) and drops the user
from its own cache. A stream, not pub/sub: a worker whose Redis connection blinks resumes from the
last entry it read instead of missing what was sent meanwhile. A worker that starts later has
nothing cached, so it starts at the stream's end.

An erased user's cached prefix could not be served anyway (the index rows are gone, so no request
resolves to it, and a new user with the same external id gets a new internal id): this is about
not keeping a copy of the user's data in a worker's memory until LRU pressure evicts it.
"""

from __future__ import annotations

import logging
import threading

import redis

from core.inference.completer import Completer, InProcessCompleter
from core.inference.prefix_cache import PrefixCache

log = logging.getLogger("steer.inference.erasure")

ERASED_STREAM = "steer:infer:erased"
_MAX_LEN = 10_000  # entries kept (approximately); a worker more than this behind missed nothing it cached
_RETRY_S = 1.0


def announce_erasure(client: redis.Redis, user_id: str) -> None:
    """Tell every inference worker to drop `user_id` from its prefix cache."""
    client.xadd(ERASED_STREAM, {"user_id": user_id}, maxlen=_MAX_LEN, approximate=True)


def forget_erased_user(completer: Completer | None, client: redis.Redis | None, user_id: str) -> None:
    """After an erasure: drop the user from the serving caches of this deployment. Never raises:
    the erasure itself is done; a failed announcement is logged (the workers' copies are
    unreachable and age out of their LRU caches)."""
    if isinstance(completer, InProcessCompleter):
        if completer.engine.prefixes is not None:
            completer.engine.prefixes.invalidate_user(user_id)
        return
    if client is None:
        return
    try:
        announce_erasure(client, user_id)
    except redis.RedisError as exc:
        log.warning("erasure of user %s not announced to the inference workers: %s", user_id, exc)


class ErasureListener:
    """Follows `ERASED_STREAM` and drops each erased user from `cache`; run it on its own thread."""

    def __init__(self, client: redis.Redis, cache: PrefixCache, *, block_ms: int = 1000):
        self.client = client
        self.cache = cache
        self.block_ms = block_ms
        self.ready = threading.Event()  # set once the listener knows where the stream ends
        self._stop = threading.Event()

    def start(self) -> threading.Thread:
        self._thread = threading.Thread(target=self.run, name="steer-erasure-listener", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ask the loop to end and wait for it: a blocking read returns within its block time."""
        self._stop.set()
        thread = getattr(self, "_thread", None)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)
            if thread.is_alive():
                log.warning("%s did not stop within %.0f s", thread.name, timeout_s)

    def run(self) -> None:
        cursor: bytes | str | None = None
        while not self._stop.is_set():
            try:
                if cursor is None:
                    last = self.client.xrevrange(ERASED_STREAM, count=1)
                    cursor = last[0][0] if last else "0-0"
                    self.ready.set()
                reply = self.client.xread({ERASED_STREAM: cursor}, count=100, block=self.block_ms)
                for _, entries in reply or []:
                    for entry_id, fields in entries:
                        cursor = entry_id
                        user_id = fields.get(b"user_id", b"").decode()
                        if user_id and self.cache.invalidate_user(user_id):
                            log.info("dropped the cached prefixes of erased user %s", user_id)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("erasure stream unavailable (%s); retrying", exc)
                self._stop.wait(_RETRY_S)
