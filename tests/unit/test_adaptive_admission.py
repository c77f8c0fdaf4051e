"""Admission to an upstream: callers wait in a bounded queue as long as their deadline
allows, the limit follows the upstream, and every shed is counted with its reason."""

from __future__ import annotations

import asyncio
import logging

import pytest

from app.core.resilience import (
    Bulkhead,
    BulkheadFullError,
    FixedLimit,
    GradientLimit,
    NullObserver,
    Sample,
    deadline_scope,
)
from app.core.resilience.testing import FakeClock


class Events:
    def __init__(self) -> None:
        self.shed_reasons: list[tuple[str, str]] = []
        self.states: list[tuple[int, int, int]] = []

    def shed(self, name: str, reason: str) -> None:
        self.shed_reasons.append((name, reason))

    def changed(self, name: str, limit: int, in_flight: int, queued: int) -> None:
        self.states.append((limit, in_flight, queued))


class Rejections(NullObserver):
    def __init__(self) -> None:
        self.names: list[str] = []

    def bulkhead_rejected(self, name: str) -> None:
        self.names.append(name)


@pytest.fixture
def events() -> Events:
    return Events()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def bulkhead(events: Events, limit: int = 1, **options: object) -> Bulkhead:
    return Bulkhead("openai:chat", limit, None, events=events, **options)  # type: ignore[arg-type]


async def test_a_caller_waits_for_a_slot_as_long_as_its_deadline_allows(events: Events) -> None:
    admission = bulkhead(events)
    await admission.acquire()
    with deadline_scope(30.0):
        waiter = asyncio.create_task(admission.acquire(reserve_seconds=8.0))
        await settle()
        assert admission.waiting == 1  # not shed after half a second
        assert not waiter.done()
        admission.release()
        await waiter

    assert (admission.in_use, admission.waiting) == (1, 0)
    assert events.shed_reasons == []


async def test_a_wait_never_outlasts_the_deadline_less_the_reserve(events: Events) -> None:
    admission = bulkhead(events)
    await admission.acquire()
    with deadline_scope(8.02), pytest.raises(BulkheadFullError) as shed:
        await admission.acquire(reserve_seconds=8.0)  # 0.02 s to wait, then shed

    assert shed.value.reason == "wait_timeout"
    assert events.shed_reasons == [("openai:chat", "wait_timeout")]
    assert (admission.in_use, admission.waiting) == (1, 0)


async def test_no_time_to_wait_is_shed_at_once(events: Events) -> None:
    clock = FakeClock()
    admission = bulkhead(events)
    await admission.acquire()
    with deadline_scope(5.0, clock=clock), pytest.raises(BulkheadFullError) as shed:
        await admission.acquire(reserve_seconds=5.0)

    assert shed.value.reason == "no_time"


async def test_a_full_queue_sheds_newcomers_and_counts_them(events: Events) -> None:
    observer = Rejections()
    admission = bulkhead(events, max_queue=2, observer=observer)
    await admission.acquire()
    waiters = [asyncio.create_task(admission.acquire()) for _ in range(2)]
    await settle()
    with pytest.raises(BulkheadFullError) as shed:
        await admission.acquire()
    assert admission.waiting == 2  # the queue never grows past its bound
    for _ in waiters:
        admission.release()
    await asyncio.gather(*waiters)

    assert shed.value.reason == "queue_full"
    assert events.shed_reasons == [("openai:chat", "queue_full")]
    assert observer.names == ["openai:chat"]


async def test_a_wait_longer_than_the_deadline_allows_is_shed_before_queueing(
    events: Events,
) -> None:
    limit = FixedLimit(2)
    limit.record(10.0, 2, Sample.OK)  # the upstream answers in 10 s
    admission = Bulkhead("openai:chat", limit, None, events=events, max_queue=100)
    await admission.acquire()
    await admission.acquire()
    # Two slots, each free in about 10 s: the first waiter expects 5 s, fine within 30 s.
    with deadline_scope(30.0):
        first = asyncio.create_task(admission.acquire())
        await settle()
    # With 3 s to wait, a caller does not sit in the queue until its time is gone.
    with deadline_scope(3.0), pytest.raises(BulkheadFullError) as shed:
        await admission.acquire()
    admission.release()
    await first

    assert shed.value.reason == "expected_wait"
    assert admission.waiting == 0


async def test_waiters_are_admitted_in_arrival_order(events: Events) -> None:
    admission = bulkhead(events)
    order: list[int] = []

    async def caller(number: int) -> None:
        async with admission.admit():
            order.append(number)
            await asyncio.sleep(0)

    async with admission.admit():
        tasks = [asyncio.create_task(caller(n)) for n in range(5)]
        await settle()
    await asyncio.gather(*tasks)

    assert order == [0, 1, 2, 3, 4]


async def test_a_growing_limit_admits_waiters_without_waiting_for_more_releases(
    events: Events,
) -> None:
    limit = GradientLimit(initial=2, min_limit=1, max_limit=100, smoothing=1.0)
    admission = Bulkhead("openai:chat", limit, None, events=events)
    holders = [admission.admit() for _ in range(2)]
    permits = [await holder.__aenter__() for holder in holders]
    waiters = [asyncio.create_task(admission.acquire()) for _ in range(3)]
    await settle()
    assert admission.waiting == 3
    permits[0].sample = Sample.OK
    await holders[0].__aexit__(None, None, None)  # one answer, in full use: the limit grows
    await settle()

    assert limit.limit == 3  # 2 + sqrt(2)
    assert (admission.in_use, admission.waiting) == (3, 1)  # one freed slot, two admitted
    await holders[1].__aexit__(None, None, None)
    for waiter in waiters:
        waiter.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)


async def test_overload_samples_shrink_the_limit_through_admission(events: Events) -> None:
    limit = GradientLimit(initial=50, min_limit=1, max_limit=100)
    admission = Bulkhead("openai:chat", limit, None, events=events)
    async with admission.admit() as permit:
        permit.sample = Sample.DROPPED

    assert limit.limit == 45
    assert events.states[-1] == (45, 0, 0)


async def test_a_cancelled_waiter_leaves_no_trace(events: Events) -> None:
    admission = bulkhead(events)
    await admission.acquire()
    waiter = asyncio.create_task(admission.acquire())
    await settle()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    admission.release()

    assert (admission.in_use, admission.waiting) == (0, 0)
    assert events.shed_reasons == []


async def test_sheds_are_logged_with_their_reason_at_most_once_per_interval(
    events: Events, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    admission = Bulkhead("openai:chat", 1, 0.0, events=events, clock=clock, log_interval=5.0)
    await admission.acquire()
    with caplog.at_level(logging.WARNING, logger="app.core.resilience.bulkhead"):
        for _ in range(10):
            with pytest.raises(BulkheadFullError):
                await admission.acquire()
        clock.advance(5.0)
        with pytest.raises(BulkheadFullError):
            await admission.acquire()

    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert all("(no_time)" in line for line in lines)
    assert "9 more shed" in lines[1]
    assert len(events.shed_reasons) == 11
