"""The request deadline holds whatever the awaited code does with its cancellation.

The cause this guards against: on CPython 3.11, `asyncio.wait_for` returns
normally when the cancellation sent to its task races with the completion of
what it waits for (the cancellation is lost; fixed in 3.12, where `wait_for` is
built on `asyncio.timeout`). redis-py 8 sends every command through `wait_for`,
so a deadline that fired while a breaker check was talking to Redis could be
lost, and the rung then ran on, bounded only by the SDK's read timeout.
`asyncio.timeout` cancels once; `run_within` does not rely on the cancellation
arriving. No test here measures time: each asserts the order of events.
"""

from __future__ import annotations

import asyncio
import sys

import pytest

from app.core.resilience import Deadline, DeadlineExceededError, run_within

NEVER = 3600.0


async def wait_for_completions(stop_after: float) -> str:
    """What redis-py does on every command: `wait_for` on a future that completes
    in the next loop iteration. Returns "ran on" if it gets past `stop_after`."""
    loop = asyncio.get_running_loop()
    while loop.time() < stop_after:
        done = loop.create_future()
        loop.call_soon(done.set_result, None)
        await asyncio.wait_for(done, NEVER)
    return "ran on"


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="asyncio.wait_for keeps it from 3.12 on")
async def test_asyncio_timeout_alone_loses_the_deadline_inside_wait_for() -> None:
    # The reproduction: of many short deadlines around such a loop, some are lost.
    loop = asyncio.get_running_loop()
    outcomes = []
    for _ in range(40):
        try:
            async with asyncio.timeout(0.002):
                outcomes.append(await wait_for_completions(loop.time() + 0.05))
        except TimeoutError:
            outcomes.append("cut")

    assert "ran on" in outcomes


async def test_run_within_never_loses_the_deadline_inside_wait_for() -> None:
    loop = asyncio.get_running_loop()
    outcomes = []
    for _ in range(40):
        try:
            outcomes.append(
                await run_within(
                    Deadline.after(0.002),
                    lambda: wait_for_completions(loop.time() + 0.05),
                )
            )
        except DeadlineExceededError:
            outcomes.append("cut")

    assert outcomes == ["cut"] * 40


async def test_the_caller_is_answered_while_a_call_that_swallows_cancellation_runs_on() -> None:
    events: list[str] = []
    swallowed, never = asyncio.Event(), asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.sleep(NEVER)
        except asyncio.CancelledError:
            events.append("swallowed")
            swallowed.set()
        await never.wait()
        events.append("finished")

    async with asyncio.timeout(30):  # hang guard only
        with pytest.raises(DeadlineExceededError):
            await run_within(Deadline.after(0.01), stubborn)
        events.append("answered")
        await swallowed.wait()

    assert events == ["answered", "swallowed"]


async def test_a_call_given_up_on_is_cancelled_again_until_it_stops() -> None:
    cancellations = 0
    stopped = asyncio.Event()

    async def stubborn() -> None:
        nonlocal cancellations
        try:
            while True:
                try:
                    await asyncio.sleep(NEVER)
                except asyncio.CancelledError:
                    cancellations += 1
                    if cancellations == 3:
                        raise
        finally:
            stopped.set()

    async with asyncio.timeout(30):  # hang guard only
        with pytest.raises(DeadlineExceededError):
            await run_within(Deadline.after(0.01), stubborn)
        await stopped.wait()

    assert cancellations == 3


async def test_a_cancelled_caller_cancels_the_call() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def call() -> None:
        started.set()
        try:
            await asyncio.sleep(NEVER)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    caller = asyncio.create_task(run_within(Deadline.after(NEVER), call))
    await started.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    async with asyncio.timeout(30):  # hang guard only
        await cancelled.wait()


async def test_the_call_sees_the_context_of_its_caller() -> None:
    from app.core.resilience import current_deadline, deadline_scope

    with deadline_scope(NEVER) as deadline:

        async def call() -> Deadline | None:
            return current_deadline()

        seen = await run_within(None, call)

    assert seen == deadline
