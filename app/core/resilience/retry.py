"""Retries: when to send a failed upstream call again, and when to stop.

A `RetryPolicy` waits with full jitter and stops at whichever limit comes first:
its attempt count, the request's deadline (it re-raises rather than sleep past
it), the error's own verdict (`retryable`, `retry_after`) or a per-upstream
`RetryBudget` that keeps an outage from multiplying traffic. Only async calls are
retried: a synchronous retry would block the event loop while it sleeps. The
sleep is injected, so tests never wait (`app.core.resilience.testing`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar, cast

from app.core.resilience.deadline import Deadline, current_deadline
from app.core.resilience.observer import (
    DEFAULT_OBSERVER,
    ResilienceObserver,
    name_of,
    notify_observer,
)
from app.platform.clock import SYSTEM_CLOCK, Clock

__all__ = [
    "RetryBudget",
    "RetryPolicy",
    "Sleep",
    "default_is_retryable",
    "default_retry_after",
    "retry_on_failure",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

Sleep = Callable[[float], Awaitable[None]]


def default_is_retryable(error: BaseException) -> bool:
    """Retry what says it is retryable (`ProviderError.retryable`); never a cancellation."""
    if isinstance(error, asyncio.CancelledError):
        return False
    return bool(getattr(error, "retryable", False))


def default_retry_after(error: BaseException) -> float | None:
    """The wait the upstream asked for (`ProviderError.retry_after`), if any."""
    value = getattr(error, "retry_after", None)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return max(0.0, float(value))


class RetryBudget:
    """Caps retries per upstream name to a share of recent first attempts.

    Over a sliding window of `window_seconds` a retry is allowed while
    `retries + 1 <= min_retries_per_window + ratio * first_attempts`, so an outage
    cannot multiply traffic by more than about `1 + ratio`, while a quiet service
    can still retry a few times. First attempts are never throttled. In-process and
    cheap (two deques per name); not shared between workers, on purpose.
    """

    def __init__(
        self,
        *,
        ratio: float = 0.2,
        min_retries_per_window: int = 3,
        window_seconds: float = 10.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if ratio < 0 or min_retries_per_window < 0 or window_seconds <= 0:
            raise ValueError("ratio and min_retries_per_window >= 0, window_seconds > 0")
        self.ratio = ratio
        self.min_retries_per_window = min_retries_per_window
        self.window_seconds = window_seconds
        self._clock = clock
        self._attempts: dict[str, deque[float]] = {}
        self._retries: dict[str, deque[float]] = {}

    def _window(self, book: dict[str, deque[float]], name: str, now: float) -> deque[float]:
        events = book.setdefault(name, deque())
        horizon = now - self.window_seconds
        while events and events[0] <= horizon:
            events.popleft()
        return events

    def record_attempt(self, name: str) -> None:
        """Count a first attempt (always allowed)."""
        now = self._clock.monotonic()
        self._window(self._attempts, name, now).append(now)

    def try_retry(self, name: str) -> bool:
        """Spend one retry if the budget allows it; False means do not retry."""
        now = self._clock.monotonic()
        attempts = self._window(self._attempts, name, now)
        retries = self._window(self._retries, name, now)
        if len(retries) + 1 > self.min_retries_per_window + self.ratio * len(attempts):
            return False
        retries.append(now)
        return True


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """When and how long to wait before sending a failed call again.

    Delays use AWS "full jitter": retry n (0-based) waits
    `rng.uniform(0, min(max_delay, base_delay * 2**n))`, unless the error carries a
    `retry_after` (see `retry_after_of`): then exactly that is waited, or, when it is
    above `retry_after_ceiling`, the error is re-raised at once. Retries stop after
    `max_retries`, when a wait would not end before the deadline (the explicit one,
    else `current_deadline()`: re-raise instead of sleeping), when `is_retryable`
    says no (never for a cancellation), or when `budget` refuses. The last error is
    then re-raised unchanged.

    In tests, `app.core.resilience.testing.instant_retry_policy(...)` builds a policy
    whose sleeps return at once; or inject `FakeClock.sleep` to record the delays.
    """

    name: str | None = None
    max_retries: int = 3
    base_delay: float = 1.0
    max_delay: float = 30.0
    retry_after_ceiling: float = 30.0
    is_retryable: Callable[[BaseException], bool] = default_is_retryable
    retry_after_of: Callable[[BaseException], float | None] = default_retry_after
    budget: RetryBudget | None = None
    sleep: Sleep = asyncio.sleep
    rng: random.Random = field(default_factory=random.Random)
    observer: ResilienceObserver = DEFAULT_OBSERVER

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if self.base_delay < 0 or self.max_delay < 0 or self.retry_after_ceiling < 0:
            raise ValueError("delays must be >= 0")

    def replace(self, **changes: Any) -> RetryPolicy:
        return dataclasses.replace(self, **changes)

    def backoff(self, retry_number: int) -> float:
        """The jittered wait before retry `retry_number` (0 for the first retry)."""
        exponent = min(retry_number, 62)  # beyond this the cap has long been reached
        ceiling = min(self.max_delay, self.base_delay * 2.0**exponent)
        return self.rng.uniform(0.0, ceiling)

    async def call(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Await `fn(*args, **kwargs)`, retrying per this policy."""
        name = self.name or name_of(fn)
        return await self.run(functools.partial(fn, *args, **kwargs), name=name)

    async def run(
        self,
        attempt: Callable[[], Awaitable[T]],
        *,
        deadline: Deadline | None = None,
        name: str | None = None,
        proceed: Callable[[], Awaitable[bool]] | None = None,
    ) -> T:
        """Await `attempt()` (a fresh awaitable each time), retrying per this policy.

        `name` (default: the policy's, else the callable's) keys the budget and events.
        `proceed`, when given, is asked before each wait whether a retry can still
        help: False re-raises the error now; it may also raise an error of its own
        (a circuit breaker that opened raises `CircuitOpenError`), chained to it.
        """
        label = name or self.name or name_of(attempt)
        if self.budget is not None:
            self.budget.record_attempt(label)
        retries = 0
        while True:
            try:
                return await attempt()
            except Exception as error:
                delay = self._delay_before_retry(error, retries, deadline, label)
                if delay is None:
                    raise
                if proceed is not None and not await proceed():
                    logger.info("%s: a retry cannot help now; giving up", label)
                    raise
                if not self._spend_retry(label, retries, delay, error):
                    raise
            retries += 1
            await self.sleep(delay)

    def wrap(self, fn: F) -> F:
        """Decorate an async function so each call goes through this policy.

        Raises `TypeError` for anything else: retrying a synchronous function would
        block the event loop for the whole backoff.
        """
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"RetryPolicy.wrap needs an async function; {name_of(fn)} is not one")
        policy = self if self.name else self.replace(name=name_of(fn))

        @functools.wraps(fn)
        async def retrying(*args: Any, **kwargs: Any) -> Any:
            return await policy.call(fn, *args, **kwargs)

        return cast(F, retrying)

    def _delay_before_retry(
        self, error: BaseException, retries: int, deadline: Deadline | None, name: str
    ) -> float | None:
        """How long to wait before the next attempt, or None to give up now (the
        budget is not consulted here: see `_spend_retry`)."""
        if isinstance(error, asyncio.CancelledError) or not self.is_retryable(error):
            return None
        if retries >= self.max_retries:
            return None
        asked = self.retry_after_of(error)
        if asked is not None and asked > self.retry_after_ceiling:
            logger.info("%s: Retry-After %.1f s is above the ceiling; giving up", name, asked)
            return None
        delay = asked if asked is not None else self.backoff(retries)
        deadline = deadline if deadline is not None else current_deadline()
        if deadline is not None and delay >= deadline.remaining():
            logger.info("%s: a %.2f s wait would pass the deadline; giving up", name, delay)
            return None
        return delay

    def _spend_retry(self, name: str, retries: int, delay: float, error: BaseException) -> bool:
        """Take a retry from the budget (False: none left) and report it."""
        if self.budget is not None and not self.budget.try_retry(name):
            notify_observer(self.observer.budget_exhausted, name)
            return False
        notify_observer(self.observer.retry, name, retries + 1, delay, error)
        return True


def retry_on_failure(max_retries: int = 3, delay: float = 1.0, **options: Any) -> Callable[[F], F]:
    """Decorator: retry an async function per `RetryPolicy` (`TypeError` for a sync one).

    `delay` is the base delay (1 s -> 2 s -> 4 s ceilings, full jitter); `options`
    are any other `RetryPolicy` fields (`max_delay`, `budget`, `sleep`, `observer`...).
    """
    policy = RetryPolicy(max_retries=max_retries, base_delay=delay, **options)
    return policy.wrap
