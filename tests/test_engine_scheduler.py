"""The scheduler decides admission, prefill grouping and cancellation without a model."""

from dataclasses import dataclass

import pytest

from core.engine.generation.scheduler import Scheduler


@dataclass
class _Request:
    request_id: str
    width: int


def _ids(groups):
    return [[r.request_id for r in g] for g in groups]


def test_admission_is_fifo_up_to_the_batch_size():
    scheduler = Scheduler(max_batch_size=3, prefill_token_budget=10_000)
    for i in range(5):
        scheduler.add(_Request(f"r{i}", 10))
    plan = scheduler.plan()
    assert _ids(plan.prefill) == [["r0", "r1", "r2"]]
    assert [r.request_id for r in scheduler.queue] == ["r3", "r4"]
    assert _ids(scheduler.plan().prefill) == []  # the batch is full until a row leaves
    scheduler.finished("r1")
    assert _ids(scheduler.plan().prefill) == [["r3"]]


def test_prefill_groups_stay_within_the_token_budget():
    """rows x widest (prefix + prompt) of one group never exceeds the budget; a lone wide request
    still runs (in a group of its own)."""
    scheduler = Scheduler(max_batch_size=8, prefill_token_budget=100)
    for name, width in [("a", 20), ("b", 30), ("c", 30), ("d", 120), ("e", 10)]:
        scheduler.add(_Request(name, width))
    plan = scheduler.plan()
    assert _ids(plan.prefill) == [["a", "b", "c"], ["d"], ["e"]]
    assert str(plan) == "prefill [a b c] [d] [e] | cancel - | drop -"


def test_cancelled_requests_leave_the_queue_and_the_batch():
    scheduler = Scheduler(max_batch_size=1)
    scheduler.add(_Request("running", 5))
    scheduler.add(_Request("queued", 5))
    scheduler.plan()
    scheduler.cancel("running")
    scheduler.cancel("queued")
    plan = scheduler.plan()
    assert [r.request_id for r in plan.dropped] == ["queued"] and plan.cancelled == ["running"]
    assert not scheduler.queue and _ids(plan.prefill) == []  # "running" holds its slot until it leaves
    scheduler.finished("running")
    assert scheduler.plan().cancelled == [] and not scheduler.running


def test_nonsense_limits_are_refused():
    with pytest.raises(ValueError):
        Scheduler(max_batch_size=0)
