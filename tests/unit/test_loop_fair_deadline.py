"""LoopFairDeadline: the Redis budget's clock does not count the event loop's own lag.

The loop is blocked the way a CPU-bound request handler blocks it: a task calls
`time.sleep` (synchronously) right after the awaited "reply" has been scheduled
to arrive. No assertion is about how long anything took.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from app.platform.redis import LoopFairDeadline, RedisBudget, RedisGate

BUDGET = 0.05
BLOCK = 0.3  # six budgets: the reply is there long before the loop can read it


async def block_the_loop(seconds: float) -> None:
    time.sleep(seconds)  # noqa: ASYNC251 - the point: a CPU-bound task holding the loop


async def reply_during_a_blocked_loop() -> str:
    """A reply that arrives after 1 ms, while another task holds the loop for BLOCK."""
    loop = asyncio.get_running_loop()
    reply: asyncio.Future[str] = loop.create_future()
    loop.call_later(0.001, reply.set_result, "answered")
    blocker = asyncio.ensure_future(block_the_loop(BLOCK))
    try:
        return await reply
    finally:
        await blocker


async def test_a_plain_wall_clock_timeout_blames_the_reply_for_the_loops_lag() -> None:
    # What the budget was before: the lag alone makes the call "time out".
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(BUDGET):
            await reply_during_a_blocked_loop()


async def test_the_loop_fair_deadline_lets_a_prompt_reply_through_a_blocked_loop() -> None:
    async with LoopFairDeadline(BUDGET, lag_allowance_seconds=5.0) as deadline:
        result = await reply_during_a_blocked_loop()

    assert result == "answered"
    assert deadline.extensions >= 1
    assert not deadline.expired


async def test_without_an_allowance_it_is_a_plain_timeout() -> None:
    with pytest.raises(TimeoutError):
        async with LoopFairDeadline(BUDGET, lag_allowance_seconds=0.0):
            await reply_during_a_blocked_loop()


async def test_a_silent_peer_still_times_out_on_a_responsive_loop() -> None:
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    with pytest.raises(TimeoutError):
        async with LoopFairDeadline(BUDGET, lag_allowance_seconds=5.0) as deadline:
            await never

    assert deadline.expired
    assert deadline.extensions == 0


async def test_a_silent_peer_on_a_blocked_loop_times_out_at_the_allowance() -> None:
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def keep_blocking() -> None:
        while True:
            await block_the_loop(0.03)
            await asyncio.sleep(0)

    blocker = asyncio.ensure_future(keep_blocking())
    try:
        with pytest.raises(TimeoutError):
            async with LoopFairDeadline(BUDGET, lag_allowance_seconds=0.2) as deadline:
                await never
    finally:
        blocker.cancel()
        with pytest.raises(asyncio.CancelledError):
            await blocker

    assert deadline.expired


async def test_an_outer_cancellation_is_not_turned_into_a_timeout() -> None:
    started = asyncio.Event()

    async def waits() -> None:
        async with LoopFairDeadline(10.0, lag_allowance_seconds=1.0):
            started.set()
            await asyncio.sleep(10)

    task = asyncio.ensure_future(waits())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_the_budget_keeps_redis_when_only_the_loop_was_slow() -> None:
    gate = RedisGate(1.0, lag_allowance_seconds=5.0)
    budget = RedisBudget(budget_seconds=BUDGET, retry_seconds=1.0, gate=gate)

    async def local() -> str:
        return "local"

    result, from_redis = await budget.run(reply_during_a_blocked_loop, local)

    assert (result, from_redis) == ("answered", True)
    assert not budget.degraded
    assert gate.is_open()


async def test_a_budget_without_an_allowance_closes_the_gate_on_loop_lag() -> None:
    gate = RedisGate(1.0, lag_allowance_seconds=0.0)
    budget = RedisBudget(budget_seconds=BUDGET, retry_seconds=1.0, gate=gate)

    async def local() -> str:
        return "local"

    result, from_redis = await budget.run(reply_during_a_blocked_loop, local)

    assert (result, from_redis) == ("local", False)
    assert budget.degraded
    assert not gate.is_open()


def test_a_negative_allowance_is_refused() -> None:
    with pytest.raises(ValueError, match="lag_allowance_seconds"):
        RedisGate(lag_allowance_seconds=-1.0)
