"""The Redis budget on a real Redis, while calls queue for the pool's connections.

A burst of requests on one worker queues for the client's connections (or opens
new ones); that wait is the process's, not a Redis round trip, and must not
close the gate. But once Redis is seen to fail, nothing keeps waiting for it.
The pool here has ONE connection, held by a call that Redis itself keeps for
a while (BLPOP on an empty list), so the next call has to queue behind it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from app.platform.redis import RedisBudget, RedisGate, RedisGateClosedError, open_redis

BUDGET = 0.05
ALLOWANCE = 5.0
HOLD_SECONDS = 1  # BLPOP's timeout: 20 budgets


def one_connection(redis_url: str) -> aioredis.Redis:
    return open_redis(
        redis_url,
        timeout_seconds=BUDGET,
        connect_timeout_seconds=1.0,
        max_connections=1,
        lag_allowance_seconds=ALLOWANCE,
    )


async def hold_the_connection(redis: aioredis.Redis) -> asyncio.Task[object]:
    """A task holding the pool's only connection for HOLD_SECONDS (a real round trip)."""

    async def blpop() -> object:
        return await redis.blpop(["story:test:empty"], timeout=HOLD_SECONDS)

    await redis.ping()  # the connection exists, idle in the pool
    holder = asyncio.create_task(blpop())
    await asyncio.sleep(0)  # the holder takes it (a free connection costs no await)
    assert redis.connection_pool._in_use_connections
    return holder


async def local() -> str:
    return "local"


def pinger(redis: aioredis.Redis) -> Callable[[], Awaitable[str]]:
    async def ping() -> str:
        return "redis" if await redis.ping() else "?"

    return ping


def budget_on(gate: RedisGate) -> RedisBudget:
    return RedisBudget(budget_seconds=BUDGET, retry_seconds=1.0, gate=gate)


async def test_a_call_queued_for_a_connection_is_not_held_against_redis(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    redis = one_connection(redis_url)
    gate = RedisGate(1.0, lag_allowance_seconds=ALLOWANCE)
    budget = budget_on(gate)
    ping = pinger(redis)
    try:
        holder = await hold_the_connection(redis)
        outcome = await budget.run(ping, local)
        held_until_then = holder.done()
        await holder
    finally:
        await redis.aclose()

    # It waited for the BLPOP to give the connection back (20 budgets), then
    # had its round trip: answered by Redis, and nothing was degraded.
    assert held_until_then
    assert outcome == ("redis", True)
    assert not budget.degraded
    assert gate.is_open()


async def test_calls_waiting_for_a_connection_are_cut_when_redis_is_seen_to_fail(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    redis = one_connection(redis_url)
    gate = RedisGate(1.0, lag_allowance_seconds=ALLOWANCE)
    waiting = budget_on(gate)
    failing = budget_on(gate)
    ping = pinger(redis)

    async def refused() -> str:
        raise RedisConnectionError("Connection refused")

    try:
        holder = await hold_the_connection(redis)
        waiter = asyncio.create_task(waiting.run(ping, local))
        await asyncio.sleep(BUDGET * 2)  # queued past its budget, still waiting
        still_waiting = not waiter.done()
        await failing.run(refused, local)  # another part sees Redis fail
        outcome = await waiter
        holder_still_held = not holder.done()
        await holder
    finally:
        await redis.aclose()

    assert still_waiting
    # Cut at once, long before the connection came back, and answered in-process...
    assert holder_still_held
    assert outcome == ("local", False)
    # ...as a part behind a closed gate, not as a Redis failure of its own.
    assert waiting.degraded
    assert isinstance(waiting.last_error, RedisGateClosedError)
    assert isinstance(failing.last_error, RedisConnectionError)


async def test_a_slow_round_trip_still_overruns_the_budget(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    """Only the wait for a connection is excused: a reply Redis itself keeps
    (BLPOP, on a connection the call already holds) is a failure."""
    redis = one_connection(redis_url)
    gate = RedisGate(1.0, lag_allowance_seconds=ALLOWANCE)
    budget = budget_on(gate)

    async def slow() -> str:
        await redis.blpop(["story:test:empty"], timeout=HOLD_SECONDS)
        return "redis"

    try:
        await redis.ping()  # the connection exists: no connect inside the call
        outcome = await budget.run(slow, local)
    finally:
        await redis.aclose()

    assert outcome == ("local", False)
    assert budget.degraded
    assert isinstance(budget.last_error, TimeoutError)
    assert not gate.is_open()


async def test_a_call_that_never_gets_a_connection_is_answered_here_without_blaming_redis(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    """The allowance bounds a wait for a connection too: past it, the call is
    answered in-process, but Redis did not fail, so nothing else goes in-process."""
    allowance = 0.2  # well under the BLPOP's hold
    redis = open_redis(
        redis_url,
        timeout_seconds=BUDGET,
        connect_timeout_seconds=1.0,
        max_connections=1,
        lag_allowance_seconds=allowance,
    )
    gate = RedisGate(1.0, lag_allowance_seconds=allowance)
    budget = budget_on(gate)
    ping = pinger(redis)
    pool = redis.connection_pool
    try:
        taken = await pool.get_connection()  # the only connection, out of the pool
        outcome = await budget.run(ping, local)
        await pool.release(taken)
        after = await budget.run(ping, local)
    finally:
        await redis.aclose()

    assert outcome == ("local", False)
    assert budget.local_wait_timeouts == 1
    assert not budget.degraded
    assert gate.is_open()
    assert after == ("redis", True)
