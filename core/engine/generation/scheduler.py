"""The scheduler: which requests run this step. No model, no tensors: a plan anyone can print and test.

Admission is FIFO. A step admits queued requests while the running batch has room, in prefill
groups whose padded size (rows x widest prefix+prompt) stays within the prefill token budget, so one
joint prefill has bounded latency and memory. Cancelled requests leave the queue without running;
cancelled running rows are finished by the step that sees the cancellation.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Protocol


class Schedulable(Protocol):
    request_id: Hashable

    @property
    def width(self) -> int:
        """Prefix plus prompt tokens: the columns this request's prefill needs."""

    @property
    def rows(self) -> int:
        """Rows of the running batch it takes (2 for a request guided against the base model)."""


@dataclass
class StepPlan:
    """What one step does, in order: drop, prefill each group, cancel, decode every running row."""

    dropped: list[Schedulable] = field(default_factory=list)
    """Cancelled while queued: answered as cancelled without running."""
    prefill: list[list[Schedulable]] = field(default_factory=list)
    """Groups of newly admitted requests; each group is one joint forward pass."""
    cancelled: list[Hashable] = field(default_factory=list)
    """Running rows that finish as cancelled this step."""

    def __str__(self) -> str:
        groups = " ".join("[" + _ids(g) + "]" for g in self.prefill) or "-"
        dropped = _ids(self.dropped) or "-"
        cancelled = " ".join(map(str, self.cancelled)) or "-"
        return f"prefill {groups} | cancel {cancelled} | drop {dropped}"


class Scheduler:
    """Queue and admission policy of a continuously batched generator."""

    def __init__(self, max_batch_size: int = 32, prefill_token_budget: int = 4096):
        if max_batch_size < 1 or prefill_token_budget < 1:
            raise ValueError("max_batch_size and prefill_token_budget must be positive")
        self.max_batch_size = max_batch_size
        self.prefill_token_budget = prefill_token_budget
        self.queue: deque[Schedulable] = deque()
        self.running: dict[Hashable, int] = {}  # request id -> rows it takes in the running batch
        self._cancelled: set[Hashable] = set()

    def add(self, request: Schedulable) -> None:
        self.queue.append(request)

    def cancel(self, request_id: Hashable) -> None:
        """Mark a request (queued or running) cancelled; the next plan acts on it."""
        self._cancelled.add(request_id)

    def finished(self, request_id: Hashable) -> None:
        """A running row left the batch."""
        self.running.pop(request_id, None)
        self._cancelled.discard(request_id)

    def plan(self) -> StepPlan:
        """Decide this step and take the admitted requests out of the queue."""
        plan = StepPlan()
        if self._cancelled:
            plan.dropped = [r for r in self.queue if r.request_id in self._cancelled]
            for request in plan.dropped:
                self.queue.remove(request)
                self._cancelled.discard(request.request_id)
            plan.cancelled = [r for r in self._cancelled if r in self.running]
        room = self.max_batch_size - sum(self.running.values())
        while self.queue and self._fits(self.queue[0], room, plan):
            group = self._next_group(room)
            plan.prefill.append(group)
            room -= sum(_rows(r) for r in group)
            self.running.update((r.request_id, _rows(r)) for r in group)
        return plan

    def _fits(self, request: Schedulable, room: int, plan: StepPlan) -> bool:
        """Whether `request` may join now: its rows fit, or it is alone in an empty batch (a guided
        request on a batch of one row must still run)."""
        return _rows(request) <= room or (not self.running and not plan.prefill)

    def _next_group(self, room: int) -> list[Schedulable]:
        group: list[Schedulable] = []
        widest = rows = 0
        while self.queue and (rows + _rows(self.queue[0]) <= room or not group):
            width = max(widest, self.queue[0].width)
            if group and width * (rows + _rows(self.queue[0])) > self.prefill_token_budget:
                break
            request = self.queue.popleft()
            group.append(request)
            widest, rows = width, rows + _rows(request)
        return group


def _rows(request: Schedulable) -> int:
    return getattr(request, "rows", 1)


def _ids(requests: list[Schedulable]) -> str:
    return " ".join(str(r.request_id) for r in requests)
