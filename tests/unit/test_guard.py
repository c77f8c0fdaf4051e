"""The Guard around one upstream operation: what a hang and an opening breaker cost."""

from __future__ import annotations

import asyncio

import pytest

from app.core.resilience import (
    BreakerState,
    Bulkhead,
    CircuitBreaker,
    CircuitOpenError,
    DeadlineExceededError,
    RetryPolicy,
    deadline_scope,
)
from app.core.resilience.stores import InMemoryBreakerStore
from app.core.resilience.testing import FakeClock
from app.providers.base import ProviderTimeoutError, ProviderUnavailableError
from app.providers.resilient import Guard

NEVER = 3600.0


def guard(clock: FakeClock, *, threshold: int = 3, floor_seconds: float = 0.0) -> Guard:
    return Guard(
        provider="openai",
        operation="chat",
        breaker=CircuitBreaker(
            "openai:chat", InMemoryBreakerStore(clock=clock), failure_threshold=threshold
        ),
        bulkhead=Bulkhead("openai", 4),
        policy=RetryPolicy(max_retries=3, base_delay=1.0, sleep=clock.sleep),
        floor_seconds=floor_seconds,
    )


class Failing:
    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        raise ProviderUnavailableError("openai", "HTTP 503")


async def hang() -> str:
    await asyncio.sleep(NEVER)
    return "never"


async def test_no_backoff_is_slept_once_the_failure_opened_the_breaker() -> None:
    clock = FakeClock()
    upstream, opening = Failing(), guard(clock, threshold=1)

    with pytest.raises(CircuitOpenError) as refused:
        await opening.run(upstream)

    assert isinstance(refused.value.__context__, ProviderUnavailableError)
    assert refused.value.retry_after > 0
    assert upstream.calls == 1
    assert clock.sleeps == []
    assert (await opening.breaker.snapshot()).state is BreakerState.OPEN


async def test_backoffs_are_slept_until_the_breaker_opens_and_not_after() -> None:
    clock = FakeClock()
    upstream, failing = Failing(), guard(clock, threshold=3)

    with pytest.raises(CircuitOpenError):
        await failing.run(upstream)

    # Attempts 1 and 2 fail with the breaker still closed (a backoff each);
    # attempt 3 opens it: the fourth attempt would be refused, so no third backoff.
    assert upstream.calls == 3
    assert len(clock.sleeps) == 2


async def test_a_hang_cut_at_the_deadline_counts_against_the_breaker() -> None:
    hanging = guard(FakeClock(), threshold=3, floor_seconds=0.01)

    with deadline_scope(0.05), pytest.raises(ProviderTimeoutError):
        await hanging.run(hang)

    snapshot = await hanging.breaker.snapshot()
    assert snapshot.consecutive_failures == 1


async def test_three_hangs_open_the_breaker_like_three_failures() -> None:
    hanging = guard(FakeClock(), threshold=3, floor_seconds=0.01)

    for _ in range(3):
        with deadline_scope(0.02), pytest.raises(ProviderTimeoutError):
            await hanging.run(hang)

    assert (await hanging.breaker.snapshot()).state is BreakerState.OPEN


async def test_a_call_cut_with_less_than_the_floor_left_is_no_verdict_on_the_upstream() -> None:
    hanging = guard(FakeClock(), threshold=1, floor_seconds=NEVER)

    with deadline_scope(0.02), pytest.raises(DeadlineExceededError):
        await hanging.run(hang)

    snapshot = await hanging.breaker.snapshot()
    assert snapshot.state is BreakerState.CLOSED
    assert snapshot.consecutive_failures == 0
