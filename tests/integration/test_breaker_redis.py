"""Breaker state in a real Redis: atomic under concurrency, shared between store
instances with separate connection pools, and answered in-process when Redis is down
or silent (through the fault proxy) until it comes back.

Clients are built the way the app builds them: millisecond timeouts and no redis-py
retries (`Retry(NoBackoff(), 0)`), or a silent Redis would cost seconds per call.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from app.core.resilience import (
    BreakerState,
    CircuitBreaker,
    CircuitOpenError,
    NullObserver,
    Permit,
)
from app.core.resilience.stores import FailoverBreakerStore, RedisBreakerStore
from app.core.resilience.testing import FakeClock
from app.platform.redis import RedisGate
from app.providers.base import ProviderUnavailableError
from tests.fakes.fault_proxy import FaultProxy

pytestmark = pytest.mark.redis

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN
NAME = "openai:chat"


class EventLog(NullObserver):
    def __init__(self) -> None:
        self.transitions: list[tuple[BreakerState, BreakerState]] = []
        self.store_errors: list[BaseException] = []
        self.recoveries = 0

    def breaker_transition(
        self, name: str, from_state: BreakerState, to_state: BreakerState
    ) -> None:
        self.transitions.append((from_state, to_state))

    def store_fallback(self, error: BaseException) -> None:
        self.store_errors.append(error)

    def store_recovered(self) -> None:
        self.recoveries += 1


def fast_client(url: str, *, socket_timeout: float | None = 0.05) -> Redis:
    return Redis.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=0.1,
        retry=Retry(NoBackoff(), 0),
    )


async def boom() -> None:
    raise ProviderUnavailableError("openai", "503")


async def fail(breaker: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        with pytest.raises(ProviderUnavailableError):
            await breaker.call(boom)


@pytest.fixture
def prefix() -> str:
    return f"test:breaker:{secrets.token_hex(4)}:"


@pytest.fixture
async def clients(redis_url: str, prefix: str) -> AsyncIterator[tuple[Redis, Redis]]:
    """Two clients with separate connection pools, as two workers would have."""
    # A generous socket timeout: these talk to a healthy Redis on a busy CI machine.
    first = fast_client(redis_url, socket_timeout=2.0)
    second = fast_client(redis_url, socket_timeout=2.0)
    try:
        yield first, second
    finally:
        keys = [key async for key in first.scan_iter(match=f"{prefix}*")]
        if keys:
            await first.delete(*keys)
        await first.aclose()
        await second.aclose()


@pytest.fixture
def log() -> EventLog:
    return EventLog()


@pytest.fixture
def proxy(fault_proxy_redis: FaultProxy) -> FaultProxy:
    return fault_proxy_redis


# --- shared state ----------------------------------------------------------------


async def test_failures_through_one_instance_open_the_breaker_for_another(
    clients: tuple[Redis, Redis], prefix: str
) -> None:
    # No clock: the script decides with Redis server TIME.
    worker_a = CircuitBreaker(NAME, RedisBreakerStore(clients[0], key_prefix=prefix))
    worker_b = CircuitBreaker(NAME, RedisBreakerStore(clients[1], key_prefix=prefix))

    await fail(worker_a, 3)

    with pytest.raises(CircuitOpenError) as rejected:
        await worker_b.acquire()
    assert 0.0 < rejected.value.retry_after <= 120.0
    assert (await worker_b.snapshot()).state is OPEN


async def test_concurrent_acquires_in_half_open_grant_exactly_the_probe_limit(
    clients: tuple[Redis, Redis], prefix: str, log: EventLog
) -> None:
    clock = FakeClock()
    workers = [
        CircuitBreaker(
            NAME,
            RedisBreakerStore(client, key_prefix=prefix, clock=clock),
            half_open_max_calls=2,
            observer=log,
        )
        for client in clients
    ]
    await fail(workers[0], 3)
    clock.advance(120.0)

    async def try_acquire(worker: CircuitBreaker) -> Permit | None:
        try:
            return await worker.acquire()
        except CircuitOpenError:
            return None

    results = await asyncio.gather(*(try_acquire(workers[i % 2]) for i in range(20)))

    probes = [permit for permit in results if permit is not None]
    assert len(probes) == 2
    assert all(permit.probe for permit in probes)
    assert log.transitions == [(CLOSED, OPEN), (OPEN, HALF_OPEN)]


async def test_concurrent_failures_open_the_breaker_exactly_once(
    clients: tuple[Redis, Redis], prefix: str, log: EventLog
) -> None:
    workers = [
        CircuitBreaker(NAME, RedisBreakerStore(client, key_prefix=prefix), observer=log)
        for client in clients
    ]
    permits = [await workers[i % 2].acquire() for i in range(10)]

    await asyncio.gather(
        *(workers[i % 2].record_failure(permit) for i, permit in enumerate(permits))
    )

    assert log.transitions == [(CLOSED, OPEN)]
    assert (await workers[0].snapshot()).open_count == 1


async def test_probe_success_on_one_instance_closes_the_breaker_for_all(
    clients: tuple[Redis, Redis], prefix: str
) -> None:
    clock = FakeClock()
    worker_a, worker_b = (
        CircuitBreaker(NAME, RedisBreakerStore(client, key_prefix=prefix, clock=clock))
        for client in clients
    )
    await fail(worker_a, 3)
    clock.advance(120.0)
    probe = await worker_a.acquire()
    with pytest.raises(CircuitOpenError):
        await worker_b.acquire()

    await worker_a.record_success(probe)

    assert not (await worker_b.acquire()).probe
    assert (await worker_b.snapshot()).state is CLOSED


# --- Redis down, silent, and back ------------------------------------------------


async def test_redis_down_answers_from_in_process_state(
    proxy: FaultProxy, prefix: str, log: EventLog
) -> None:
    proxy.set_mode("down")
    client = fast_client(proxy.url_for())
    store = FailoverBreakerStore(
        RedisBreakerStore(client, key_prefix=prefix), budget_seconds=0.1, observer=log
    )
    breaker = CircuitBreaker(NAME, store, observer=log)
    try:
        await fail(breaker, 3)

        with pytest.raises(CircuitOpenError):
            await breaker.acquire()
        assert store.degraded
        assert isinstance(store.last_error, RedisConnectionError)
        assert log.store_errors
        assert (await breaker.snapshot()).store_degraded
        assert log.transitions == [(CLOSED, OPEN)]
    finally:
        await client.aclose()


async def test_silent_redis_without_socket_timeout_is_cut_by_the_budget(
    proxy: FaultProxy, prefix: str, log: EventLog
) -> None:
    # No socket timeout at all: only the store's own budget can end the wait.
    client = fast_client(proxy.url_for(), socket_timeout=None)
    store = FailoverBreakerStore(
        RedisBreakerStore(client, key_prefix=prefix), budget_seconds=0.05, observer=log
    )
    breaker = CircuitBreaker(NAME, store, observer=NullObserver())
    try:
        await client.ping()  # connect while Redis still answers
        proxy.set_mode("blackhole")

        async with asyncio.timeout(30):  # hang guard only; the budget is 50 ms
            permit = await breaker.acquire()
            await breaker.record_success(permit)

        assert store.degraded
        assert isinstance(store.last_error, TimeoutError)
    finally:
        await client.aclose()


async def test_state_is_shared_again_after_redis_returns(
    proxy: FaultProxy, clients: tuple[Redis, Redis], prefix: str, log: EventLog
) -> None:
    clock = FakeClock()  # drives the store's retry interval only; Redis uses TIME
    # Generous timeouts: reconnecting through the proxy on a loaded CI machine must
    # not be mistaken for an outage. The black hole is cut by the budget.
    proxied = fast_client(proxy.url_for(), socket_timeout=2.0)
    store = FailoverBreakerStore(
        RedisBreakerStore(proxied, key_prefix=prefix),
        budget_seconds=0.5,
        retry_interval_seconds=1.0,
        clock=clock,
        observer=log,
    )
    worker_a = CircuitBreaker(NAME, store, observer=NullObserver())
    worker_b = CircuitBreaker(NAME, RedisBreakerStore(clients[1], key_prefix=prefix))
    try:
        proxy.set_mode("blackhole")
        await fail(worker_a, 3)  # opens worker A's in-process breaker only
        assert store.degraded
        assert (await worker_b.snapshot()).state is CLOSED

        proxy.set_mode("pass")
        clock.advance(0.5)
        assert store.degraded  # still inside the retry interval: Redis not tried yet
        clock.advance(0.5)
        await worker_a.snapshot()  # the first operation after the interval tries Redis

        assert not store.degraded
        assert log.recoveries == 1
        await fail(worker_a, 3)
        with pytest.raises(CircuitOpenError):
            await worker_b.acquire()
    finally:
        await proxied.aclose()


async def test_a_gate_closed_by_another_part_is_not_reported_as_a_store_fallback(
    clients: tuple[Redis, Redis], prefix: str, log: EventLog
) -> None:
    clock = FakeClock()
    gate = RedisGate(1.0, clock=clock)
    store = FailoverBreakerStore(
        RedisBreakerStore(clients[0], key_prefix=prefix), clock=clock, gate=gate, observer=log
    )
    gate.report_failure()  # the rate limiter, say, just saw Redis fail

    snapshot = await CircuitBreaker(NAME, store, observer=NullObserver()).snapshot()

    assert snapshot.store_degraded
    assert log.store_errors == []
