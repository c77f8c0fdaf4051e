"""The bulkhead: admission to one upstream, a limit that follows it, and a bounded queue.

Without it, a slow upstream lets calls pile up until they hold every connection
and task the process has. With a fixed cap and a short wait instead, a healthy
upstream whose answers take seconds turns load into fallbacks. So a `Bulkhead`
admits as many calls as its `ConcurrencyLimit` allows (`adaptive.GradientLimit`:
a limit that follows the upstream's latency and overload errors, under a hard
ceiling), and a caller beyond it waits in a FIFO queue for as long as its
deadline allows, keeping `reserve_seconds` (the rung's floor) for the call
itself. Shedding is explicit and early, one reason each:

- `queue_full`: `max_queue` callers are already waiting;
- `no_time`: the caller's deadline (less its reserve) or `max_wait_seconds` leaves
  no time to wait at all;
- `expected_wait`: the wait the queue ahead implies (its length x the upstream's
  latency / the limit) is longer than the caller may wait, so it goes down the
  ladder now, with its time intact, rather than at the end of its wait;
- `wait_timeout`: it waited as long as it could, and no slot came.

Each shed raises `BulkheadFullError`, is reported to the observer
(`bulkhead_rejected`) and to `AdmissionEvents` with its reason (metrics), and is
logged with its reason (at most one line per reason and `log_interval` seconds,
with the count of the others: an overload must not also flood the log).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import NoReturn, Protocol

from app.core.resilience.adaptive import ConcurrencyLimit, FixedLimit, Sample
from app.core.resilience.deadline import current_deadline
from app.core.resilience.errors import BulkheadFullError
from app.core.resilience.observer import DEFAULT_OBSERVER, ResilienceObserver, notify_observer
from app.platform.clock import SYSTEM_CLOCK, Clock

__all__ = ["SHED_REASONS", "AdmissionEvents", "AdmissionPermit", "Bulkhead"]

logger = logging.getLogger(__name__)

#: Why a call was shed, as the metric's `reason` label says it.
SHED_REASONS = ("queue_full", "no_time", "expected_wait", "wait_timeout")


class AdmissionEvents(Protocol):
    """Told about admission (metrics); called synchronously, must be cheap and not raise."""

    def shed(self, name: str, reason: str) -> None: ...

    def changed(self, name: str, limit: int, in_flight: int, queued: int) -> None: ...


class _NoEvents:
    def shed(self, name: str, reason: str) -> None:
        pass

    def changed(self, name: str, limit: int, in_flight: int, queued: int) -> None:
        pass


@dataclass(slots=True)
class AdmissionPermit:
    """One admitted call: when it started, how many were in flight, and what it
    says about the upstream (`sample`, set by the caller; unset: ignored)."""

    started: float
    in_flight: int
    sample: Sample = Sample.IGNORED


class Bulkhead:
    """At most `limit` calls at once; others wait in a bounded FIFO queue (module doc).

        async with bulkhead.admit(reserve_seconds=floor) as permit:
            ...
            permit.sample = Sample.OK

    `max_concurrent`: an int (a fixed limit) or a `ConcurrencyLimit`.
    `max_wait_seconds`: the longest wait whatever the deadline (None: the deadline
    alone; 0: never wait). `max_queue`: the most callers waiting (None: unbounded).
    """

    def __init__(
        self,
        name: str,
        max_concurrent: int | ConcurrencyLimit,
        max_wait_seconds: float | None = 0.0,
        *,
        max_queue: int | None = None,
        retry_after: float = 1.0,
        observer: ResilienceObserver = DEFAULT_OBSERVER,
        events: AdmissionEvents | None = None,
        clock: Clock = SYSTEM_CLOCK,
        log_interval: float = 5.0,
    ) -> None:
        limit = FixedLimit(max_concurrent) if isinstance(max_concurrent, int) else max_concurrent
        if max_wait_seconds is not None and max_wait_seconds < 0:
            raise ValueError("max_wait_seconds must be >= 0 (or None)")
        if max_queue is not None and max_queue < 0:
            raise ValueError("max_queue must be >= 0 (or None)")
        self.name = name
        self.limiter = limit
        self.max_wait_seconds = max_wait_seconds
        self.max_queue = max_queue
        self.retry_after = retry_after
        self.observer = observer
        self.events: AdmissionEvents = events or _NoEvents()
        self.log_interval = log_interval
        self._clock = clock
        self._in_use = 0
        self._queued = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._log_after: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}

    @property
    def max_concurrent(self) -> int:
        return self.limiter.limit

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def waiting(self) -> int:
        return self._queued

    def expected_wait(self) -> float | None:
        """Seconds a caller joining the queue now would wait; None before any latency."""
        rtt = self.limiter.rtt
        if rtt is None:
            return None
        return (self._queued + 1) * rtt / max(1, self.limiter.limit)

    async def __aenter__(self) -> Bulkhead:
        await self.acquire()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()

    @asynccontextmanager
    async def admit(self, reserve_seconds: float = 0.0) -> AsyncIterator[AdmissionPermit]:
        """A slot for the block; its duration and `sample` update the limit."""
        await self.acquire(reserve_seconds)
        permit = AdmissionPermit(self._clock.monotonic(), self._in_use)
        try:
            yield permit
        finally:
            self.release(permit)

    async def acquire(self, reserve_seconds: float = 0.0) -> None:
        if self._in_use < self.limiter.limit and not self._queued:
            self._in_use += 1
            self._changed()
            return
        allowed = self._allowed_wait(reserve_seconds)
        if allowed <= 0:
            self._shed("no_time")
        if self.max_queue is not None and self._queued >= self.max_queue:
            self._shed("queue_full")
        expected = self.expected_wait()
        if expected is not None and expected > allowed:
            self._shed("expected_wait")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._queued += 1
        self._changed()
        try:
            async with asyncio.timeout(None if math.isinf(allowed) else allowed):
                await waiter
        except BaseException as error:
            if waiter.done() and not waiter.cancelled():
                self.release()  # a slot was handed over just as we gave up: pass it on
            else:
                waiter.cancel()
                self._queued -= 1
                self._forget(waiter)
                self._changed()
            if isinstance(error, TimeoutError):
                self._shed("wait_timeout")
            raise

    def release(self, permit: AdmissionPermit | None = None) -> None:
        self._in_use -= 1
        if permit is not None:
            rtt = self._clock.monotonic() - permit.started
            self.limiter.record(rtt, permit.in_flight, permit.sample)
        # Hand freed slots (and any the limit just gained) to the oldest waiters,
        # so a newcomer cannot jump the queue.
        while self._waiters and self._in_use < self.limiter.limit:
            waiter = self._waiters.popleft()
            if waiter.done():
                continue
            waiter.set_result(None)
            self._in_use += 1
            self._queued -= 1
        self._changed()

    def _allowed_wait(self, reserve_seconds: float) -> float:
        allowed = math.inf if self.max_wait_seconds is None else self.max_wait_seconds
        deadline = current_deadline()
        if deadline is not None:
            allowed = min(allowed, deadline.remaining() - reserve_seconds)
        return allowed

    def _forget(self, waiter: asyncio.Future[None]) -> None:
        with suppress(ValueError):
            self._waiters.remove(waiter)

    def _changed(self) -> None:
        self.events.changed(self.name, self.limiter.limit, self._in_use, self._queued)

    def _shed(self, reason: str) -> NoReturn:
        notify_observer(self.observer.bulkhead_rejected, self.name)
        notify_observer(self.events.shed, self.name, reason)
        self._log_shed(reason)
        raise BulkheadFullError(self.name, self.retry_after, reason=reason)

    def _log_shed(self, reason: str) -> None:
        now = self._clock.monotonic()
        if now < self._log_after.get(reason, -math.inf):
            self._unlogged[reason] = self._unlogged.get(reason, 0) + 1
            return
        self._log_after[reason] = now + self.log_interval
        others = self._unlogged.pop(reason, 0)
        logger.warning(
            "admission %s: call shed (%s); %d in flight, limit %d, %d queued%s",
            self.name,
            reason,
            self._in_use,
            self.limiter.limit,
            self._queued,
            f"; {others} more shed for this reason since the last line" if others else "",
            extra={"upstream": self.name, "reason": reason},
        )
