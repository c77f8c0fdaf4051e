"""The only place resilience wraps a provider.

Each upstream call goes through, outermost first:

    retry policy (full jitter, Retry-After, retry budget; never sleeps past the
                  deadline, and stops once the circuit breaker has opened)
      -> bulkhead (per upstream: bounded concurrency, bounded wait)
        -> circuit breaker (per upstream and operation; shared state in Redis)
          -> the attempt, cut at the deadline (the rung's, from `deadline_scope`)
            -> the SDK call (its own retries off)

Retries sit outside the bulkhead and the breaker (a deviation from the guide's
drawing, on purpose): a retry that is sleeping holds no concurrency slot, every
attempt is counted by the breaker, and once the breaker opens the next attempt is
refused at once (`CircuitOpenError` is not retryable). An attempt cut at the
deadline after at least `floor_seconds` is a `ProviderTimeoutError`, a failure
the breaker counts: an upstream that hangs is opened like one that fails. One
cut sooner is no verdict on the upstream (the request simply had no time left).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from app.core.resilience import (
    BreakerState,
    Bulkhead,
    CircuitBreaker,
    CircuitOpenError,
    DeadlineExceededError,
    ResilienceError,
    RetryPolicy,
    current_deadline,
    run_within,
)
from app.providers.base import (
    GeneratedStory,
    Illustration,
    IllustrationProvider,
    ProviderError,
    ProviderResponseError,
    ProviderTimeoutError,
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
    """Retries, bulkhead, breaker and the deadline around calls to one upstream operation."""

    def __init__(
        self,
        *,
        provider: str,
        operation: str,
        breaker: CircuitBreaker,
        bulkhead: Bulkhead,
        policy: RetryPolicy,
        record: UpstreamCallRecorder = ignore_call,
        floor_seconds: float = 0.0,
    ) -> None:
        self.provider = provider
        self.operation = operation
        self.breaker = breaker
        self.bulkhead = bulkhead
        self.policy = policy
        self.floor_seconds = floor_seconds
        self._record = record

    async def run(self, call: Callable[[], Awaitable[T]]) -> T:
        async def attempt() -> T:
            async with self.bulkhead:
                return await self.breaker.call(self._attempt, call)

        return await self.policy.run(attempt, name=self.breaker.name, proceed=self._breaker_closed)

    async def _breaker_closed(self) -> bool:
        """Raises `CircuitOpenError` once the breaker is open (this attempt, or another
        process, opened it): the next attempt would be refused, so no backoff is
        slept for it, and the caller learns when the upstream may be tried again."""
        snapshot = await self.breaker.snapshot()
        if snapshot.state is BreakerState.OPEN:
            raise CircuitOpenError(self.breaker.name, snapshot.opened_until_seconds_from_now or 0.0)
        return True

    async def _attempt(self, call: Callable[[], Awaitable[T]]) -> T:
        deadline = current_deadline()
        budget = deadline.remaining() if deadline is not None else None
        started = time.perf_counter()
        outcome = "error"
        try:
            result = await run_within(deadline, call)
            outcome = "success"
            return result
        except DeadlineExceededError as error:
            if budget is None or budget < self.floor_seconds:
                outcome = type(error).__name__
                raise
            outcome = ProviderTimeoutError.__name__
            raise ProviderTimeoutError(
                self.provider, f"no answer within {budget:.2f} s", safe_to_repeat=False
            ) from error
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
