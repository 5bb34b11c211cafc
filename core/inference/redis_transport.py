"""Distributed mode: API → inference workers through Redis Streams, tokens back the same way.

    steer:infer:requests        one entry per job, consumed by the group `workers` (each job goes
                                to one worker; several workers share the stream)
    steer:infer:reply:<id>      per-job reply stream: event entries (text deltas, finished rows,
                                failure), expiring shortly after the job's deadline
    steer:infer:cancel          broadcast of cancelled job ids (client went away); every worker reads it
    steer:infer:workers         sorted set: each live worker's name, scored with the Redis server time
                                of its last heartbeat (a thread per worker, every fifth of the timeout)

A worker pulls only as many jobs as its batch has room for, so the backlog waits in Redis where any
worker can take it, and the API can refuse new work (429) when that backlog is `max_queue` deep. A
worker keeps its in-flight entries fresh (XCLAIM to itself); entries of a worker that died go idle
and another worker reclaims them with XAUTOCLAIM: a job that had not produced output yet is run
again, one that had already streamed output gets a clean failure (its client cannot un-read text).
The API never waits past the job's deadline, whatever happens to workers: with no live worker
(no heartbeat within `worker_timeout_s`) it refuses new jobs at once (`InferenceUnavailable`), and
a waiting request checks every second that someone will still answer it, ending with a clean
failure when its worker is gone and nobody reclaimed the entry within the claim window. Workers
delete the group's consumers that are gone (no heartbeat), idle and hold no entries.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import time
import uuid

import redis
import redis.asyncio as aioredis

from core.errors import SteerError
from core.inference.completer import Completer, Submission
from core.inference.engine import InferenceEngine
from core.inference.errors import CorruptPrefix, InferenceFailed, InferenceUnavailable, QueueFull
from core.inference.heartbeat import WORKERS_KEY, WorkerHeartbeat, live_workers, text
from core.inference.jobs import Event, InferenceJob, JobFailed, RowFinished, event_from_dict, event_to_dict

log = logging.getLogger("steer.inference.redis")

REQUESTS_STREAM = "steer:infer:requests"
GROUP = "workers"
CANCEL_STREAM = "steer:infer:cancel"
REPLY_TTL_AFTER_DEADLINE_S = 60
WORKER_GRACE_S = 1.5  # with no live worker, how long a new request waits for one before a 503
WATCH_INTERVAL_S = 1.0  # how often a request with no news checks that someone will still answer it
_READ_BLOCK_MS = 100
_REDIS_RETRY_S = 1.0


def reply_stream(request_id: str) -> str:
    return f"steer:infer:reply:{request_id}"


def ensure_group(client: redis.Redis) -> None:
    try:
        client.xgroup_create(REQUESTS_STREAM, GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


# -- API side ---------------------------------------------------------------------------------------


class _RedisSubmission(Submission):
    def __init__(self, job: InferenceJob, completer: RedisCompleter, entry_id: bytes):
        super().__init__(job)
        self._client = completer.client
        self._completer = completer
        self._entry_id = entry_id
        self._stream = reply_stream(job.request_id)
        self._last_id = "0-0"
        self._buffer: list[Event] = []
        self._next_watch = time.monotonic() + WATCH_INTERVAL_S

    async def _next_event(self, timeout: float) -> Event | None:
        end = time.monotonic() + timeout
        while not self._buffer:
            now = time.monotonic()
            if now >= end:
                return None
            if now >= self._next_watch:
                self._next_watch = now + WATCH_INTERVAL_S
                abandoned = await self._abandoned()
                if abandoned is not None:
                    return abandoned
            block_ms = max(1, int((min(end, self._next_watch) - now) * 1000))
            try:
                reply = await self._client.xread({self._stream: self._last_id}, count=256, block=block_ms)
            except redis.RedisError as exc:
                raise InferenceFailed(f"lost the connection to the inference queue: {exc}") from exc
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    self._last_id = entry_id
                    self._buffer.append(event_from_dict(json.loads(fields[b"event"])))
        return self._buffer.pop(0)

    async def _abandoned(self) -> JobFailed | None:
        """A failure (and the request entry withdrawn) if nobody will answer this job any more:
        no live worker while it still waits in the stream, or its worker is gone and nobody
        reclaimed it within the claim window. None while someone may still answer."""
        completer = self._completer
        pipe = self._client.pipeline(transaction=False)
        pipe.time()
        pipe.zrange(WORKERS_KEY, 0, -1, withscores=True)
        pipe.xpending_range(REQUESTS_STREAM, GROUP, min=self._entry_id, max=self._entry_id, count=1)
        pipe.xrange(REQUESTS_STREAM, min=self._entry_id, max=self._entry_id, count=1)
        try:
            server_time, heartbeats, pending, waiting = await pipe.execute()
        except redis.RedisError:
            return None  # the next read reports the lost connection
        live = live_workers(server_time, heartbeats, completer.worker_timeout_s)
        if pending:
            holder, idle_s = text(pending[0]["consumer"]), pending[0]["time_since_delivered"] / 1000
            # Live workers reclaim a silent worker's entries every half claim window, when they have room.
            window = completer.claim_idle_s * (2 if live else 1)
            if holder in live or idle_s < window:
                return None
            failed = JobFailed("error", "the inference worker serving this request stopped and no worker took it over")
        elif waiting and not live:
            failed = JobFailed("unavailable", "no inference worker is running: retry later")
        else:
            return None  # being served, or already answered: the events are on their way
        log.warning("request_id=%s abandoned: %s", self.job.request_id, failed.message)
        await self._withdraw()
        return failed

    async def _withdraw(self) -> None:
        """Take the request entry out of the stream and the group, so no worker starts it later."""
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.xack(REQUESTS_STREAM, GROUP, self._entry_id)
            pipe.xdel(REQUESTS_STREAM, self._entry_id)
            pipe.xadd(CANCEL_STREAM, {"request_id": self.job.request_id}, maxlen=10_000, approximate=True)
            await pipe.execute()
        except redis.RedisError:
            log.warning("could not withdraw request_id=%s: Redis unavailable", self.job.request_id)

    async def cancel(self) -> None:
        try:
            await self._client.xadd(CANCEL_STREAM, {"request_id": self.job.request_id}, maxlen=10_000, approximate=True)
        except redis.RedisError:
            log.warning("could not cancel request_id=%s: Redis unavailable", self.job.request_id)

    async def _finished(self) -> None:
        try:
            await self._client.delete(self._stream)
        except redis.RedisError:
            pass  # the reply stream expires on its own


class RedisCompleter(Completer):
    """Distributed mode: jobs go to whichever inference worker takes them from the stream."""

    def __init__(self, redis_url: str, max_queue: int, *, claim_idle_s: float = 30.0, worker_timeout_s: float = 5.0):
        self.redis_url = redis_url
        self.max_queue = max_queue
        self.claim_idle_s = claim_idle_s
        self.worker_timeout_s = worker_timeout_s
        self._client: aioredis.Redis | None = None

    @property
    def client(self) -> aioredis.Redis:
        assert self._client is not None, "the completer is not started"
        return self._client

    async def start(self) -> None:
        self._client = aioredis.Redis.from_url(self.redis_url)
        sync = redis.Redis.from_url(self.redis_url)
        try:
            ensure_group(sync)
        finally:
            sync.close()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def backlog(self) -> int:
        """Jobs in the stream that no worker has taken yet."""
        for group in await self._client.xinfo_groups(REQUESTS_STREAM):
            if group["name"] in (GROUP, GROUP.encode()):
                lag = group.get("lag")
                return int(lag) if lag is not None else int(await self._client.xlen(REQUESTS_STREAM))
        return 0

    async def live_workers(self) -> set[str]:
        """The workers that sent a heartbeat within `worker_timeout_s` (Redis errors propagate)."""
        if self._client is None:
            await self.start()
        pipe = self._client.pipeline(transaction=False)
        pipe.time()
        pipe.zrange(WORKERS_KEY, 0, -1, withscores=True)
        server_time, heartbeats = await pipe.execute()
        return live_workers(server_time, heartbeats, self.worker_timeout_s)

    async def capacity(self) -> int | None:
        try:
            return len(await self.live_workers())
        except redis.RedisError:
            return None  # readiness reports the broker itself

    async def _wait_for_a_worker(self) -> bool:
        """Whether a worker is live, waiting up to `WORKER_GRACE_S` for one (a worker starting
        now announces itself within a second of its process starting)."""
        give_up = time.monotonic() + WORKER_GRACE_S
        while not await self.live_workers():
            if time.monotonic() >= give_up:
                return False
            await asyncio.sleep(0.2)
        return True

    async def submit(self, job: InferenceJob) -> Submission:
        try:
            if not await self._wait_for_a_worker():
                raise InferenceUnavailable(
                    f"no inference worker is running (none sent a heartbeat in the last "
                    f"{self.worker_timeout_s:g} s): retry later"
                )
            if await self.backlog() + 1 > self.max_queue:
                raise QueueFull()
            entry_id = await self._client.xadd(REQUESTS_STREAM, {"job": json.dumps(job.to_dict())})
        except redis.RedisError as exc:
            raise InferenceUnavailable(f"the inference queue is unavailable, retry later ({exc})") from exc
        return _RedisSubmission(job, self, entry_id)


# -- worker side -------------------------------------------------------------------------------------


class _InFlight:
    def __init__(self, entry_id: bytes, rows: int):
        self.entry_id = entry_id
        self.rows_left = rows


class RedisInferenceWorker:
    """Moves jobs from the request stream into an `InferenceEngine` and events into reply streams."""

    def __init__(
        self,
        client: redis.Redis,
        engine: InferenceEngine,
        *,
        consumer: str | None = None,
        claim_idle_s: float = 30.0,
        worker_timeout_s: float = 5.0,
        heartbeat: WorkerHeartbeat | None = None,
    ):
        """`heartbeat`: one already started for `consumer` (while the model loaded); else `run`
        starts its own. `run` stops it either way."""
        self.client = client
        self.engine = engine
        self.consumer = consumer or f"worker-{uuid.uuid4().hex[:8]}"
        self.claim_idle_ms = int(claim_idle_s * 1000)
        self.worker_timeout_s = worker_timeout_s
        self.heartbeat = heartbeat or WorkerHeartbeat(client, self.consumer, worker_timeout_s)
        self._inflight: dict[str, _InFlight] = {}
        self._lock = threading.Lock()
        self._outbox: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._cancel_cursor = "$"
        self._last_claim = 0.0
        self._last_heartbeat = 0.0

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        """Serve until `stop()`; the engine must already be started."""
        self._wait_for_redis()
        publisher = threading.Thread(target=self._publish_loop, name="steer-reply-publisher", daemon=True)
        publisher.start()
        self.heartbeat.start()
        log.info("inference worker %s consuming %s", self.consumer, REQUESTS_STREAM)
        try:
            while not self._stop.is_set():
                try:
                    self._serve_once()
                except (redis.ConnectionError, redis.TimeoutError) as exc:  # Redis restarting: wait, keep the engine
                    log.warning("redis unavailable (%s); retrying", exc)
                    time.sleep(_REDIS_RETRY_S)
                except redis.ResponseError as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    log.warning("consumer group vanished (Redis restarted empty); recreating it")
                    ensure_group(self.client)
        finally:
            self._stop.set()
            self._outbox.put(None)
            publisher.join(5)
            self.heartbeat.stop()

    def _wait_for_redis(self) -> None:
        """A worker may start before Redis (a host reboot, compose ordering): wait, do not exit."""
        while not self._stop.is_set():
            try:
                ensure_group(self.client)
                self._cancel_cursor = self._latest_cancel_id()
                return
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("redis unavailable at start (%s); retrying", exc)
                time.sleep(_REDIS_RETRY_S)

    def _serve_once(self) -> None:
        self._read_cancels()
        self._heartbeat()
        self._reclaim()
        free = self._free_slots()
        if free <= 0:
            time.sleep(_READ_BLOCK_MS / 1000)
            return
        reply = self.client.xreadgroup(GROUP, self.consumer, {REQUESTS_STREAM: ">"}, count=free, block=_READ_BLOCK_MS)
        entries = [(entry_id, fields) for _, batch in reply or [] for entry_id, fields in batch]
        self._read_ahead(entries)
        for entry_id, fields in entries:
            self._handle(entry_id, fields, reclaimed=False)

    def _read_ahead(self, entries: list[tuple[bytes, dict | None]]) -> None:
        """Load the prefixes of every job just read several at a time, before admitting the jobs one
        by one in their order (a miss in `submit` reads the store while the other jobs wait)."""
        if self.engine.prefixes is None:
            return
        refs = []
        for _, fields in entries:
            try:
                refs.extend(InferenceJob.from_dict(json.loads(fields[b"job"])).prefixes)
            except Exception:  # a malformed entry is answered by `_handle`
                continue
        self.engine.prefixes.prefetch(refs)

    # -- taking jobs --------------------------------------------------------------------------------

    def _free_slots(self) -> int:
        # Room for a full batch plus a little lookahead; the rest of the backlog stays in Redis.
        capacity = self.engine.max_batch_size + max(1, self.engine.max_batch_size // 4)
        return capacity - self.engine.load

    def _handle(self, entry_id: bytes, fields: dict | None, reclaimed: bool) -> None:
        if not fields or b"job" not in fields:
            self._ack(entry_id)
            return
        job = InferenceJob.from_dict(json.loads(fields[b"job"]))
        stream = reply_stream(job.request_id)
        if job.deadline <= time.time():
            self._send_now(stream, JobFailed("timeout", "the request expired before a worker took it"), job)
            self._ack(entry_id)
            return
        if reclaimed and self.client.xlen(stream) > 0:
            self._send_now(stream, JobFailed("error", "the inference worker serving this request stopped"), job)
            self._ack(entry_id)
            return
        with self._lock:
            self._inflight[job.request_id] = _InFlight(entry_id, job.n)
        try:
            self.engine.submit(job, lambda event, job=job: self._outbox.put((job, event)))
        except SteerError as exc:
            with self._lock:
                self._inflight.pop(job.request_id, None)
            if isinstance(exc, CorruptPrefix):
                failed = JobFailed("corrupt_prefix", str(exc), None if exc.ref is None else exc.ref.to_dict())
            else:
                failed = JobFailed("error", str(exc))
            self._send_now(stream, failed, job)
            self._ack(entry_id)
        except Exception as exc:  # e.g. the object store is down: fail this job, keep serving
            log.exception("request_id=%s could not start", job.request_id)
            with self._lock:
                self._inflight.pop(job.request_id, None)
            self._send_now(stream, JobFailed("error", f"the request could not start: {exc}"), job)
            self._ack(entry_id)

    def _reclaim(self) -> None:
        """Take over entries that a dead worker left pending for longer than the idle timeout, then
        forget the consumers of workers that are gone."""
        now = time.monotonic()
        if now - self._last_claim < self.claim_idle_ms / 2000:
            return
        self._last_claim = now
        free = self._free_slots()
        if free > 0:
            self._take_over(free)
        self._forget_gone_consumers()

    def _take_over(self, free: int) -> None:
        _, entries, *_ = self.client.xautoclaim(
            REQUESTS_STREAM, GROUP, self.consumer, min_idle_time=self.claim_idle_ms, start_id="0-0", count=free
        )
        for entry_id, fields in entries:
            with self._lock:
                mine = any(f.entry_id == entry_id for f in self._inflight.values())
            if not mine:
                log.warning("reclaimed entry %s from a silent worker", entry_id)
                self._handle(entry_id, fields, reclaimed=True)

    def _forget_gone_consumers(self) -> None:
        """Delete the group's consumers with no heartbeat, no pending entry and idle for a claim
        window: a worker that died or stopped (a restarted worker has a new name, host-pid). One with
        pending entries stays until they are reclaimed: deleting it would drop them."""
        pipe = self.client.pipeline(transaction=False)
        pipe.time()
        pipe.zrange(WORKERS_KEY, 0, -1, withscores=True)
        pipe.xinfo_consumers(REQUESTS_STREAM, GROUP)
        server_time, heartbeats, consumers = pipe.execute()
        live = live_workers(server_time, heartbeats, self.worker_timeout_s) | {self.consumer}
        for consumer in consumers:
            name = text(consumer["name"])
            if name in live or consumer["pending"] or consumer["idle"] < self.claim_idle_ms:
                continue
            self.client.xgroup_delconsumer(REQUESTS_STREAM, GROUP, name)
            log.info("removed the consumer %s of a gone worker (idle %.0f s)", name, consumer["idle"] / 1000)

    def _heartbeat(self) -> None:
        """Reset the idle time of our in-flight entries so no other worker reclaims them."""
        now = time.monotonic()
        if now - self._last_heartbeat < self.claim_idle_ms / 3000:
            return
        self._last_heartbeat = now
        with self._lock:
            ids = [f.entry_id for f in self._inflight.values()]
        if ids:
            self.client.xclaim(REQUESTS_STREAM, GROUP, self.consumer, min_idle_time=0, message_ids=ids, justid=True)

    def _latest_cancel_id(self) -> str:
        last = self.client.xrevrange(CANCEL_STREAM, count=1)
        return last[0][0] if last else "0-0"

    def _read_cancels(self) -> None:
        reply = self.client.xread({CANCEL_STREAM: self._cancel_cursor}, count=1000)
        for _, entries in reply or []:
            for entry_id, fields in entries:
                self._cancel_cursor = entry_id
                request_id = fields[b"request_id"].decode()
                with self._lock:
                    flight = self._inflight.pop(request_id, None)
                if flight is not None:
                    self.engine.cancel(request_id)
                    self._ack(flight.entry_id)

    def _ack(self, entry_id: bytes) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.xack(REQUESTS_STREAM, GROUP, entry_id)
        pipe.xdel(REQUESTS_STREAM, entry_id)
        pipe.execute()

    # -- sending events -----------------------------------------------------------------------------

    def _send_now(self, stream: str, event: Event, job: InferenceJob) -> None:
        self._write(self.client.pipeline(transaction=False), stream, event, job).execute()

    @staticmethod
    def _write(pipe, stream: str, event: Event, job: InferenceJob):
        pipe.xadd(stream, {"event": json.dumps(event_to_dict(event))})
        pipe.expireat(stream, int(job.deadline) + REPLY_TTL_AFTER_DEADLINE_S)
        return pipe

    def _publish_loop(self) -> None:
        """Writes engine events to reply streams, batching whatever piled up since the last write."""
        while True:
            item = self._outbox.get()
            if item is None:
                return
            batch = [item]
            while True:
                try:
                    nxt = self._outbox.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._outbox.put(None)
                    break
                batch.append(nxt)
            pipe = self.client.pipeline(transaction=False)
            done: list[bytes] = []
            for job, event in batch:
                self._write(pipe, reply_stream(job.request_id), event, job)
                if isinstance(event, RowFinished | JobFailed):
                    with self._lock:
                        flight = self._inflight.get(job.request_id)
                        if flight is not None:
                            flight.rows_left -= 1 if isinstance(event, RowFinished) else flight.rows_left
                            if flight.rows_left <= 0:
                                del self._inflight[job.request_id]
                                done.append(flight.entry_id)
            for entry_id in done:
                pipe.xack(REQUESTS_STREAM, GROUP, entry_id)
                pipe.xdel(REQUESTS_STREAM, entry_id)
            try:
                pipe.execute()
            except redis.RedisError:
                log.exception("could not publish %d events", len(batch))
