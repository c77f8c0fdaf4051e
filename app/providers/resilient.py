"""The only place resilience wraps a provider.

Each upstream call goes through, outermost first:

    retry policy (full jitter, Retry-After, retry budget; never sleeps past the
                  deadline, and stops once the circuit breaker has opened)
      -> quota governor (per provider account, shared through Redis; optional):
         reserve one request and the call's estimated tokens, wait while the
         account's per-minute quota refills, or go down the ladder at once
        -> bulkhead (per upstream operation: an adaptive concurrency limit and a
           FIFO queue in which the caller waits as long as its deadline allows,
           keeping the rung's floor for the call)
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

Each attempt tells the bulkhead's limit what it says about the upstream's load
(`Sample`): an answer is a latency sample; a timeout, 429 or 5xx is overload;
a call cut by our own deadline, refused by the breaker or rejected as our fault
says nothing. The quota reservation is corrected by the usage the reply reports,
or given back when the attempt never reached the upstream.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from app.core.resilience import (
    AdmissionPermit,
    BreakerState,
    Bulkhead,
    CircuitBreaker,
    CircuitOpenError,
    DeadlineExceededError,
    QuotaGovernor,
    ResilienceError,
    RetryPolicy,
    Sample,
    current_deadline,
    run_within,
)
from app.providers.base import (
    GeneratedStory,
    Illustration,
    IllustrationProvider,
    ProviderError,
    ProviderRejectedError,
    ProviderResponseError,
    ProviderTimeoutError,
    StoryProvider,
    StoryRequest,
    Usage,
)
from app.providers.prompting import age_guidance, system_prompt, user_prompt

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
        quota: QuotaGovernor | None = None,
    ) -> None:
        self.provider = provider
        self.operation = operation
        self.breaker = breaker
        self.bulkhead = bulkhead
        self.policy = policy
        self.floor_seconds = floor_seconds
        self.quota = quota
        self._record = record

    async def run(self, call: Callable[[], Awaitable[T]], *, tokens: int = 0) -> T:
        """`call()` behind every guard; `tokens`: the call's estimated tokens (quota)."""

        async def attempt() -> T:
            if self.quota is None:
                return await self._admitted(call, None)
            reservation = await self.quota.acquire(tokens, self.floor_seconds)
            sent: list[bool] = []
            used: int | None = None
            try:
                result = await self._admitted(call, sent)
                used = tokens_used(result)
                return result
            finally:
                self.quota.settle_soon(reservation, sent=bool(sent), used_tokens=used)

        return await self.policy.run(attempt, name=self.breaker.name, proceed=self._breaker_closed)

    async def _admitted(self, call: Callable[[], Awaitable[T]], sent: list[bool] | None) -> T:
        async with self.bulkhead.admit(self.floor_seconds) as permit:
            return await self.breaker.call(self._attempt, call, permit, sent)

    async def _breaker_closed(self) -> bool:
        """Raises `CircuitOpenError` once the breaker is open (this attempt, or another
        process, opened it): the next attempt would be refused, so no backoff is
        slept for it, and the caller learns when the upstream may be tried again."""
        snapshot = await self.breaker.snapshot()
        if snapshot.state is BreakerState.OPEN:
            raise CircuitOpenError(self.breaker.name, snapshot.opened_until_seconds_from_now or 0.0)
        return True

    async def _attempt(
        self, call: Callable[[], Awaitable[T]], permit: AdmissionPermit, sent: list[bool] | None
    ) -> T:
        deadline = current_deadline()
        budget = deadline.remaining() if deadline is not None else None
        started = time.perf_counter()
        outcome = "error"
        if sent is not None and (deadline is None or not deadline.expired):
            sent.append(True)
        try:
            result = await run_within(deadline, call)
            outcome = "success"
            permit.sample = Sample.OK
            return result
        except DeadlineExceededError as error:
            if budget is None or budget < self.floor_seconds:
                outcome = type(error).__name__
                raise
            outcome = ProviderTimeoutError.__name__
            permit.sample = Sample.DROPPED
            raise ProviderTimeoutError(
                self.provider, f"no answer within {budget:.2f} s", safe_to_repeat=False
            ) from error
        except (ProviderError, ResilienceError) as error:
            outcome = type(error).__name__
            permit.sample = sample_of(error)
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


def sample_of(error: BaseException) -> Sample:
    """What a failed attempt says about the upstream's load (the bulkhead's limit)."""
    if isinstance(error, ProviderRejectedError | ProviderResponseError | ResilienceError):
        return Sample.IGNORED  # our request, an odd reply, or our own guards: not load
    if isinstance(error, ProviderError):
        return Sample.DROPPED  # timeout, 429, 5xx, refused connection
    return Sample.IGNORED


def tokens_used(result: object) -> int | None:
    """The tokens a reply reports having used, when it reports any."""
    usage = getattr(result, "usage", None)
    if isinstance(usage, Usage) and usage.total_tokens > 0:
        return usage.total_tokens
    return None


#: Tokens per word of the answer, generously (languages other than English take more).
TOKENS_PER_WORD = 2
#: Title and JSON around the paragraphs.
ANSWER_OVERHEAD_TOKENS = 64


def estimate_tokens(request: StoryRequest) -> int:
    """The most a story request can cost: its prompt (about 4 characters a token) and
    the longest answer it asks for (paragraphs x the age band's most words)."""
    prompt_chars = len(system_prompt(request)) + len(user_prompt(request))
    _, most_words = age_guidance(request.age).paragraph_words
    answer = request.paragraph_count * most_words * TOKENS_PER_WORD + ANSWER_OVERHEAD_TOKENS
    return prompt_chars // 4 + 1 + answer


class ResilientStoryProvider:
    def __init__(self, inner: StoryProvider, guard: Guard) -> None:
        self._inner = inner
        self.guard = guard
        self.name = inner.name

    async def generate(self, request: StoryRequest) -> GeneratedStory:
        tokens = estimate_tokens(request) if self.guard.quota is not None else 0
        return await self.guard.run(lambda: self._inner.generate(request), tokens=tokens)


class ResilientIllustrator:
    def __init__(self, inner: IllustrationProvider, guard: Guard) -> None:
        self._inner = inner
        self.guard = guard
        self.name = inner.name

    async def illustrate(self, request: StoryRequest, story: GeneratedStory) -> Illustration:
        return await self.guard.run(lambda: self._inner.illustrate(request, story))
