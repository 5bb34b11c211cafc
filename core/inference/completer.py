"""`Completer`: how the API hands a job to an engine and reads its events back.

Two implementations share everything above the transport:

* `InProcessCompleter` (embedded mode): the engine runs in this process on its own thread;
* `RedisCompleter` (distributed mode, `core/inference/redis_transport.py`): jobs go to inference
  workers through a Redis stream, events come back on a per-request reply stream.

Use:

    submission = await completer.submit(job)      # raises QueueFull / InvalidRequest / ... here,
                                                   # before any response byte is sent
    async for event in submission.events():        # TextDelta, RowFinished; raises DeadlineExceeded
        ...                                        # or InferenceFailed
    await submission.cancel()                      # client went away: free the batch slot

`events()` ends after the last `RowFinished`; it never waits past the job's deadline. It raises
`InferenceUnavailable` when the job was withdrawn because no engine is left to run it.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator

from core.inference.engine import InferenceEngine
from core.inference.errors import CorruptPrefix, DeadlineExceeded, InferenceFailed, InferenceUnavailable
from core.inference.jobs import Event, InferenceJob, JobFailed, RowFinished
from core.inference.prefix_cache import PrefixRef

# Grace after the deadline before the API gives up on hearing from the engine itself.
DEADLINE_GRACE_S = 1.0


class Submission(ABC):
    """A job that was accepted: its events, and a way to cancel it."""

    def __init__(self, job: InferenceJob):
        self.job = job
        self._peeked: Event | None = None

    async def wait_started(self) -> None:
        """Wait for the first event (by then the worker has loaded and verified the prefix).

        Raises `CorruptPrefix` (and releases the transport) if the prefix failed its checksum;
        any other outcome is kept for `events()`."""
        remaining = self.job.deadline + DEADLINE_GRACE_S - time.time()
        event = await self._next_event(max(remaining, 0.0)) if remaining > 0 else None
        if isinstance(event, JobFailed) and event.kind == "corrupt_prefix":
            await self._finished()
            raise CorruptPrefix(event.message, None if event.prefix is None else PrefixRef.from_dict(event.prefix))
        self._peeked = event

    @abstractmethod
    async def _next_event(self, timeout: float) -> Event | None:
        """The next event, or None if none came within `timeout` seconds."""

    @abstractmethod
    async def cancel(self) -> None:
        """Ask the engine to drop the job (idempotent; harmless once it finished)."""

    async def _finished(self) -> None:  # noqa: B027 - an optional hook: most transports need no cleanup
        """Called once the events are consumed or abandoned (transport cleanup)."""

    async def events(self) -> AsyncIterator[Event]:
        try:
            async for event in self._events():
                yield event
        finally:
            await self._finished()

    async def _events(self) -> AsyncIterator[Event]:
        rows_left = self.job.n
        while rows_left:
            remaining = self.job.deadline + DEADLINE_GRACE_S - time.time()
            if self._peeked is not None:
                event, self._peeked = self._peeked, None
            else:
                event = await self._next_event(max(remaining, 0.0)) if remaining > 0 else None
            if event is None:
                await self.cancel()
                raise DeadlineExceeded("the request did not finish within its deadline")
            if isinstance(event, JobFailed):
                if event.kind == "timeout":
                    raise DeadlineExceeded(event.message)
                if event.kind == "unavailable":
                    raise InferenceUnavailable(event.message)
                raise InferenceFailed(event.message)
            if isinstance(event, RowFinished):
                rows_left -= 1
            yield event

    async def results(self) -> list[RowFinished]:
        """Run to the end; the finished rows in choice order."""
        done = [event async for event in self.events() if isinstance(event, RowFinished)]
        return sorted(done, key=lambda row: row.index)


class Completer(ABC):
    """Where jobs run. `start`/`close` bracket the service's lifetime."""

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def capacity(self) -> int | None:
        """Engines that can take jobs now (readiness); None when that cannot be told."""
        return None

    @abstractmethod
    async def submit(self, job: InferenceJob) -> Submission:
        """Admit `job` or raise (QueueFull, InvalidRequest, prefix load errors)."""


class _InProcessSubmission(Submission):
    def __init__(self, job: InferenceJob, engine: InferenceEngine, events: asyncio.Queue):
        super().__init__(job)
        self._engine = engine
        self._queue = events

    async def _next_event(self, timeout: float) -> Event | None:
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None

    async def cancel(self) -> None:
        self._engine.cancel(self.job.request_id)


class InProcessCompleter(Completer):
    """Embedded mode: the engine thread lives in this process; no Redis."""

    def __init__(self, engine: InferenceEngine):
        self.engine = engine

    async def start(self) -> None:
        self.engine.start()

    async def close(self) -> None:
        await asyncio.to_thread(self.engine.stop)

    async def capacity(self) -> int:
        return 1 if self.engine.alive else 0

    async def submit(self, job: InferenceJob) -> Submission:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def sink(event: Event) -> None:  # called on the engine thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                pass

        await asyncio.to_thread(self.engine.submit, job, sink)
        return _InProcessSubmission(job, self.engine, events)
