"""The circuit-breaker state machine, run against every BreakerStore with a FakeClock.

Each test runs twice: on the in-process store and on the Redis store (whose Lua
script then takes "now" from the same FakeClock instead of Redis TIME).
"""

from __future__ import annotations

import asyncio
import random
import secrets
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from app.core.resilience import (
    BreakerState,
    CircuitBreaker,
    CircuitOpenError,
    DeadlineExceededError,
    NullObserver,
    Permit,
)
from app.core.resilience.breaker import BreakerStore
from app.core.resilience.stores import InMemoryBreakerStore, RedisBreakerStore
from app.core.resilience.testing import FakeClock
from app.providers.base import ProviderRejectedError, ProviderUnavailableError

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


class TransitionLog(NullObserver):
    def __init__(self) -> None:
        self.transitions: list[tuple[BreakerState, BreakerState]] = []

    def breaker_transition(
        self, name: str, from_state: BreakerState, to_state: BreakerState
    ) -> None:
        self.transitions.append((from_state, to_state))


class Upstream:
    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return "ok"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def store_kind(request: pytest.FixtureRequest) -> str:
    """The string "memory", or the test Redis URL (resolved outside the event loop)."""
    if request.param == "memory":
        return "memory"
    url: str = request.getfixturevalue("redis_url")
    return url


@pytest.fixture
async def store(store_kind: str, clock: FakeClock) -> AsyncIterator[BreakerStore]:
    if store_kind == "memory":
        yield InMemoryBreakerStore(clock=clock)
        return
    client = Redis.from_url(
        store_kind, socket_timeout=2.0, socket_connect_timeout=2.0, retry=Retry(NoBackoff(), 0)
    )
    prefix = f"test:breaker:{secrets.token_hex(4)}:"
    try:
        yield RedisBreakerStore(client, key_prefix=prefix, clock=clock)
    finally:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


@pytest.fixture
def log() -> TransitionLog:
    return TransitionLog()


@pytest.fixture
def breaker(store: BreakerStore, log: TransitionLog) -> CircuitBreaker:
    return CircuitBreaker("openai:chat", store, open_jitter=0.0, observer=log)


async def fail(breaker: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        with pytest.raises(ProviderUnavailableError):
            await breaker.call(Upstream(ProviderUnavailableError("openai", "503")))


async def open_then_wait(breaker: CircuitBreaker, clock: FakeClock) -> None:
    """Open the breaker and let its open time pass (the next call will probe)."""
    await fail(breaker, breaker.config.failure_threshold)
    clock.advance(breaker.config.recovery_timeout)


async def test_opens_after_exactly_three_consecutive_failures(breaker: CircuitBreaker) -> None:
    await fail(breaker, 2)
    assert (await breaker.snapshot()).state is CLOSED

    await fail(breaker)

    snapshot = await breaker.snapshot()
    assert snapshot.state is OPEN
    assert snapshot.opened_until_seconds_from_now == pytest.approx(120.0)


async def test_success_while_closed_resets_the_failure_count(breaker: CircuitBreaker) -> None:
    await fail(breaker, 2)
    await breaker.call(Upstream())
    await fail(breaker, 2)

    snapshot = await breaker.snapshot()
    assert snapshot.state is CLOSED
    assert snapshot.consecutive_failures == 2


async def test_a_call_admitted_before_the_failures_does_not_reset_them(
    breaker: CircuitBreaker,
) -> None:
    # A long call admitted while the count was 0 succeeds after two newer calls
    # failed: its success says nothing about the upstream since, and changes
    # nothing (it is recorded without a store operation).
    early = await breaker.acquire()
    await fail(breaker, 2)
    await breaker.record_success(early)

    assert (await breaker.snapshot()).consecutive_failures == 2
    await fail(breaker)
    assert (await breaker.snapshot()).state is OPEN


async def test_a_call_admitted_after_a_failure_resets_the_count_when_it_succeeds(
    breaker: CircuitBreaker,
) -> None:
    await fail(breaker)
    admitted = await breaker.acquire()
    await fail(breaker)
    await breaker.record_success(admitted)

    assert (await breaker.snapshot()).consecutive_failures == 0


async def test_open_breaker_rejects_with_seconds_until_half_open_without_calling(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    await fail(breaker, 3)
    clock.advance(20.0)
    upstream = Upstream()

    with pytest.raises(CircuitOpenError) as rejected:
        await breaker.call(upstream)

    assert rejected.value.retry_after == pytest.approx(100.0)
    assert upstream.calls == 0


async def test_first_call_after_the_open_time_is_a_probe(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    await fail(breaker, 3)
    clock.advance(119.9)
    with pytest.raises(CircuitOpenError):
        await breaker.acquire()

    clock.advance(0.1)
    permit = await breaker.acquire()

    assert permit.probe
    assert (await breaker.snapshot()).state is HALF_OPEN


async def test_half_open_grants_exactly_half_open_max_calls_probes(
    store: BreakerStore, clock: FakeClock
) -> None:
    breaker = CircuitBreaker("openai:chat", store, half_open_max_calls=2, observer=NullObserver())
    await open_then_wait(breaker, clock)

    granted: list[Permit] = []
    rejected = 0
    for _ in range(5):
        try:
            granted.append(await breaker.acquire())
        except CircuitOpenError:
            rejected += 1

    assert [permit.probe for permit in granted] == [True, True]
    assert rejected == 3
    assert (await breaker.snapshot()).probes_in_flight == 2


async def test_failed_probe_reopens_for_longer_up_to_the_cap(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    await fail(breaker, 3)
    open_times = [(await breaker.snapshot()).opened_until_seconds_from_now]
    for _ in range(4):
        clock.advance(open_times[-1] or 0.0)
        await fail(breaker)  # the probe
        open_times.append((await breaker.snapshot()).opened_until_seconds_from_now)

    assert open_times == pytest.approx([120.0, 240.0, 480.0, 600.0, 600.0])


async def test_lengthened_open_time_is_jittered_within_ten_percent(
    store: BreakerStore, clock: FakeClock
) -> None:
    breaker = CircuitBreaker(
        "openai:chat", store, open_jitter=0.1, rng=random.Random(5), observer=NullObserver()
    )
    await open_then_wait(breaker, clock)

    await fail(breaker)

    reopened_for = (await breaker.snapshot()).opened_until_seconds_from_now
    assert reopened_for is not None
    assert 216.0 <= reopened_for <= 264.0
    assert reopened_for != pytest.approx(240.0)


async def test_successful_probe_closes_and_resets_the_lengthening(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    await open_then_wait(breaker, clock)
    await fail(breaker)  # failed probe: open for 240 s
    clock.advance(240.0)

    assert await breaker.call(Upstream()) == "ok"
    assert (await breaker.snapshot()).state is CLOSED
    await fail(breaker, 3)

    snapshot = await breaker.snapshot()
    assert snapshot.opened_until_seconds_from_now == pytest.approx(120.0)
    assert snapshot.open_count == 1


async def test_errors_that_are_not_upstream_failures_do_not_count(
    breaker: CircuitBreaker,
) -> None:
    for _ in range(5):
        with pytest.raises(ProviderRejectedError):
            await breaker.call(Upstream(ProviderRejectedError("openai", "400")))

    snapshot = await breaker.snapshot()
    assert snapshot.state is CLOSED
    assert snapshot.consecutive_failures == 0


async def test_probe_answered_with_a_client_error_closes_the_breaker(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    await open_then_wait(breaker, clock)

    with pytest.raises(ProviderRejectedError):
        await breaker.call(Upstream(ProviderRejectedError("openai", "400")))

    assert (await breaker.snapshot()).state is CLOSED


async def test_cancelled_calls_do_not_count(breaker: CircuitBreaker) -> None:
    await fail(breaker, 2)
    for _ in range(3):
        with pytest.raises(asyncio.CancelledError):
            await breaker.call(Upstream(asyncio.CancelledError()))

    snapshot = await breaker.snapshot()
    assert snapshot.state is CLOSED
    assert snapshot.consecutive_failures == 2


async def test_cancelled_probe_frees_its_lease_for_the_next_caller(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    await open_then_wait(breaker, clock)

    with pytest.raises(asyncio.CancelledError):
        await breaker.call(Upstream(asyncio.CancelledError()))
    permit = await breaker.acquire()

    assert permit.probe
    assert (await breaker.snapshot()).state is HALF_OPEN


async def test_probe_that_ran_out_of_deadline_neither_closes_nor_reopens(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    await open_then_wait(breaker, clock)

    with pytest.raises(DeadlineExceededError):
        await breaker.call(Upstream(DeadlineExceededError()))

    assert (await breaker.snapshot()).state is HALF_OPEN
    assert (await breaker.acquire()).probe


async def test_expired_probe_lease_is_granted_again(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    await open_then_wait(breaker, clock)
    await breaker.acquire()  # a probe whose worker never reports back

    with pytest.raises(CircuitOpenError) as rejected:
        await breaker.acquire()
    assert rejected.value.retry_after == pytest.approx(30.0)
    clock.advance(30.0)

    assert (await breaker.acquire()).probe


async def test_result_of_a_call_admitted_before_the_opening_is_ignored(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    slow_call = await breaker.acquire()
    await open_then_wait(breaker, clock)
    probe = await breaker.acquire()

    await breaker.record_success(slow_call)

    assert (await breaker.snapshot()).state is HALF_OPEN
    await breaker.record_success(probe)
    assert (await breaker.snapshot()).state is CLOSED


async def test_observer_sees_each_transition_exactly_once(
    breaker: CircuitBreaker, clock: FakeClock, log: TransitionLog
) -> None:
    await fail(breaker, 3)
    for _ in range(2):
        with pytest.raises(CircuitOpenError):
            await breaker.acquire()
    clock.advance(120.0)
    await fail(breaker)  # failed probe
    clock.advance(240.0)
    probe = await breaker.acquire()
    with pytest.raises(CircuitOpenError):
        await breaker.acquire()
    await breaker.record_success(probe)
    await breaker.call(Upstream())

    assert log.transitions == [
        (CLOSED, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, CLOSED),
    ]


async def test_snapshot_of_an_unused_breaker_is_closed(breaker: CircuitBreaker) -> None:
    snapshot = await breaker.snapshot()

    assert snapshot.name == "openai:chat"
    assert snapshot.state is CLOSED
    assert snapshot.consecutive_failures == 0
    assert snapshot.opened_until_seconds_from_now is None
    assert not snapshot.store_degraded


class BrokenObserver(NullObserver):
    def breaker_transition(
        self, name: str, from_state: BreakerState, to_state: BreakerState
    ) -> None:
        raise RuntimeError("metrics exporter is down")


async def test_a_failing_observer_never_breaks_a_call(store: BreakerStore) -> None:
    breaker = CircuitBreaker("openai:chat", store, observer=BrokenObserver())

    await fail(breaker, 3)

    assert (await breaker.snapshot()).state is OPEN
