"""The inference engine: one MixedBatchGenerator driven by one dedicated thread.

The model is not thread-safe, so every model call happens on the engine thread. Other threads talk
to it through an inbox (submit, cancel) and get events back through a per-job `sink` callable that
the engine calls from its thread (the in-process completer forwards them to an asyncio queue, the
Redis worker to a reply stream).

Admission is bounded: rows that wait for a batch slot (in the inbox or in the generator's queue)
may not exceed `max_queue`; beyond it `submit` raises `QueueFull` at once. Each job has a deadline;
an expired job is cancelled in the batch (freeing its slot) and gets `JobFailed("timeout")`.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from core.engine.adaptation import row_parts
from core.engine.generation import FINISH_CANCELLED, GenerationRequest, MixedBatchGenerator
from core.engine.model import BaseModel
from core.errors import CorruptArtifact
from core.inference import metrics
from core.inference.errors import CorruptPrefix, QueueFull
from core.inference.jobs import Event, InferenceJob, JobFailed, RowFinished, TextDelta
from core.inference.prefix_cache import Loaded, PrefixCache

log = logging.getLogger("steer.inference")

Sink = Callable[[Event], None]
_IDLE_WAIT_S = 0.05


@dataclass
class _Tracked:
    job: InferenceJob
    sink: Sink
    row_ids: list[int] = field(default_factory=list)  # the generator's id of each choice's row
    submitted: float = field(default_factory=time.perf_counter)
    rows_left: int = 0
    first_text: bool = False


class InferenceEngine:
    """Continuous batching across users behind a thread-safe submit/cancel interface."""

    def __init__(
        self,
        base: BaseModel,
        prefixes: PrefixCache | None = None,
        *,
        max_batch_size: int = 32,
        max_queue: int = 256,
    ):
        self.base = base
        self.prefixes = prefixes
        self.max_queue = max_queue
        self._generator = MixedBatchGenerator(base, max_batch_size)
        self._inbox: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._inbox_rows = 0  # rows submitted but not yet handed to the generator
        self._generator_queued = 0  # rows in the generator's queue after the last step
        self._running = 0
        self._jobs: dict[str, _Tracked] = {}  # engine thread only
        self._rows: dict[int, tuple[_Tracked, int]] = {}  # row id -> (its job, choice index); engine thread only
        self._row_ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._window = (time.perf_counter(), 0)  # tokens/s: (window start, tokens in window)

    # -- any thread -----------------------------------------------------------------------------

    @property
    def max_batch_size(self) -> int:
        return self._generator.max_batch_size

    @property
    def waiting(self) -> int:
        """Rows waiting for a batch slot."""
        with self._lock:
            return self._inbox_rows + self._generator_queued

    @property
    def running(self) -> int:
        """Rows in the running batch (as of the last step)."""
        return self._running

    @property
    def load(self) -> int:
        """Rows waiting or running."""
        return self.waiting + self._running

    @property
    def alive(self) -> bool:
        """The engine thread runs (started and not stopped or crashed)."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> InferenceEngine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="steer-inference", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, job: InferenceJob, sink: Sink) -> None:
        """Admit a job or raise `QueueFull` / `InvalidRequest` / the prefix loader's error.

        Blocking (a prefix cache miss reads the object store): call it off the event loop.
        """
        with self._lock:
            if self._inbox_rows + self._generator_queued + job.n > self.max_queue:
                metrics.REJECTED.inc()
                raise QueueFull()
            self._inbox_rows += job.n
            row_ids = [next(self._row_ids) for _ in range(job.n)]
        try:
            prefix, lora = row_parts(self._load_prefixes(job))
            requests = [
                GenerationRequest(job.prompt_ids, job.row_params(i), prefix=prefix, lora=lora, request_id=row_ids[i])
                for i in range(job.n)
            ]
            self._generator.validate(requests[0])  # pure checks, safe off the engine thread; rows differ only in seed
        except BaseException:
            with self._lock:
                self._inbox_rows -= job.n
            raise
        metrics.QUEUE_DEPTH.set(self.waiting)
        self._inbox.put(("submit", job, sink, requests))

    def _load_prefixes(self, job: InferenceJob) -> list[Loaded]:
        """Each of the job's versions (the user's, then its controls'), loaded; none: base model.
        Raises `CorruptPrefix` naming the version whose bytes failed verification."""
        if not job.prefixes:
            return []
        if self.prefixes is None:
            raise RuntimeError("this engine has no prefix cache")
        loaded = []
        for ref in job.prefixes:
            try:
                loaded.append(self.prefixes.get(ref))
            except CorruptArtifact as exc:
                raise CorruptPrefix(str(exc), ref) from exc
        return loaded

    def cancel(self, request_id: str) -> None:
        """Stop a job (waiting or running); its rows leave the batch at the next step."""
        self._inbox.put(("cancel", request_id))

    # -- engine thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._drain_inbox(block=not self._generator.has_work)
                self._expire_deadlines()
                if self._generator.has_work:
                    self._step()
            except Exception:  # never let one bad step kill serving for everyone
                log.exception("inference step failed; failing the running jobs")
                self._fail_all("internal error in the inference engine")

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=_IDLE_WAIT_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            if item[0] == "submit":
                _, job, sink, requests = item
                self._admit(job, sink, requests)
            else:
                self._cancel(item[1])
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break

    def _admit(self, job: InferenceJob, sink: Sink, requests: list[GenerationRequest]) -> None:
        tracked = _Tracked(job, sink, row_ids=[r.request_id for r in requests], rows_left=job.n)
        self._jobs[job.request_id] = tracked
        for index, request in enumerate(requests):
            self._rows[request.request_id] = (tracked, index)
            request.on_text = self._text_callback(tracked, index)
            self._generator.enqueue(request)  # validated in submit(), off this thread
        with self._lock:
            self._inbox_rows -= job.n
            self._generator_queued = self._generator.queued
        log.info(
            "admitted request_id=%s rows=%d prefixes=%s",
            job.request_id,
            job.n,
            "+".join(f"{ref.user_id}:v{ref.version}" for ref in job.prefixes) or None,
        )

    def _text_callback(self, tracked: _Tracked, index: int) -> Callable[[str], None]:
        def on_text(text: str) -> None:
            self._first_text(tracked)
            tracked.sink(TextDelta(index, text))

        return on_text

    def _first_text(self, tracked: _Tracked) -> None:
        if not tracked.first_text:
            tracked.first_text = True
            metrics.TIME_TO_FIRST_TOKEN.observe(time.perf_counter() - tracked.submitted)

    def _cancel(self, request_id: str) -> None:
        tracked = self._jobs.pop(request_id, None)
        if tracked is None:
            return
        for row_id in tracked.row_ids:
            self._generator.cancel(row_id)
        log.info("cancelled request_id=%s", request_id)

    def _expire_deadlines(self) -> None:
        now = time.time()
        for request_id in [rid for rid, t in self._jobs.items() if t.job.deadline <= now]:
            tracked = self._jobs[request_id]
            self._cancel(request_id)
            metrics.REQUESTS.labels("timeout").inc()
            tracked.sink(JobFailed("timeout", "the request did not finish within its deadline"))

    def _step(self) -> None:
        results = self._generator.step()
        self._running = self._generator.running
        with self._lock:
            self._generator_queued = self._generator.queued
        metrics.BATCH_SIZE.set(self._running)
        metrics.QUEUE_DEPTH.set(self.waiting)
        self._count_tokens(self._running + len(results))
        for result in results:
            tracked, index = self._rows.pop(result.request_id, (None, 0))
            request_id = tracked.job.request_id if tracked else None
            if tracked is None or self._jobs.get(request_id) is not tracked or result.finish_reason == FINISH_CANCELLED:
                continue  # cancelled or expired: its consumer is gone
            self._first_text(tracked)
            tracked.sink(
                RowFinished(index, result.text, result.finish_reason, result.prompt_tokens, result.completion_tokens)
            )
            tracked.rows_left -= 1
            if tracked.rows_left == 0:
                del self._jobs[request_id]
                metrics.REQUESTS.labels(result.finish_reason).inc()

    def _count_tokens(self, tokens: int) -> None:
        # At most one token per row per step; rows that finished this step produced their last one.
        metrics.TOKENS.inc(tokens)
        start, count = self._window
        now = time.perf_counter()
        count += tokens
        if now - start >= 1.0:
            metrics.TOKENS_PER_SECOND.set(count / (now - start))
            start, count = now, 0
        self._window = (start, count)

    def _fail_all(self, message: str) -> None:
        for request_id, tracked in list(self._jobs.items()):
            self._cancel(request_id)
            tracked.sink(JobFailed("error", message))
        self._generator = MixedBatchGenerator(self.base, self._generator.max_batch_size)
        self._rows.clear()
        self._running = 0
        with self._lock:
            self._generator_queued = 0
