"""The Guard feeds the adaptive limit and the quota: what each outcome says about the
upstream, and what a call that never reached it gives back."""

from __future__ import annotations

import pytest

from app.core.resilience import (
    Bulkhead,
    CircuitBreaker,
    CircuitOpenError,
    GradientLimit,
    QuotaExhaustedError,
    QuotaGovernor,
    QuotaLimits,
    RetryPolicy,
    deadline_scope,
)
from app.core.resilience.stores import InMemoryBreakerStore
from app.core.resilience.testing import FakeClock
from app.providers.base import (
    GeneratedStory,
    ProviderRejectedError,
    ProviderTimeoutError,
    StoryRequest,
    Usage,
)
from app.providers.resilient import Guard, ResilientStoryProvider, estimate_tokens


def build(
    clock: FakeClock, *, quota: QuotaGovernor | None = None, threshold: int = 5
) -> tuple[Guard, GradientLimit]:
    limit = GradientLimit(initial=50, min_limit=1, max_limit=100, clock=clock)
    return (
        Guard(
            provider="openai",
            operation="chat",
            breaker=CircuitBreaker(
                "openai:chat", InMemoryBreakerStore(clock=clock), failure_threshold=threshold
            ),
            bulkhead=Bulkhead("openai:chat", limit, None, clock=clock),
            policy=RetryPolicy(max_retries=0, sleep=clock.sleep),
            quota=quota,
        ),
        limit,
    )


def story(tokens: int) -> GeneratedStory:
    return GeneratedStory(
        title="T", paragraphs=("p",), provider="openai", model="m", usage=Usage(tokens, 0)
    )


async def test_an_upstream_timeout_shrinks_the_limit() -> None:
    clock = FakeClock()
    guard, limit = build(clock)

    async def timing_out() -> str:
        raise ProviderTimeoutError("openai", "no reply")

    with pytest.raises(ProviderTimeoutError):
        await guard.run(timing_out)

    assert limit.limit == 45


async def test_our_own_bad_request_says_nothing_about_load() -> None:
    clock = FakeClock()
    guard, limit = build(clock)

    async def rejected() -> str:
        raise ProviderRejectedError("openai", "HTTP 400")

    with pytest.raises(ProviderRejectedError):
        await guard.run(rejected)

    assert limit.limit == 50
    assert limit.rtt is None


async def test_an_answer_is_a_latency_sample() -> None:
    clock = FakeClock()
    guard, limit = build(clock)

    async def answered() -> str:
        clock.advance(2.0)
        return "story"

    assert await guard.run(answered) == "story"
    assert limit.rtt == pytest.approx(2.0)


async def test_a_call_refused_by_the_breaker_gives_its_quota_back() -> None:
    clock = FakeClock()
    quota = QuotaGovernor("openai", QuotaLimits(requests_per_minute=2), clock=clock)
    guard, _ = build(clock, quota=quota, threshold=1)

    async def failing() -> str:
        raise ProviderTimeoutError("openai", "no reply")

    with deadline_scope(10.0, clock=clock):
        with pytest.raises(ProviderTimeoutError):
            await guard.run(failing)  # sent: one of the two requests is spent; it opens
        with pytest.raises(CircuitOpenError):
            await guard.run(failing)  # reserved the other, refused before it was sent ...
        await quota.settled()
        await quota.acquire(0)  # ... and gave it back
        with pytest.raises(QuotaExhaustedError):
            await quota.acquire(0)


async def test_the_reply_usage_corrects_the_token_estimate() -> None:
    clock = FakeClock()
    quota = QuotaGovernor("openai", QuotaLimits(tokens_per_minute=1000), clock=clock)
    guard, _ = build(clock, quota=quota)

    async def written() -> GeneratedStory:
        return story(100)

    with deadline_scope(10.0, clock=clock):
        await guard.run(written, tokens=900)
        await quota.settled()
        await quota.acquire(850)  # 900 reserved, 100 used: 800 given back


def test_a_story_estimate_covers_its_longest_answer() -> None:
    short = StoryRequest("a cat", 4, "short", "en")
    long = StoryRequest("a cat", 11, "long", "en")

    assert estimate_tokens(long) > estimate_tokens(short)
    assert estimate_tokens(long) >= 8 * 120  # eight paragraphs of up to 120 words


async def test_the_story_provider_reserves_its_estimate() -> None:
    clock = FakeClock()
    request = StoryRequest("a cat", 6, "medium", "en")
    quota = QuotaGovernor(
        "openai", QuotaLimits(tokens_per_minute=estimate_tokens(request)), clock=clock
    )
    guard, _ = build(clock, quota=quota)

    class Writer:
        name = "openai"

        async def generate(self, request: StoryRequest) -> GeneratedStory:
            return story(0)  # no usage reported: the estimate stands

    provider = ResilientStoryProvider(Writer(), guard)
    with deadline_scope(10.0, clock=clock):
        await provider.generate(request)
        with pytest.raises(QuotaExhaustedError) as spent:
            await provider.generate(request)

    assert spent.value.reason == "tokens"
