"""RedisBudget: Redis within a time budget, in-process when it is not there.

Driven by a FakeClock and scripted async callables standing in for Redis and for
the in-process store; no real Redis is involved.
"""

from __future__ import annotations

import asyncio

import pytest

from app.core.resilience.testing import FakeClock
from app.platform.redis import RedisBudget, RedisGate


class Recorder:
    """A `BudgetListener` that remembers every call."""

    def __init__(self) -> None:
        self.failures: list[tuple[BaseException, str, bool]] = []
        self.gate_closings = 0
        self.recoveries = 0

    def redis_failed(self, error: BaseException, operation: str, *, first: bool) -> None:
        self.failures.append((error, operation, first))

    def gate_closed(self) -> None:
        self.gate_closings += 1

    def recovered(self) -> None:
        self.recoveries += 1


class Redis:
    """Answers "redis" or raises the queued errors in order; counts its calls."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "redis"


async def local() -> str:
    return "local"


RETRY_SECONDS = 5.0
GATE_SECONDS = 1.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def gate(clock: FakeClock) -> RedisGate:
    return RedisGate(GATE_SECONDS, clock=clock)


@pytest.fixture
def listener() -> Recorder:
    return Recorder()


@pytest.fixture
def budget(clock: FakeClock, gate: RedisGate, listener: Recorder) -> RedisBudget:
    return RedisBudget(
        budget_seconds=1.0,
        retry_seconds=RETRY_SECONDS,
        gate=gate,
        clock=clock,
        listener=listener,
    )


async def fail_once(budget: RedisBudget) -> None:
    await budget.run(Redis(ConnectionError("refused")), local)


# --- a failure ---------------------------------------------------------------------


async def test_a_failure_is_answered_in_process(budget: RedisBudget) -> None:
    result = await budget.run(Redis(ConnectionError("refused")), local)

    assert result == ("local", False)
    assert budget.degraded


async def test_a_failure_closes_the_gate(budget: RedisBudget, gate: RedisGate) -> None:
    await fail_once(budget)

    assert not gate.is_open()


async def test_a_failure_is_reported_as_the_first_of_an_outage(
    budget: RedisBudget, listener: Recorder
) -> None:
    error = ConnectionError("refused")

    await budget.run(Redis(error), local, operation="acquire")

    assert listener.failures == [(error, "acquire", True)]


async def test_overrunning_the_budget_is_a_failure(clock: FakeClock, listener: Recorder) -> None:
    budget = RedisBudget(budget_seconds=0.01, clock=clock, listener=listener)

    async def silent_redis() -> str:
        await asyncio.sleep(1.0)
        return "redis"

    async with asyncio.timeout(5):  # a hang guard only; the budget is 10 ms
        result = await budget.run(silent_redis, local)

    assert result == ("local", False)
    assert [type(error) for error, _, _ in listener.failures] == [TimeoutError]


# --- degraded ----------------------------------------------------------------------


async def test_redis_is_not_tried_again_within_retry_seconds(
    budget: RedisBudget, clock: FakeClock
) -> None:
    await fail_once(budget)
    clock.advance(RETRY_SECONDS - 0.1)  # the gate has long reopened
    redis = Redis()

    result = await budget.run(redis, local)

    assert result == ("local", False)
    assert redis.calls == 0


async def test_after_retry_seconds_exactly_one_concurrent_caller_probes_redis(
    budget: RedisBudget, clock: FakeClock
) -> None:
    await fail_once(budget)
    clock.advance(RETRY_SECONDS)
    answer = asyncio.Event()
    probes = 0

    async def slow_redis() -> str:
        nonlocal probes
        probes += 1
        await answer.wait()
        return "redis"

    probe = asyncio.create_task(budget.run(slow_redis, local))
    await asyncio.sleep(0)  # the probe is now waiting on Redis
    others = await asyncio.gather(*(budget.run(slow_redis, local) for _ in range(5)))
    answer.set()

    assert await probe == ("redis", True)
    assert others == [("local", False)] * 5
    assert probes == 1


async def test_a_successful_probe_ends_the_degradation(
    budget: RedisBudget, clock: FakeClock
) -> None:
    await fail_once(budget)
    clock.advance(RETRY_SECONDS)

    result = await budget.run(Redis(), local)

    assert result == ("redis", True)
    assert not budget.degraded


async def test_recovery_is_reported_once(
    budget: RedisBudget, clock: FakeClock, listener: Recorder
) -> None:
    await fail_once(budget)
    clock.advance(RETRY_SECONDS)

    for _ in range(3):
        await budget.run(Redis(), local)

    assert listener.recoveries == 1


# --- behind a gate closed by another part ------------------------------------------


async def test_a_closed_gate_makes_the_part_degraded_without_trying_redis(
    budget: RedisBudget, gate: RedisGate
) -> None:
    gate.report_failure()  # another part of the process saw Redis fail
    redis = Redis()

    result = await budget.run(redis, local)

    assert result == ("local", False)
    assert budget.degraded
    assert redis.calls == 0


async def test_a_closed_gate_is_reported_once_and_not_as_a_failure(
    budget: RedisBudget, gate: RedisGate, listener: Recorder
) -> None:
    gate.report_failure()

    for _ in range(3):
        await budget.run(Redis(), local)

    assert listener.gate_closings == 1
    assert listener.failures == []


async def test_going_in_process_behind_a_closed_gate_does_not_close_it_again(
    budget: RedisBudget, gate: RedisGate, clock: FakeClock
) -> None:
    gate.report_failure()
    clock.advance(GATE_SECONDS / 2)

    await budget.run(Redis(), local)
    clock.advance(GATE_SECONDS / 2)

    assert gate.is_open()


async def test_a_closed_gate_does_not_delay_the_next_try(
    budget: RedisBudget, gate: RedisGate, clock: FakeClock
) -> None:
    gate.report_failure()
    await budget.run(Redis(), local)
    clock.advance(GATE_SECONDS)  # well within RETRY_SECONDS
    redis = Redis()

    result = await budget.run(redis, local)

    assert result == ("redis", True)
    assert redis.calls == 1
