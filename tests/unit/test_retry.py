"""RetryPolicy, RetryBudget and retry_on_failure, driven by a FakeClock (nothing waits)."""

from __future__ import annotations

import asyncio
import random

import pytest

from app.core.resilience import (
    CircuitOpenError,
    Deadline,
    NullObserver,
    RetryBudget,
    RetryPolicy,
    deadline_scope,
    retry_on_failure,
)
from app.core.resilience.testing import FakeClock, instant_retry_policy
from app.providers.base import (
    ProviderRateLimitedError,
    ProviderRejectedError,
    ProviderUnavailableError,
)


class RecordingObserver(NullObserver):
    def __init__(self) -> None:
        self.retries: list[tuple[str, int, float]] = []
        self.exhausted: list[str] = []

    def retry(self, name: str, attempt: int, delay: float, error: BaseException) -> None:
        self.retries.append((name, attempt, delay))

    def budget_exhausted(self, name: str) -> None:
        self.exhausted.append(name)


class Upstream:
    """Raises the queued errors in order, then answers "ok"; counts its calls."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


class UpperBoundRng(random.Random):
    """Jitter that always picks the largest allowed delay."""

    def uniform(self, a: float, b: float) -> float:
        return b


def unavailable() -> ProviderUnavailableError:
    return ProviderUnavailableError("openai", "503")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def observer() -> RecordingObserver:
    return RecordingObserver()


@pytest.fixture
def policy(clock: FakeClock, observer: RecordingObserver) -> RetryPolicy:
    return RetryPolicy(name="openai:chat", sleep=clock.sleep, observer=observer)


async def test_delays_are_full_jitter_of_the_doubling_ceiling(clock: FakeClock) -> None:
    policy = RetryPolicy(sleep=clock.sleep, rng=random.Random(7), observer=NullObserver())
    upstream = Upstream(unavailable(), unavailable(), unavailable())

    assert await policy.call(upstream) == "ok"

    expected_rng = random.Random(7)
    assert clock.sleeps == [expected_rng.uniform(0, ceiling) for ceiling in (1.0, 2.0, 4.0)]


async def test_delays_are_capped_at_max_delay(clock: FakeClock) -> None:
    policy = RetryPolicy(
        max_retries=5,
        max_delay=3.0,
        sleep=clock.sleep,
        rng=UpperBoundRng(),
        observer=NullObserver(),
    )

    await policy.call(Upstream(*(unavailable() for _ in range(5))))

    assert clock.sleeps == [1.0, 2.0, 3.0, 3.0, 3.0]


async def test_makes_exactly_max_retries_plus_one_attempts(
    policy: RetryPolicy, observer: RecordingObserver
) -> None:
    upstream = Upstream(*(unavailable() for _ in range(10)))

    with pytest.raises(ProviderUnavailableError):
        await policy.call(upstream)

    assert upstream.calls == 4
    assert [attempt for _, attempt, _ in observer.retries] == [1, 2, 3]


async def test_non_retryable_error_is_attempted_once(policy: RetryPolicy) -> None:
    upstream = Upstream(ProviderRejectedError("openai", "400 bad request"))

    with pytest.raises(ProviderRejectedError):
        await policy.call(upstream)

    assert upstream.calls == 1


async def test_open_circuit_is_not_retried(policy: RetryPolicy, clock: FakeClock) -> None:
    upstream = Upstream(CircuitOpenError("openai:chat", retry_after=5.0))

    with pytest.raises(CircuitOpenError):
        await policy.call(upstream)

    assert upstream.calls == 1
    assert clock.sleeps == []


async def test_retry_after_is_waited_exactly_instead_of_the_backoff(
    policy: RetryPolicy, clock: FakeClock
) -> None:
    upstream = Upstream(ProviderRateLimitedError("openai", "429", retry_after=2.0))

    assert await policy.call(upstream) == "ok"

    assert clock.sleeps == [2.0]


async def test_retry_after_above_the_ceiling_reraises_without_sleeping(
    policy: RetryPolicy, clock: FakeClock
) -> None:
    upstream = Upstream(ProviderRateLimitedError("openai", "429", retry_after=31.0))

    with pytest.raises(ProviderRateLimitedError):
        await policy.call(upstream)

    assert upstream.calls == 1
    assert clock.sleeps == []


async def test_wait_past_the_current_deadline_reraises_without_sleeping(
    clock: FakeClock,
) -> None:
    policy = RetryPolicy(sleep=clock.sleep, rng=UpperBoundRng(), observer=NullObserver())
    # Waits would be 1 s then 2 s; after the first only 1.5 s remain.
    upstream = Upstream(unavailable(), unavailable(), unavailable())

    with deadline_scope(2.5, clock=clock), pytest.raises(ProviderUnavailableError):
        await policy.call(upstream)

    assert clock.sleeps == [1.0]
    assert upstream.calls == 2


async def test_explicit_deadline_bounds_the_retries(clock: FakeClock) -> None:
    policy = RetryPolicy(sleep=clock.sleep, observer=NullObserver())
    upstream = Upstream(ProviderRateLimitedError("openai", "429", retry_after=5.0))

    with pytest.raises(ProviderRateLimitedError):
        await policy.run(upstream, deadline=Deadline.after(4.0, clock=clock))

    assert clock.sleeps == []


async def test_budget_stops_retries_but_not_first_attempts(
    clock: FakeClock, observer: RecordingObserver
) -> None:
    budget = RetryBudget(ratio=0.2, min_retries_per_window=3, window_seconds=10.0, clock=clock)
    policy = RetryPolicy(name="openai:chat", budget=budget, sleep=no_clock_sleep, observer=observer)

    first = Upstream(*(unavailable() for _ in range(10)))
    with pytest.raises(ProviderUnavailableError):
        await policy.call(first)
    second = Upstream(*(unavailable() for _ in range(10)))
    with pytest.raises(ProviderUnavailableError):
        await policy.call(second)

    assert (first.calls, second.calls) == (4, 1)
    assert observer.exhausted == ["openai:chat"]


async def test_budget_refills_when_the_window_slides(clock: FakeClock) -> None:
    budget = RetryBudget(ratio=0.0, min_retries_per_window=1, window_seconds=10.0, clock=clock)
    policy = RetryPolicy(name="replicate:text", budget=budget, sleep=no_clock_sleep)
    await policy.call(Upstream(unavailable()))

    clock.advance(10.5)
    upstream = Upstream(unavailable())

    assert await policy.call(upstream) == "ok"
    assert upstream.calls == 2


async def test_budget_is_kept_per_upstream_name(clock: FakeClock) -> None:
    budget = RetryBudget(ratio=0.0, min_retries_per_window=1, clock=clock)
    openai = instant_retry_policy(name="openai:chat", budget=budget)
    replicate = instant_retry_policy(name="replicate:text", budget=budget)
    await openai.call(Upstream(unavailable()))

    upstream = Upstream(unavailable())

    assert await replicate.call(upstream) == "ok"


async def test_cancellation_is_never_retried(clock: FakeClock) -> None:
    policy = RetryPolicy(sleep=clock.sleep, is_retryable=lambda error: True)
    upstream = Upstream(asyncio.CancelledError())

    with pytest.raises(asyncio.CancelledError):
        await policy.call(upstream)

    assert upstream.calls == 1
    assert clock.sleeps == []


async def test_async_decorator_retries_then_answers(clock: FakeClock) -> None:
    calls: list[int] = []

    @retry_on_failure(max_retries=3, delay=1.0, sleep=clock.sleep, rng=UpperBoundRng())
    async def generate(prompt: str) -> str:
        calls.append(1)
        if len(calls) < 3:
            raise unavailable()
        return prompt.upper()

    assert await generate("dragon") == "DRAGON"
    assert clock.sleeps == [1.0, 2.0]


def test_decorating_a_plain_function_raises_type_error() -> None:
    def fetch() -> str:
        return "ok"

    with pytest.raises(TypeError, match="async function"):
        retry_on_failure(max_retries=2)(fetch)  # type: ignore[type-var]


async def test_instant_retry_policy_never_waits() -> None:
    policy = instant_retry_policy(base_delay=3600.0)

    async with asyncio.timeout(5):  # a safety net only: a real wait would be an hour
        assert await policy.call(Upstream(unavailable(), unavailable())) == "ok"


async def no_clock_sleep(seconds: float) -> None:
    """A sleep that moves no clock, so the budget window stays put."""
