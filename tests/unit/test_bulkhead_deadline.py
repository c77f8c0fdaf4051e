"""Bulkhead, request deadline and graceful degradation: the guards around a call."""

from __future__ import annotations

import asyncio
import logging

import pytest

from app.core.resilience import (
    Bulkhead,
    BulkheadFullError,
    CircuitOpenError,
    Deadline,
    DeadlineExceededError,
    NullObserver,
    current_deadline,
    deadline_scope,
    graceful_degradation,
    run_within,
)
from app.core.resilience.testing import FakeClock
from app.providers.base import ProviderUnavailableError


class EventLog(NullObserver):
    def __init__(self) -> None:
        self.rejected: list[str] = []
        self.fallbacks: list[tuple[str, BaseException]] = []

    def bulkhead_rejected(self, name: str) -> None:
        self.rejected.append(name)

    def fallback(self, name: str, error: BaseException) -> None:
        self.fallbacks.append((name, error))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def events() -> EventLog:
    return EventLog()


async def settle() -> None:
    """Let every ready task run until it blocks."""
    for _ in range(5):
        await asyncio.sleep(0)


# --- bulkhead ---------------------------------------------------------------------


async def test_bulkhead_admits_up_to_max_concurrent() -> None:
    bulkhead = Bulkhead("openai", max_concurrent=2)

    async with bulkhead, bulkhead:
        assert bulkhead.in_use == 2

    assert bulkhead.in_use == 0


async def test_bulkhead_without_wait_rejects_overflow_at_once(events: EventLog) -> None:
    bulkhead = Bulkhead("openai", max_concurrent=1, max_wait_seconds=0.0, observer=events)

    async with bulkhead:
        with pytest.raises(BulkheadFullError) as rejected:
            await bulkhead.acquire()

    assert rejected.value.retry_after == 1.0
    assert events.rejected == ["openai"]
    assert bulkhead.in_use == 0


async def test_bulkhead_waiter_is_admitted_when_a_slot_frees() -> None:
    bulkhead = Bulkhead("openai", max_concurrent=1, max_wait_seconds=60.0)
    order: list[str] = []

    async def waiter() -> None:
        async with bulkhead:
            order.append("waiter")

    async with bulkhead:
        task = asyncio.create_task(waiter())
        await settle()
        assert bulkhead.waiting == 1
        order.append("holder done")
    await task

    assert order == ["holder done", "waiter"]
    assert (bulkhead.in_use, bulkhead.waiting) == (0, 0)


async def test_bulkhead_hands_freed_slots_to_waiters_in_arrival_order() -> None:
    bulkhead = Bulkhead("openai", max_concurrent=1, max_wait_seconds=60.0)
    admitted: list[int] = []

    async def waiter(number: int) -> None:
        async with bulkhead:
            admitted.append(number)

    async with bulkhead:
        tasks = []
        for number in range(3):
            tasks.append(asyncio.create_task(waiter(number)))
            await settle()
    await asyncio.gather(*tasks)

    assert admitted == [0, 1, 2]


async def test_bulkhead_waiter_gives_up_after_max_wait(events: EventLog) -> None:
    bulkhead = Bulkhead("openai", max_concurrent=1, max_wait_seconds=0.01, observer=events)

    async with bulkhead:
        with pytest.raises(BulkheadFullError):
            await bulkhead.acquire()
        assert bulkhead.waiting == 0

    assert events.rejected == ["openai"]
    assert bulkhead.in_use == 0


async def test_bulkhead_never_waits_past_the_request_deadline(clock: FakeClock) -> None:
    bulkhead = Bulkhead("openai", max_concurrent=1, max_wait_seconds=60.0)

    async with bulkhead:
        with deadline_scope(1.0, clock=clock):
            clock.advance(1.0)
            with pytest.raises(BulkheadFullError):
                await bulkhead.acquire()


async def test_cancelled_waiter_does_not_leak_a_slot() -> None:
    bulkhead = Bulkhead("openai", max_concurrent=1, max_wait_seconds=60.0)

    async with bulkhead:
        task = asyncio.create_task(bulkhead.acquire())
        await settle()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    assert (bulkhead.in_use, bulkhead.waiting) == (0, 0)
    async with bulkhead:
        assert bulkhead.in_use == 1


# --- deadline ---------------------------------------------------------------------


def test_no_deadline_outside_a_scope() -> None:
    assert current_deadline() is None


def test_deadline_counts_down_with_the_clock(clock: FakeClock) -> None:
    deadline = Deadline.after(30.0, clock=clock)
    clock.advance(29.0)
    assert deadline.remaining() == pytest.approx(1.0)
    assert not deadline.expired

    clock.advance(2.0)

    assert deadline.remaining() == 0.0
    assert deadline.expired


def test_nested_scope_never_extends_the_outer_deadline(clock: FakeClock) -> None:
    with deadline_scope(5.0, clock=clock) as outer, deadline_scope(30.0, clock=clock) as inner:
        assert inner is outer
        assert current_deadline() is outer


def test_nested_shorter_scope_applies_inside_only(clock: FakeClock) -> None:
    with deadline_scope(30.0, clock=clock) as outer:
        with deadline_scope(2.0, clock=clock) as inner:
            assert current_deadline() is inner
            assert inner.remaining() == pytest.approx(2.0)
        assert current_deadline() is outer
    assert current_deadline() is None


async def test_deadline_is_inherited_by_child_tasks(clock: FakeClock) -> None:
    async def seen() -> Deadline | None:
        return current_deadline()

    with deadline_scope(10.0, clock=clock) as deadline:
        assert await asyncio.create_task(seen()) is deadline


async def test_run_within_an_expired_deadline_does_not_start_the_call(clock: FakeClock) -> None:
    started: list[int] = []

    async def call() -> None:
        started.append(1)

    deadline = Deadline.after(1.0, clock=clock)
    clock.advance(1.0)

    with pytest.raises(DeadlineExceededError):
        await run_within(deadline, call)
    assert started == []


async def test_run_within_stops_a_call_that_outlives_the_deadline() -> None:
    with deadline_scope(0.01), pytest.raises(DeadlineExceededError):
        await run_within(None, lambda: asyncio.sleep(60))


async def test_run_within_lets_the_calls_own_timeout_through(clock: FakeClock) -> None:
    async def call() -> None:
        raise TimeoutError("read timeout")

    with pytest.raises(TimeoutError, match="read timeout") as raised:
        await run_within(Deadline.after(30.0, clock=clock), call)
    assert not isinstance(raised.value, DeadlineExceededError)


async def test_run_within_without_any_deadline_just_awaits() -> None:
    async def call() -> str:
        return "story"

    assert await run_within(None, call) == "story"


# --- graceful degradation ---------------------------------------------------------


async def test_degradation_returns_the_fallback_and_reports_it(events: EventLog) -> None:
    calls: list[int] = []

    @graceful_degradation(fallback_value=[], name="illustrate", observer=events)
    async def illustrate() -> list[str]:
        calls.append(1)
        raise ProviderUnavailableError("replicate", "503")

    assert await illustrate() == []
    assert calls == [1]
    assert [(name, type(error)) for name, error in events.fallbacks] == [
        ("illustrate", ProviderUnavailableError)
    ]


async def test_degradation_covers_an_open_circuit() -> None:
    @graceful_degradation(fallback_value="offline story", observer=NullObserver())
    async def generate() -> str:
        raise CircuitOpenError("openai:chat", retry_after=60.0)

    assert await generate() == "offline story"


async def test_degradation_is_logged_by_default(caplog: pytest.LogCaptureFixture) -> None:
    @graceful_degradation(fallback_value=0)
    async def count() -> int:
        raise ProviderUnavailableError("openai", "503")

    with caplog.at_level(logging.WARNING, logger="app.core.resilience"):
        assert await count() == 0

    assert "using its fallback" in caplog.text


async def test_callable_fallback_builds_a_fresh_value_each_time() -> None:
    @graceful_degradation(fallback_value=lambda: ["unknown"], observer=NullObserver())
    async def tags() -> list[str]:
        raise ProviderUnavailableError("openai", "503")

    first: list[str] = await tags()
    second: list[str] = await tags()
    assert first == second == ["unknown"]
    assert first is not second


async def test_degradation_lets_unlisted_errors_through() -> None:
    @graceful_degradation(fallback_value=None, exceptions=(ProviderUnavailableError,))
    async def generate() -> None:
        raise ValueError("a bug, not an outage")

    with pytest.raises(ValueError, match="a bug"):
        await generate()


async def test_degradation_never_swallows_cancellation() -> None:
    @graceful_degradation(fallback_value="x", exceptions=(BaseException,), observer=NullObserver())
    async def generate() -> str:
        raise asyncio.CancelledError()

    with pytest.raises(asyncio.CancelledError):
        await generate()


def test_degradation_works_on_sync_functions(events: EventLog) -> None:
    on_fallback: list[BaseException] = []

    @graceful_degradation(fallback_value=-1, on_fallback=on_fallback.append, observer=events)
    def measure() -> int:
        raise OSError("disk gone")

    assert measure() == -1
    assert [type(error) for error in on_fallback] == [OSError]
    assert len(events.fallbacks) == 1
