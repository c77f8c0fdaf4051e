"""The Redis budget on a real Redis, while a CPU-bound callback holds the event loop.

Each call is followed at once by a callback that blocks the loop (a synchronous
`time.sleep`, as a CPU-heavy request handler would) for several budgets. Redis
answers in well under a millisecond meanwhile; the budget must keep breaker,
limiter and cache state shared. No assertion is about how long anything took.
"""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis

from app.core.resilience import BreakerConfig
from app.core.resilience.stores.failover import FailoverBreakerStore
from app.core.resilience.stores.redis import RedisBreakerStore
from app.platform.redis import RedisBudget, RedisGate, open_redis

BUDGET = 0.05
ALLOWANCE = 5.0
BLOCK = 0.2


def client(redis_url: str) -> aioredis.Redis:
    return open_redis(
        redis_url,
        timeout_seconds=BUDGET,
        connect_timeout_seconds=1.0,
        max_connections=4,
        lag_allowance_seconds=ALLOWANCE,
    )


def block_the_loop_soon() -> None:
    asyncio.get_running_loop().call_later(0.001, time.sleep, BLOCK)


async def test_a_blocked_loop_does_not_close_the_gate(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    redis = client(redis_url)
    gate = RedisGate(1.0, lag_allowance_seconds=ALLOWANCE)
    budget = RedisBudget(budget_seconds=BUDGET, retry_seconds=1.0, gate=gate)

    async def ping() -> bool:
        block_the_loop_soon()
        return bool(await redis.ping())

    async def local() -> bool:
        return False

    try:
        await redis.ping()
        outcomes = [await budget.run(ping, local) for _ in range(5)]
    finally:
        await redis.aclose()

    assert outcomes == [(True, True)] * 5
    assert not budget.degraded
    assert gate.is_open()


async def test_breaker_state_stays_in_redis_while_the_loop_is_blocked(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    redis = client(redis_url)
    store = FailoverBreakerStore(
        RedisBreakerStore(redis),
        budget_seconds=BUDGET,
        gate=RedisGate(1.0, lag_allowance_seconds=ALLOWANCE),
    )
    config = BreakerConfig(failure_threshold=3)
    try:
        for _ in range(3):
            block_the_loop_soon()
            admission = await store.acquire("lagged", config)
            assert admission.permit is not None
            block_the_loop_soon()
            await store.on_failure(admission.permit, config)
        block_the_loop_soon()
        snapshot = await store.snapshot("lagged", config)
    finally:
        await redis.aclose()

    assert not store.degraded
    assert snapshot.store_degraded is False
    assert str(snapshot.state) == "open"
    assert await redis_client.exists("story:breaker:lagged")
