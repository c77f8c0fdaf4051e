"""The circuit breaker: stop calling an upstream that keeps failing, probe it back.

`CircuitBreaker` classifies outcomes and reports transitions; it decides nothing
about state itself. Each step of the state machine is one atomic operation on a
`BreakerStore`, which returns the transition it caused, if any, so the caller
reports it exactly once. The store contract lives here, beside the breaker, and
the stores (in-process, Redis, Redis with an in-process fallback) live in
`app.core.resilience.stores`: state can then be shared by every worker without
the breaker knowing where it is kept.
"""

from __future__ import annotations

import asyncio
import random
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import ParamSpec, Protocol, TypeVar

from app.core.resilience.errors import CircuitOpenError, ResilienceError
from app.core.resilience.observer import (
    DEFAULT_OBSERVER,
    BreakerState,
    ResilienceObserver,
    notify_observer,
)

__all__ = [
    "Admission",
    "BreakerConfig",
    "BreakerSnapshot",
    "BreakerStore",
    "CircuitBreaker",
    "Permit",
    "Transition",
    "default_is_failure",
    "new_lease_id",
]

T = TypeVar("T")
P = ParamSpec("P")


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


# The library's defaults, in one place: the fields of `BreakerConfig`.
_DEFAULTS = BreakerConfig()


@dataclass(frozen=True, slots=True)
class Permit:
    """Leave to make one call, returned by `CircuitBreaker.acquire()`.

    `probe` permits are the half-open trial calls; each holds a lease (`lease_id`)
    that expires after `probe_lease_seconds`. `epoch` is the breaker's transition
    count when the permit was granted: a result only affects the state it was
    admitted in, so a slow call from before an opening cannot close the breaker.
    `clean`: granted while closed with no failure counted, so its success has
    nothing to reset (`CircuitBreaker.record_success` then skips the store).
    """

    name: str
    probe: bool = False
    epoch: int = 0
    lease_id: str | None = None
    origin: str = ""  # which store granted it, for stores that combine several
    clean: bool = False


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
    forced: str | None = None  # an operator's override, described (`overrides`)


class BreakerStore(Protocol):
    """One atomic step of the breaker state machine per method.

    `on_failure`'s `jitter` (about 0.9..1.1) scales a lengthened open time; it is
    drawn by the breaker so that stores stay deterministic.
    """

    async def acquire(self, name: str, config: BreakerConfig) -> Admission: ...

    async def on_success(self, permit: Permit, config: BreakerConfig) -> Transition | None: ...

    async def on_failure(
        self, permit: Permit, config: BreakerConfig, *, jitter: float = 1.0
    ) -> Transition | None: ...

    async def release(self, permit: Permit, config: BreakerConfig) -> None: ...

    async def snapshot(self, name: str, config: BreakerConfig) -> BreakerSnapshot: ...


def new_lease_id() -> str:
    """A probe lease id; random so that leases from different processes never clash."""
    return secrets.token_hex(8)


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
    A call admitted while the count was 0 ("clean") records its success without a
    store operation: it has nothing to reset, and failures counted while it ran
    stay, as if it had succeeded when admitted (it began before them, so it says
    nothing about the upstream since). That is one shared-store round trip per
    healthy call instead of two.
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
        failure_threshold: int = _DEFAULTS.failure_threshold,
        recovery_timeout: float = _DEFAULTS.recovery_timeout,
        half_open_max_calls: int = _DEFAULTS.half_open_max_calls,
        probe_lease_seconds: float = _DEFAULTS.probe_lease_seconds,
        max_recovery_timeout: float = _DEFAULTS.max_recovery_timeout,
        backoff_multiplier: float = _DEFAULTS.backoff_multiplier,
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
        if permit.clean and not permit.probe:
            return  # nothing to reset (class doc)
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
