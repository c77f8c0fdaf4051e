"""The only place resilience wraps a provider.

Each upstream call goes through, outermost first:

    deadline (the request's, from `deadline_scope`)
      -> retry policy (full jitter, Retry-After, retry budget; stops at the deadline)
        -> bulkhead (per upstream: bounded concurrency, bounded wait)
          -> circuit breaker (per upstream and operation; shared state in Redis)
            -> the SDK call (its own retries off)

Retries sit outside the bulkhead and the breaker (a deviation from the guide's
drawing, on purpose): a retry that is sleeping holds no concurrency slot, every
attempt is counted by the breaker, and once the breaker opens the next attempt is
refused at once (`CircuitOpenError` is not retryable), so retries stop exactly
when the breaker opens.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from app.core.resilience import (
    Bulkhead,
    CircuitBreaker,
    ResilienceError,
    RetryPolicy,
    run_within,
)
from app.providers.base import (
    GeneratedStory,
    Illustration,
    IllustrationProvider,
    ProviderError,
    ProviderResponseError,
    StoryProvider,
    StoryRequest,
)

T = TypeVar("T")


class UpstreamCallRecorder(Protocol):
    """Told about every attempt's outcome and duration (metrics)."""

    def __call__(self, provider: str, operation: str, outcome: str, seconds: float) -> None: ...


def ignore_call(provider: str, operation: str, outcome: str, seconds: float) -> None:
    return None


class Guard:
    """Deadline, retries, bulkhead and breaker around calls to one upstream operation."""

    def __init__(
        self,
        *,
        provider: str,
        operation: str,
        breaker: CircuitBreaker,
        bulkhead: Bulkhead,
        policy: RetryPolicy,
        record: UpstreamCallRecorder = ignore_call,
    ) -> None:
        self.provider = provider
        self.operation = operation
        self.breaker = breaker
        self.bulkhead = bulkhead
        self.policy = policy
        self._record = record

    async def run(self, call: Callable[[], Awaitable[T]]) -> T:
        async def attempt() -> T:
            async with self.bulkhead:
                return await self.breaker.call(self._timed, call)

        return await run_within(None, lambda: self.policy.run(attempt, name=self.breaker.name))

    async def _timed(self, call: Callable[[], Awaitable[T]]) -> T:
        started = time.perf_counter()
        outcome = "error"
        try:
            result = await call()
            outcome = "success"
            return result
        except (ProviderError, ResilienceError) as error:
            outcome = type(error).__name__
            raise
        except Exception as error:
            # An adapter let something unexpected through (an SDK surprise, a bug):
            # for the caller it is an unusable upstream reply, never a 500.
            outcome = "ProviderResponseError"
            raise ProviderResponseError(self.provider, f"unexpected {error!r}") from error
        except BaseException as error:
            outcome = type(error).__name__
            raise
        finally:
            self._record(self.provider, self.operation, outcome, time.perf_counter() - started)


class ResilientStoryProvider:
    def __init__(self, inner: StoryProvider, guard: Guard) -> None:
        self._inner = inner
        self.guard = guard
        self.name = inner.name

    async def generate(self, request: StoryRequest) -> GeneratedStory:
        return await self.guard.run(lambda: self._inner.generate(request))


class ResilientIllustrator:
    def __init__(self, inner: IllustrationProvider, guard: Guard) -> None:
        self._inner = inner
        self.guard = guard
        self.name = inner.name

    async def illustrate(self, request: StoryRequest, story: GeneratedStory) -> Illustration:
        return await self.guard.run(lambda: self._inner.illustrate(request, story))
