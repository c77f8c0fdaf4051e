"""How the service survives slow, failing and overloaded upstreams, framework-free.

Every guard an upstream call passes through lives here: a per-request `Deadline`
(carried in a ContextVar), a `RetryPolicy` with full jitter bounded by attempts, by
the deadline and by a per-upstream `RetryBudget`, a `CircuitBreaker` whose state
lives in a `BreakerStore` (`app.core.state`: in-process, Redis, or Redis with an
in-process fallback), a `Bulkhead` bounding concurrency, and `graceful_degradation`
turning a failure into a cheap local fallback. Time and sleeping are injected
(`Clock`, `Sleep`), so tests drive every state machine with `FakeClock` and never
wait. What happens is reported to a `ResilienceObserver` (logging by default; the
app adds metrics). Nothing here imports a web framework.

Recommended composition for one upstream call (retries outermost, so a sleeping
retry holds no bulkhead slot, and an open breaker or a full bulkhead ends the
retries at once because neither error is retryable)::

    async def attempt() -> Story:
        async with bulkhead:
            return await breaker.call(provider.generate, request)

    with deadline_scope(settings.request_deadline_seconds):
        story = await policy.call(attempt)

Exceptions raised by this module::

    ResilienceError                  root; retryable=False, counts_as_failure=False
     +-- CircuitOpenError            the breaker refused the call (retry_after: seconds)
     +-- BulkheadFullError           no concurrency slot within the wait (retry_after)
     +-- DeadlineExceededError       the request's deadline ran out

None of them counts against a circuit breaker: the upstream never answered. An
exhausted retry budget raises nothing new: the last upstream error is re-raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import inspect
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from enum import StrEnum
from typing import (
    TYPE_CHECKING,
    Any,
    Generic,
    NoReturn,
    ParamSpec,
    Protocol,
    TypeVar,
    cast,
    overload,
)

if TYPE_CHECKING:
    from app.core.state import BreakerStore

__all__ = [
    "DEFAULT_OBSERVER",
    "SYSTEM_CLOCK",
    "Admission",
    "BreakerConfig",
    "BreakerSnapshot",
    "BreakerState",
    "Bulkhead",
    "BulkheadFullError",
    "CircuitBreaker",
    "CircuitOpenError",
    "Clock",
    "CompositeObserver",
    "Deadline",
    "DeadlineExceededError",
    "FakeClock",
    "LoggingObserver",
    "NullObserver",
    "Permit",
    "ResilienceError",
    "ResilienceObserver",
    "RetryBudget",
    "RetryPolicy",
    "Sleep",
    "SyncSleep",
    "SystemClock",
    "Transition",
    "current_deadline",
    "deadline_scope",
    "default_is_failure",
    "default_is_retryable",
    "default_retry_after",
    "graceful_degradation",
    "no_wait",
    "no_wait_sync",
    "notify_observer",
    "retry_on_failure",
    "run_within",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
P = ParamSpec("P")
F = TypeVar("F", bound=Callable[..., Any])

Sleep = Callable[[float], Awaitable[None]]
SyncSleep = Callable[[float], None]


# --- time -------------------------------------------------------------------------


class Clock(Protocol):
    """Where time comes from: `monotonic()` for durations, `time()` for wall time."""

    def monotonic(self) -> float: ...

    def time(self) -> float: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()


SYSTEM_CLOCK: Clock = SystemClock()


class FakeClock:
    """A clock that moves only when told to; for tests.

    `sleep` / `sleep_sync` record the requested delay and advance the clock by it
    without waiting, so they can be injected wherever a `Sleep` is accepted.
    """

    def __init__(self, start: float = 1_000.0, *, wall_offset: float = 1_700_000_000.0) -> None:
        self._now = start
        self._wall_offset = wall_offset
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self._now

    def time(self) -> float:
        return self._wall_offset + self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self._now += seconds

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.advance(seconds)
        await asyncio.sleep(0)

    def sleep_sync(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.advance(seconds)


async def no_wait(seconds: float) -> None:
    """A `Sleep` that returns at once (still yielding to the event loop)."""
    await asyncio.sleep(0)


def no_wait_sync(seconds: float) -> None:
    """A `SyncSleep` that returns at once."""


# --- errors -----------------------------------------------------------------------


class ResilienceError(Exception):
    """Root of the errors raised by the resilience layer itself."""

    retryable: bool = False
    counts_as_failure: bool = False
    retry_after: float | None = None


class CircuitOpenError(ResilienceError):
    retry_after: float

    def __init__(self, name: str, retry_after: float) -> None:
        super().__init__(f"circuit {name!r} is open; retry in {retry_after:.1f} s")
        self.name = name
        self.retry_after = retry_after


class BulkheadFullError(ResilienceError):
    retry_after: float

    def __init__(self, name: str, retry_after: float = 1.0) -> None:
        super().__init__(f"bulkhead {name!r} is full; retry in {retry_after:.1f} s")
        self.name = name
        self.retry_after = retry_after


class DeadlineExceededError(ResilienceError):
    def __init__(self, message: str = "the request's deadline was exceeded") -> None:
        super().__init__(message)


# --- observation ------------------------------------------------------------------


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class ResilienceObserver(Protocol):
    """Receives every resilience event; implementations must be cheap and not raise
    (an observer that raises is logged and ignored, never breaks a call).

    - `breaker_transition`: once per transition, by the process that caused it;
    - `breaker_rejected`: a call refused by an open (or probe-saturated) breaker;
    - `retry`: about to sleep `delay` s before retry number `attempt` (1 = first retry);
    - `budget_exhausted`: a retry refused by the `RetryBudget` (the error is re-raised);
    - `bulkhead_rejected`: no slot within the allowed wait;
    - `fallback`: `graceful_degradation` replaced `error` by its fallback;
    - `store_fallback` / `store_recovered`: breaker state moved to in-process because
      the shared store failed with `error`, and back to shared.
    """

    def breaker_transition(
        self, name: str, from_state: BreakerState, to_state: BreakerState
    ) -> None: ...

    def breaker_rejected(self, name: str, retry_after: float) -> None: ...

    def retry(self, name: str, attempt: int, delay: float, error: BaseException) -> None: ...

    def budget_exhausted(self, name: str) -> None: ...

    def bulkhead_rejected(self, name: str) -> None: ...

    def fallback(self, name: str, error: BaseException) -> None: ...

    def store_fallback(self, error: BaseException) -> None: ...

    def store_recovered(self) -> None: ...


class NullObserver:
    """Ignores every event."""

    def breaker_transition(
        self, name: str, from_state: BreakerState, to_state: BreakerState
    ) -> None:
        pass

    def breaker_rejected(self, name: str, retry_after: float) -> None:
        pass

    def retry(self, name: str, attempt: int, delay: float, error: BaseException) -> None:
        pass

    def budget_exhausted(self, name: str) -> None:
        pass

    def bulkhead_rejected(self, name: str) -> None:
        pass

    def fallback(self, name: str, error: BaseException) -> None:
        pass

    def store_fallback(self, error: BaseException) -> None:
        pass

    def store_recovered(self) -> None:
        pass


class LoggingObserver:
    """Logs every event; the default observer of every component here."""

    def __init__(self, log: logging.Logger | None = None) -> None:
        self._log = log or logger

    def breaker_transition(
        self, name: str, from_state: BreakerState, to_state: BreakerState
    ) -> None:
        level = logging.WARNING if to_state is BreakerState.OPEN else logging.INFO
        self._log.log(level, "circuit %s: %s -> %s", name, from_state, to_state)

    def breaker_rejected(self, name: str, retry_after: float) -> None:
        self._log.debug("circuit %s rejected a call; retry in %.1f s", name, retry_after)

    def retry(self, name: str, attempt: int, delay: float, error: BaseException) -> None:
        self._log.info("%s: retry %d in %.2f s after %r", name, attempt, delay, error)

    def budget_exhausted(self, name: str) -> None:
        self._log.warning("%s: retry budget exhausted; not retrying", name)

    def bulkhead_rejected(self, name: str) -> None:
        self._log.warning("bulkhead %s is full; call rejected", name)

    def fallback(self, name: str, error: BaseException) -> None:
        self._log.warning("%s failed (%r); using its fallback", name, error)

    def store_fallback(self, error: BaseException) -> None:
        self._log.warning("breaker store unavailable (%r); using in-process state", error)

    def store_recovered(self) -> None:
        self._log.info("breaker store available again; state is shared")


class CompositeObserver:
    """Forwards every event to each of `observers` (for example logging and metrics)."""

    def __init__(self, *observers: ResilienceObserver) -> None:
        self.observers = observers

    def breaker_transition(
        self, name: str, from_state: BreakerState, to_state: BreakerState
    ) -> None:
        for observer in self.observers:
            notify_observer(observer.breaker_transition, name, from_state, to_state)

    def breaker_rejected(self, name: str, retry_after: float) -> None:
        for observer in self.observers:
            notify_observer(observer.breaker_rejected, name, retry_after)

    def retry(self, name: str, attempt: int, delay: float, error: BaseException) -> None:
        for observer in self.observers:
            notify_observer(observer.retry, name, attempt, delay, error)

    def budget_exhausted(self, name: str) -> None:
        for observer in self.observers:
            notify_observer(observer.budget_exhausted, name)

    def bulkhead_rejected(self, name: str) -> None:
        for observer in self.observers:
            notify_observer(observer.bulkhead_rejected, name)

    def fallback(self, name: str, error: BaseException) -> None:
        for observer in self.observers:
            notify_observer(observer.fallback, name, error)

    def store_fallback(self, error: BaseException) -> None:
        for observer in self.observers:
            notify_observer(observer.store_fallback, error)

    def store_recovered(self) -> None:
        for observer in self.observers:
            notify_observer(observer.store_recovered)


DEFAULT_OBSERVER: ResilienceObserver = LoggingObserver()


def notify_observer(event: Callable[P, None], *args: P.args, **kwargs: P.kwargs) -> None:
    """Call an observer method; if it raises, log that and carry on (a broken
    metrics exporter must not fail the call it was observing)."""
    try:
        event(*args, **kwargs)
    except Exception:
        logger.exception("resilience observer failed on %s", getattr(event, "__name__", event))


# --- deadline ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Deadline:
    """A point in monotonic time by which the current request must be answered."""

    at_monotonic: float
    clock: Clock = field(default=SYSTEM_CLOCK, compare=False, repr=False)

    @classmethod
    def after(cls, seconds: float, *, clock: Clock = SYSTEM_CLOCK) -> Deadline:
        return cls(clock.monotonic() + seconds, clock)

    def remaining(self) -> float:
        """Seconds left, never negative."""
        return max(0.0, self.at_monotonic - self.clock.monotonic())

    @property
    def expired(self) -> bool:
        return self.remaining() <= 0.0


_deadline: ContextVar[Deadline | None] = ContextVar("resilience_deadline", default=None)


def current_deadline() -> Deadline | None:
    """The deadline of the innermost `deadline_scope`, or None outside any."""
    return _deadline.get()


@contextlib.contextmanager
def deadline_scope(
    seconds: float | None = None,
    *,
    deadline: Deadline | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> Iterator[Deadline]:
    """Run the block under a deadline `seconds` from now (or the given `deadline`).

    A nested scope never extends an enclosing one: the effective deadline, the one
    yielded and seen by `current_deadline()`, is the earlier of the two. Tasks
    created inside the block inherit it (ContextVars are copied into tasks).
    """
    if deadline is None:
        if seconds is None:
            raise ValueError("deadline_scope needs seconds or a deadline")
        deadline = Deadline.after(seconds, clock=clock)
    elif seconds is not None:
        raise ValueError("deadline_scope takes seconds or a deadline, not both")
    outer = _deadline.get()
    if outer is not None and outer.remaining() <= deadline.remaining():
        deadline = outer
    token = _deadline.set(deadline)
    try:
        yield deadline
    finally:
        _deadline.reset(token)


async def run_within(deadline: Deadline | None, factory: Callable[[], Awaitable[T]]) -> T:
    """Await `factory()` for at most the deadline's remaining time.

    `deadline=None` means `current_deadline()`; with no deadline at all the call is
    not bounded. Raises `DeadlineExceededError` (without calling `factory` when the
    deadline has already passed). A `TimeoutError` raised by the call itself, not by
    this bound, propagates unchanged.
    """
    deadline = deadline if deadline is not None else current_deadline()
    if deadline is None:
        return await factory()
    remaining = deadline.remaining()
    if remaining <= 0:
        raise DeadlineExceededError()
    try:
        async with asyncio.timeout(remaining) as scope:
            return await factory()
    except TimeoutError as error:
        if scope.expired():
            raise DeadlineExceededError() from error
        raise


# --- retries ----------------------------------------------------------------------


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

    Testing switch: `RetryPolicy.testing(...)` builds a policy whose sleeps return at
    once; `policy.replace(sleep=no_wait, sync_sleep=no_wait_sync)` does the same for
    an existing policy (or inject `FakeClock.sleep` to record the delays).
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
    sync_sleep: SyncSleep = time.sleep
    rng: random.Random = field(default_factory=random.Random)
    observer: ResilienceObserver = DEFAULT_OBSERVER

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if self.base_delay < 0 or self.max_delay < 0 or self.retry_after_ceiling < 0:
            raise ValueError("delays must be >= 0")

    @classmethod
    def testing(cls, **overrides: Any) -> RetryPolicy:
        """A policy that never waits (sleeps return at once); other fields as given."""
        options: dict[str, Any] = {"sleep": no_wait, "sync_sleep": no_wait_sync}
        options.update(overrides)
        return cls(**options)

    def replace(self, **changes: Any) -> RetryPolicy:
        return dataclasses.replace(self, **changes)

    def backoff(self, retry_number: int) -> float:
        """The jittered wait before retry `retry_number` (0 for the first retry)."""
        exponent = min(retry_number, 62)  # beyond this the cap has long been reached
        ceiling = min(self.max_delay, self.base_delay * 2.0**exponent)
        return self.rng.uniform(0.0, ceiling)

    async def call(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Await `fn(*args, **kwargs)`, retrying per this policy."""
        name = self.name or _name_of(fn)
        return await self.run(functools.partial(fn, *args, **kwargs), name=name)

    async def run(
        self,
        attempt: Callable[[], Awaitable[T]],
        *,
        deadline: Deadline | None = None,
        name: str | None = None,
    ) -> T:
        """Await `attempt()` (a fresh awaitable each time), retrying per this policy.

        `name` (default: the policy's, else the callable's) keys the budget and events.
        """
        label = name or self.name or _name_of(attempt)
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
            retries += 1
            await self.sleep(delay)

    def call_sync(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Call `fn(*args, **kwargs)`, retrying per this policy, sleeping with `sync_sleep`."""
        label = self.name or _name_of(fn)
        if self.budget is not None:
            self.budget.record_attempt(label)
        retries = 0
        while True:
            try:
                return fn(*args, **kwargs)
            except Exception as error:
                delay = self._delay_before_retry(error, retries, None, label)
                if delay is None:
                    raise
            retries += 1
            self.sync_sleep(delay)

    def wrap(self, fn: F) -> F:
        """Decorate an async or sync function so each call goes through this policy."""
        policy = self if self.name else self.replace(name=_name_of(fn))
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def retrying(*args: Any, **kwargs: Any) -> Any:
                return await policy.call(fn, *args, **kwargs)

            return cast(F, retrying)

        @functools.wraps(fn)
        def retrying_sync(*args: Any, **kwargs: Any) -> Any:
            return policy.call_sync(fn, *args, **kwargs)

        return cast(F, retrying_sync)

    def _delay_before_retry(
        self, error: BaseException, retries: int, deadline: Deadline | None, name: str
    ) -> float | None:
        """How long to wait before the next attempt, or None to give up now."""
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
        if self.budget is not None and not self.budget.try_retry(name):
            notify_observer(self.observer.budget_exhausted, name)
            return None
        notify_observer(self.observer.retry, name, retries + 1, delay, error)
        return delay


def retry_on_failure(max_retries: int = 3, delay: float = 1.0, **options: Any) -> Callable[[F], F]:
    """Decorator: retry an async or sync function per `RetryPolicy`.

    `delay` is the base delay (1 s -> 2 s -> 4 s ceilings, full jitter); `options`
    are any other `RetryPolicy` fields (`max_delay`, `budget`, `sleep`, `observer`...).
    """
    policy = RetryPolicy(max_retries=max_retries, base_delay=delay, **options)
    return policy.wrap


def _name_of(fn: object) -> str:
    inner = getattr(fn, "func", fn)  # functools.partial
    return str(getattr(inner, "__qualname__", None) or type(inner).__name__)


# --- circuit breaker --------------------------------------------------------------


def default_is_failure(error: BaseException) -> bool:
    """Count what says it counts (`ProviderError.counts_as_failure`, default True);
    never a cancellation."""
    if isinstance(error, asyncio.CancelledError):
        return False
    return bool(getattr(error, "counts_as_failure", True))


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """The numbers a breaker store applies; see `CircuitBreaker`."""

    failure_threshold: int = 3
    recovery_timeout: float = 120.0
    half_open_max_calls: int = 1
    probe_lease_seconds: float = 30.0
    max_recovery_timeout: float = 600.0
    backoff_multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.failure_threshold < 1 or self.half_open_max_calls < 1:
            raise ValueError("failure_threshold and half_open_max_calls must be >= 1")
        if self.recovery_timeout <= 0 or self.probe_lease_seconds <= 0:
            raise ValueError("recovery_timeout and probe_lease_seconds must be > 0")
        if self.max_recovery_timeout < self.recovery_timeout or self.backoff_multiplier < 1:
            raise ValueError("max_recovery_timeout >= recovery_timeout, backoff_multiplier >= 1")

    def open_seconds(self, open_count: int, jitter: float) -> float:
        """How long opening number `open_count` (1 = first since closed) lasts.

        The first opening lasts exactly `recovery_timeout`; each later one multiplies
        it by `backoff_multiplier` and by `jitter` (about 0.9..1.1), capped at
        `max_recovery_timeout`.
        """
        seconds = self.recovery_timeout
        for _ in range(open_count - 1):  # a loop, not **, so no float overflow
            seconds *= self.backoff_multiplier
            if seconds >= self.max_recovery_timeout:
                break
        if open_count > 1:
            seconds *= jitter
        return min(self.max_recovery_timeout, seconds)


@dataclass(frozen=True, slots=True)
class Permit:
    """Leave to make one call, returned by `CircuitBreaker.acquire()`.

    `probe` permits are the half-open trial calls; each holds a lease (`lease_id`)
    that expires after `probe_lease_seconds`. `epoch` is the breaker's transition
    count when the permit was granted: a result only affects the state it was
    admitted in, so a slow call from before an opening cannot close the breaker.
    """

    name: str
    probe: bool = False
    epoch: int = 0
    lease_id: str | None = None
    origin: str = ""  # which store granted it, for stores that combine several


@dataclass(frozen=True, slots=True)
class Transition:
    from_state: BreakerState
    to_state: BreakerState


@dataclass(frozen=True, slots=True)
class Admission:
    """A store's answer to `acquire`: a permit, or the seconds until one may be had."""

    permit: Permit | None
    retry_after: float = 0.0
    transition: Transition | None = None


@dataclass(frozen=True, slots=True)
class BreakerSnapshot:
    """A breaker as `/health` shows it. `opened_until_seconds_from_now` is None unless
    open; 0.0 means the next call will be a probe."""

    name: str
    state: BreakerState
    consecutive_failures: int
    opened_until_seconds_from_now: float | None
    open_count: int
    probes_in_flight: int = 0
    store_degraded: bool = False


class CircuitBreaker:
    """Stops calling an upstream that keeps failing, and probes it back to health.

    Closed: calls flow; `failure_threshold` consecutive failures open it. Open:
    `acquire()` raises `CircuitOpenError` with the seconds left, calling nothing.
    The first `acquire()` after that time moves it to half-open, where at most
    `half_open_max_calls` probe leases exist at once (shared by every process using
    the same Redis store); a lease expires after `probe_lease_seconds`, so a worker
    that died mid-probe cannot wedge it. A successful probe closes the breaker (and
    resets the lengthening); a failed probe opens it again for longer (see
    `BreakerConfig.open_seconds`). A success while closed resets the failure count.
    `CircuitOpenError.retry_after` is the time left until half-open, or, when every
    probe lease is taken, until the oldest lease expires (an upper bound: the probe
    usually answers sooner).

    How a call's outcome is recorded (`record` / `call`):
      - success, or an exception that `is_failure` rejects (e.g. a 4xx: the upstream
        answered) -> success; a probe then closes the breaker;
      - an exception that `is_failure` accepts -> failure;
      - `asyncio.CancelledError` (the client went away) and `ResilienceError`s (a
        deadline or a nested guard; the upstream never answered) -> neither: a probe
        lease is released for the next caller, nothing is counted.

    The store serialises transitions; no lock is held while the upstream is called.
    Every transition is reported to `observer` exactly once, by the process whose
    operation caused it.
    """

    def __init__(
        self,
        name: str,
        store: BreakerStore,
        *,
        failure_threshold: int = 3,
        recovery_timeout: float = 120.0,
        half_open_max_calls: int = 1,
        probe_lease_seconds: float = 30.0,
        max_recovery_timeout: float = 600.0,
        backoff_multiplier: float = 2.0,
        open_jitter: float = 0.1,
        is_failure: Callable[[BaseException], bool] = default_is_failure,
        observer: ResilienceObserver = DEFAULT_OBSERVER,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 <= open_jitter < 1:
            raise ValueError("open_jitter must be in [0, 1)")
        self.name = name
        self.config = BreakerConfig(
            failure_threshold=failure_threshold,
            recovery_timeout=recovery_timeout,
            half_open_max_calls=half_open_max_calls,
            probe_lease_seconds=probe_lease_seconds,
            max_recovery_timeout=max_recovery_timeout,
            backoff_multiplier=backoff_multiplier,
        )
        self.open_jitter = open_jitter
        self.store = store
        self.is_failure = is_failure
        self.observer = observer
        self._rng = rng or random.Random()

    async def acquire(self) -> Permit:
        """A permit to call the upstream now, or `CircuitOpenError`."""
        admission = await self.store.acquire(self.name, self.config)
        self._report(admission.transition)
        if admission.permit is None:
            notify_observer(self.observer.breaker_rejected, self.name, admission.retry_after)
            raise CircuitOpenError(self.name, admission.retry_after)
        return admission.permit

    async def record_success(self, permit: Permit) -> None:
        self._report(await self.store.on_success(permit, self.config))

    async def record_failure(self, permit: Permit) -> None:
        jitter = self._rng.uniform(1 - self.open_jitter, 1 + self.open_jitter)
        self._report(await self.store.on_failure(permit, self.config, jitter=jitter))

    async def release(self, permit: Permit) -> None:
        """Give a permit back without a verdict (the call never reached an answer)."""
        await self.store.release(permit, self.config)

    async def record(self, permit: Permit, error: BaseException | None) -> None:
        """Record the outcome of the call made under `permit` (`error=None`: success)."""
        if error is None:
            await self.record_success(permit)
        elif not isinstance(error, Exception):  # CancelledError, KeyboardInterrupt...
            await self.release(permit)
        elif self.is_failure(error):
            await self.record_failure(permit)
        elif isinstance(error, ResilienceError):
            await self.release(permit)
        else:
            await self.record_success(permit)

    async def call(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Acquire, await `fn(*args, **kwargs)`, record the outcome; errors propagate."""
        permit = await self.acquire()
        try:
            result = await fn(*args, **kwargs)
        except BaseException as error:
            await self.record(permit, error)
            raise
        await self.record_success(permit)
        return result

    async def snapshot(self) -> BreakerSnapshot:
        return await self.store.snapshot(self.name, self.config)

    def _report(self, transition: Transition | None) -> None:
        if transition is not None:
            notify_observer(
                self.observer.breaker_transition,
                self.name,
                transition.from_state,
                transition.to_state,
            )


# --- bulkhead ---------------------------------------------------------------------


class Bulkhead:
    """At most `max_concurrent` calls at once; others wait up to `max_wait_seconds`
    (never past `current_deadline()`), first come first served, else
    `BulkheadFullError` at once. `max_wait_seconds=0` rejects immediately.

        async with bulkhead:
            ...
    """

    def __init__(
        self,
        name: str,
        max_concurrent: int,
        max_wait_seconds: float = 0.0,
        *,
        retry_after: float = 1.0,
        observer: ResilienceObserver = DEFAULT_OBSERVER,
    ) -> None:
        if max_concurrent < 1 or max_wait_seconds < 0:
            raise ValueError("max_concurrent must be >= 1 and max_wait_seconds >= 0")
        self.name = name
        self.max_concurrent = max_concurrent
        self.max_wait_seconds = max_wait_seconds
        self.retry_after = retry_after
        self.observer = observer
        self._in_use = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def waiting(self) -> int:
        return sum(1 for waiter in self._waiters if not waiter.done())

    async def __aenter__(self) -> Bulkhead:
        await self.acquire()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()

    async def acquire(self) -> None:
        if self._in_use < self.max_concurrent and not self.waiting:
            self._in_use += 1
            return
        wait = self.max_wait_seconds
        deadline = current_deadline()
        if deadline is not None:
            wait = min(wait, deadline.remaining())
        if wait <= 0:
            self._reject()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(wait):
                await waiter
        except BaseException as error:
            if waiter.done() and not waiter.cancelled():
                self.release()  # a slot was handed over just as we gave up: pass it on
            else:
                waiter.cancel()
            if isinstance(error, TimeoutError):
                self._reject()
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def release(self) -> None:
        # Hand the slot straight to the oldest waiter so a newcomer cannot jump the queue.
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._in_use -= 1

    def _reject(self) -> NoReturn:
        notify_observer(self.observer.bulkhead_rejected, self.name)
        raise BulkheadFullError(self.name, self.retry_after)


# --- graceful degradation ---------------------------------------------------------


class _Degrade(Generic[R]):
    def __init__(
        self,
        fallback_value: R | Callable[[], R],
        exceptions: tuple[type[BaseException], ...],
        on_fallback: Callable[[BaseException], None] | None,
        name: str | None,
        observer: ResilienceObserver,
    ) -> None:
        self._fallback_value = fallback_value
        self._exceptions = exceptions
        self._on_fallback = on_fallback
        self._name = name
        self._observer = observer

    # The decorated function returns "its own type or the fallback's": a fallback of
    # None on `-> Story` gives `-> Story | None`, which is what callers must handle.
    @overload
    def __call__(
        self, fn: Callable[P, Coroutine[Any, Any, T]]
    ) -> Callable[P, Coroutine[Any, Any, T | R]]: ...

    @overload
    def __call__(self, fn: Callable[P, T]) -> Callable[P, T | R]: ...

    def __call__(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        name = self._name or _name_of(fn)
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def degrading(*args: P.args, **kwargs: P.kwargs) -> Any:
                try:
                    return await fn(*args, **kwargs)
                except self._exceptions as error:
                    return self._fallback(name, error)

            return degrading

        @functools.wraps(fn)
        def degrading_sync(*args: P.args, **kwargs: P.kwargs) -> Any:
            try:
                return fn(*args, **kwargs)
            except self._exceptions as error:
                return self._fallback(name, error)

        return degrading_sync

    def _fallback(self, name: str, error: BaseException) -> R:
        # Only ordinary errors degrade: a cancellation (or KeyboardInterrupt) always
        # propagates, even when `exceptions` names BaseException.
        if not isinstance(error, Exception):
            raise error
        notify_observer(self._observer.fallback, name, error)
        if self._on_fallback is not None:
            notify_observer(self._on_fallback, error)
        if callable(self._fallback_value):
            return self._fallback_value()
        return self._fallback_value


@overload
def graceful_degradation(
    fallback_value: Callable[[], R],
    *,
    exceptions: tuple[type[BaseException], ...] = ...,
    on_fallback: Callable[[BaseException], None] | None = ...,
    name: str | None = ...,
    observer: ResilienceObserver = ...,
) -> _Degrade[R]: ...


@overload
def graceful_degradation(
    fallback_value: R,
    *,
    exceptions: tuple[type[BaseException], ...] = ...,
    on_fallback: Callable[[BaseException], None] | None = ...,
    name: str | None = ...,
    observer: ResilienceObserver = ...,
) -> _Degrade[R]: ...


def graceful_degradation(
    fallback_value: R | Callable[[], R],
    *,
    exceptions: tuple[type[BaseException], ...] = (Exception,),
    on_fallback: Callable[[BaseException], None] | None = None,
    name: str | None = None,
    observer: ResilienceObserver = DEFAULT_OBSERVER,
) -> _Degrade[R]:
    """Decorator: when the async or sync function raises one of `exceptions`, return
    the fallback instead (the function is not called again). The decorated function
    is typed as returning its own type or the fallback's (`-> Story | None` for a
    fallback of None on `-> Story`).

    `fallback_value` is returned as is, unless it is callable: then it is called with
    no arguments for each fallback (use that for mutable or computed values; to
    return a callable itself, wrap it: `lambda: my_callable`). Each fallback is
    reported to `observer.fallback` (logged by the default observer) and passed to
    `on_fallback`. `asyncio.CancelledError` always propagates.
    """
    return _Degrade(fallback_value, exceptions, on_fallback, name, observer)
