"""What the guards report, and to whom: the one seam between resilience and telemetry.

Every guard (retry policy, breaker, bulkhead, fallback, failover breaker store)
reports what it does to a `ResilienceObserver` instead of logging or counting
itself, so the app can plug in metrics (`CompositeObserver` of logging and
Prometheus) without this package knowing about either. `BreakerState` lives here
rather than beside the breaker because it is part of the event vocabulary.
Observers are called through `notify_observer`: a broken exporter is logged and
ignored, never allowed to fail the call it was observing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from enum import StrEnum
from typing import ParamSpec, Protocol

__all__ = [
    "DEFAULT_OBSERVER",
    "BreakerState",
    "CompositeObserver",
    "LoggingObserver",
    "NullObserver",
    "ResilienceObserver",
    "name_of",
    "notify_observer",
]

logger = logging.getLogger(__name__)

P = ParamSpec("P")


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
        # The bulkhead logs each shed itself, with its reason and rate-limited.
        self._log.debug("bulkhead %s is full; call rejected", name)

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


def name_of(fn: object) -> str:
    """The name events about `fn` are reported under when the caller gives none."""
    inner = getattr(fn, "func", fn)  # functools.partial: name the function, not the wrapper
    return str(getattr(inner, "__qualname__", None) or type(inner).__name__)
