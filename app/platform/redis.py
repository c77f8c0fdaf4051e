"""Redis within a time budget, and this process when Redis is not there.

Three parts of the service keep state in Redis so that every worker and replica
shares it: the circuit breakers, the rate-limit counters and the story cache.
Each must keep answering when Redis is slow or gone, and all three do it the one
way written here, `RedisBudget`:

- every Redis call runs under a hard budget (`REDIS_SOCKET_TIMEOUT_MS`, 50 ms by
  default); a call that errs or overruns is answered in-process instead;
- after such a failure the part is *degraded*: it stays in-process for
  `retry_seconds`, then exactly one call tries Redis again (the others stay
  in-process meanwhile), and the first answer from Redis ends the degradation;
- the process holds one `RedisGate`: the first part to see Redis fail closes it
  for a second, and the others go in-process at once instead of spending a
  budget each (a request pays one budget, not one per part). Going in-process
  behind a closed gate makes a part degraded too, but it is not a failure of
  its own: it neither closes the gate again nor delays its next try.

The budget measures Redis, not the event loop. A CPU-bound process runs its
callbacks late: a reply that arrived in a millisecond may sit unread while the
loop finishes other work, and a plain wall-clock timeout would then blame
Redis, close the gate and make breaker state per-process although Redis is
fine. So the budget's clock (`LoopFairDeadline`) gives back the time the loop
was stalled past the deadline: when the deadline's timer itself runs late, the
loop was busy, not Redis, and the deadline moves on by a short recheck, up to
the gate's `lag_allowance_seconds` in all. A deadline whose timer runs on time
ends the call as before. The client's own socket and pool timeouts are set
above budget + allowance (`open_redis(lag_allowance_seconds=...)`), so they
are only a backstop and never judge Redis by the loop's lag either.

For the same reason the budget does not count the wait for a connection. A
burst of requests on a busy worker queues for the pool's connections, or opens
new ones; measured at 200 callers, every budget this process overran was spent
there (in the pool's queue or in the TCP connect), none on a round trip. So
`open_redis`'s pool (`BudgetedConnectionPool`) tells the budget of the call
that waits: while it waits, only the allowance bounds it, and once it holds a
connection the round trip gets the whole budget. Such a wait is not trusted
blindly: when another call sees Redis fail (the gate closes), every call still
waiting for a connection is cut at once and answered in-process.

`open_redis` builds the client all of this needs: one that fails in milliseconds.
redis-py's defaults (5 s socket timeouts, retries with backoff) would turn a
silent Redis into many seconds per call, and no budget could help.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from app.platform.clock import SYSTEM_CLOCK, Clock
from app.platform.redis_deadline import BudgetedConnectionPool, LoopFairDeadline

__all__ = [
    "DEFAULT_LAG_ALLOWANCE_SECONDS",
    "BudgetListener",
    "BudgetedConnectionPool",
    "LoopFairDeadline",
    "RedisBudget",
    "RedisGate",
    "RedisGateClosedError",
    "describe_error",
    "open_redis",
]

T = TypeVar("T")

logger = logging.getLogger(__name__)

# How much event-loop lag past a deadline is not held against Redis (REDIS_LOOP_LAG_ALLOWANCE_MS).
DEFAULT_LAG_ALLOWANCE_SECONDS = 1.0


def open_redis(
    url: str,
    *,
    timeout_seconds: float,
    connect_timeout_seconds: float,
    max_connections: int,
    lag_allowance_seconds: float = 0.0,
) -> aioredis.Redis:
    """A client whose every wait is bounded by `timeout_seconds` (+ `lag_allowance_seconds`).

    One immediate retry on a *connection* error only: after a Redis restart the
    pooled sockets are dead, and the first use of each should reconnect rather
    than fail over; timeouts are never retried. A blocking pool: past
    `max_connections` a caller waits (within the same timeout) for a free
    connection instead of failing at once.

    For a client used through `RedisBudget`, pass the gate's lag allowance: the
    budget then judges Redis, and these wall-clock timeouts, which a stalled
    event loop would trip although Redis answered, are only a backstop above it.
    """
    backstop = timeout_seconds + lag_allowance_seconds
    connect_seconds = max(connect_timeout_seconds, timeout_seconds)
    pool = BudgetedConnectionPool.from_url(
        url,
        socket_timeout=backstop,
        socket_connect_timeout=connect_seconds + lag_allowance_seconds,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        max_connections=max_connections,
        # The wait for a free connection: the budget decides (see below), this is
        # the backstop for a call without one.
        timeout=backstop + timeout_seconds,
        health_check_interval=0,
    )
    pool.connect_seconds = connect_seconds
    return aioredis.Redis(connection_pool=pool)


class RedisGate:
    """This process's shared view of whether Redis answers (see the module's doc)."""

    def __init__(
        self,
        cool_down_seconds: float = 1.0,
        *,
        clock: Clock = SYSTEM_CLOCK,
        lag_allowance_seconds: float = DEFAULT_LAG_ALLOWANCE_SECONDS,
    ) -> None:
        if lag_allowance_seconds < 0:
            raise ValueError("lag_allowance_seconds must be >= 0")
        self.cool_down_seconds = cool_down_seconds
        # Event-loop lag past a budget's deadline that is not held against Redis.
        self.lag_allowance_seconds = lag_allowance_seconds
        self._clock = clock
        self._closed_until = 0.0
        # Calls waiting for a connection: cut when Redis is seen to fail.
        # (each removes itself when its call ends, so a plain set holds no garbage)
        self._local_waiters: set[LoopFairDeadline] = set()

    def is_open(self) -> bool:
        return self._clock.monotonic() >= self._closed_until

    def report_failure(self) -> None:
        self._closed_until = max(
            self._closed_until, self._clock.monotonic() + self.cool_down_seconds
        )
        for waiter in list(self._local_waiters):
            waiter.cut()

    def add_local_waiter(self, deadline: LoopFairDeadline) -> None:
        self._local_waiters.add(deadline)

    def remove_local_waiter(self, deadline: LoopFairDeadline) -> None:
        self._local_waiters.discard(deadline)


class RedisGateClosedError(Exception):
    """Why a part is in-process although its own last Redis call succeeded."""

    def __init__(self) -> None:
        super().__init__("Redis gate closed: another part of this process saw Redis fail")


def describe_error(error: BaseException) -> str:
    """`repr` of an error with a message, else its type's name (`TimeoutError`)."""
    return repr(error) if str(error) else type(error).__name__


class BudgetListener(Protocol):
    """What a part of the service does when its Redis access changes (log, count).

    Called synchronously; must be cheap and must not raise.
    """

    def redis_failed(self, error: BaseException, operation: str, *, first: bool) -> None:
        """A Redis call failed or overran the budget. `first`: the part was not
        degraded before (the start of an outage, as this part sees it)."""

    def gate_closed(self) -> None:
        """The part went in-process because the gate was closed (not its own failure)."""

    def recovered(self) -> None:
        """Redis answered again: state is shared again."""


class _Silent:
    def redis_failed(self, error: BaseException, operation: str, *, first: bool) -> None:
        pass

    def gate_closed(self) -> None:
        pass

    def recovered(self) -> None:
        pass


class RedisBudget:
    """One part's way to Redis: every call within the budget, in-process otherwise.

    `run(on_redis, on_local)` awaits `on_redis()` within `budget_seconds`, or
    `on_local()` when Redis may not be tried now or fails; it never raises a
    Redis error. Without a `gate`, the part gets one of its own.
    """

    def __init__(
        self,
        *,
        budget_seconds: float,
        retry_seconds: float = 1.0,
        gate: RedisGate | None = None,
        clock: Clock = SYSTEM_CLOCK,
        listener: BudgetListener | None = None,
    ) -> None:
        if budget_seconds <= 0 or retry_seconds < 0:
            raise ValueError("budget_seconds must be > 0 and retry_seconds >= 0")
        self.budget_seconds = budget_seconds
        self.retry_seconds = retry_seconds
        self.gate = gate if gate is not None else RedisGate(clock=clock)
        self.listener: BudgetListener = listener or _Silent()
        self._clock = clock
        self._degraded = False
        self._retry_at = 0.0
        self._probing = False
        self.last_error: BaseException | None = None
        #: calls answered in-process because no connection came free in time
        self.local_wait_timeouts = 0
        self._overload_logged_at = -math.inf

    @property
    def degraded(self) -> bool:
        """True while this part keeps its state in-process although Redis is configured."""
        return self._degraded

    @property
    def available(self) -> bool:
        """Whether a call now would try Redis (no side effects; see `run`)."""
        if not self.gate.is_open() or self._probing:
            return False
        return not self._degraded or self._clock.monotonic() >= self._retry_at

    async def run(
        self,
        on_redis: Callable[[], Awaitable[T]],
        on_local: Callable[[], Awaitable[T]],
        *,
        operation: str = "call",
    ) -> tuple[T, bool]:
        """The result, and True when Redis produced it (False: `on_local` did)."""
        if not self.gate.is_open():
            self._behind_closed_gate()
            return await on_local(), False
        if self._degraded and (self._probing or self._clock.monotonic() < self._retry_at):
            return await on_local(), False
        probe = self._probing = self._degraded
        try:
            deadline = LoopFairDeadline(
                self.budget_seconds,
                lag_allowance_seconds=self.gate.lag_allowance_seconds,
                gate=self.gate,
            )
            async with deadline:
                result = await on_redis()
        except Exception as error:  # any Redis error or the budget: never the caller's
            if deadline.cut_by_gate:  # another call saw Redis fail while this one queued
                self._behind_closed_gate()
            elif deadline.expired_waiting:  # no connection came free: our overload
                self._overloaded(operation)
            else:
                self._fail(error, operation)
            return await on_local(), False
        finally:
            if probe:
                self._probing = False
        if self._degraded:
            self._degraded = False
            self.last_error = None
            self.listener.recovered()
        return result, True

    def _behind_closed_gate(self) -> None:
        if self._degraded:
            return
        self._degraded = True
        self.last_error = RedisGateClosedError()
        self.listener.gate_closed()

    def _overloaded(self, operation: str) -> None:
        """This call waited for a connection as long as the allowance lets it: it is
        answered in-process, but Redis did not fail and nothing else changes."""
        self.local_wait_timeouts += 1
        now = self._clock.monotonic()
        if now >= self._overload_logged_at + 5.0:
            self._overload_logged_at = now
            logger.warning(
                "Redis budget: no connection came free in time; answered in this process",
                extra={
                    "operation": operation,
                    "calls": self.local_wait_timeouts,
                    "error": "this process is overloaded (its Redis pool is all in use), not Redis",
                },
            )

    def _fail(self, error: BaseException, operation: str) -> None:
        first = not self._degraded
        self.gate.report_failure()
        self._degraded = True
        self.last_error = error
        self._retry_at = self._clock.monotonic() + self.retry_seconds
        self.listener.redis_failed(error, operation, first=first)
