"""The clock of a Redis budget: a deadline that judges Redis, not this process.

`app.platform.redis.RedisBudget` runs every Redis call under a `LoopFairDeadline`.
Two kinds of waiting inside a call are this process's own and are not held
against Redis (the module doc of `app.platform.redis` says why):

- the event loop's lag: a reply that arrived in time but was read late because
  the loop was busy with other callbacks;
- the wait for a connection: queued behind the pool's limit
  (`BudgetedConnectionPool` tells the deadline while it waits).

Both are bounded by the gate's lag allowance; a wait for a connection is also
cut at once when the gate sees Redis fail (`WaitGate`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from types import TracebackType
from typing import Any, Protocol

import redis.asyncio as aioredis

__all__ = ["BudgetedConnectionPool", "LoopFairDeadline", "WaitGate"]


class WaitGate(Protocol):
    """What a deadline needs of `app.platform.redis.RedisGate`."""

    def is_open(self) -> bool: ...

    def add_local_waiter(self, deadline: LoopFairDeadline) -> None: ...

    def remove_local_waiter(self, deadline: LoopFairDeadline) -> None: ...


#: The budget of the Redis call running in this task, for the pool to tell about its waits.
_CURRENT_DEADLINE: ContextVar[LoopFairDeadline | None] = ContextVar(
    "redis_budget_deadline", default=None
)


def _deadline_of_this_task() -> LoopFairDeadline | None:
    """The budget of the Redis call this task runs (a task started inside one
    inherits the ContextVar, but not the budget)."""
    deadline = _CURRENT_DEADLINE.get()
    if deadline is None or deadline.task is not asyncio.current_task():
        return None
    return deadline


class BudgetedConnectionPool(aioredis.BlockingConnectionPool):
    """redis-py's blocking pool, telling the running budget while a call queues for a
    connection behind the pool's limit: that wait is this process's, not Redis's
    (see the module's doc). Opening a connection is talking to Redis: it gets a
    lag-fair budget of its own, `connect_seconds`."""

    connect_seconds = 0.1

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        deadline = _deadline_of_this_task()
        if deadline is None:
            return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        with deadline.waiting_locally():
            return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]

    async def ensure_connection(self, connection: Any) -> None:
        deadline = _deadline_of_this_task()
        if deadline is None:
            await super().ensure_connection(connection)
            return
        with deadline.talking_to_redis(self.connect_seconds):
            await super().ensure_connection(connection)


class LoopFairDeadline:
    """`asyncio.timeout(seconds)` that does not count the event loop's lag against the body.

    The deadline's timer is the probe: if it runs more than `tolerance` after it
    was due, the loop was stalled around the deadline (by other callbacks, not by
    what the body awaits), and a reply may be waiting unread; the deadline then
    moves to a short recheck instead of cancelling. Once the timer runs on time
    while the body still waits, or `seconds + lag_allowance_seconds` have passed
    in all, the body is cancelled (one loop turn later, so a reply read in that
    same turn still wins) and `TimeoutError` raised, as `asyncio.timeout` does.
    With `lag_allowance_seconds=0` it is exactly `asyncio.timeout(seconds)`.

    While the body waits for a connection (`waiting_locally`, told by
    `BudgetedConnectionPool`), only `seconds + lag_allowance_seconds` bounds it
    (`expired_waiting` when that ends it), and the round trip that follows gets
    `seconds` afresh. With a `gate`, such a wait is cut at once (`cut`,
    `cut_by_gate`) when the gate sees Redis fail.
    """

    def __init__(
        self,
        seconds: float,
        *,
        lag_allowance_seconds: float,
        tolerance: float | None = None,
        gate: WaitGate | None = None,
    ) -> None:
        self.seconds = seconds
        self.lag_allowance_seconds = lag_allowance_seconds
        # Timers run a little late on any loop; a fifth of the budget is lag, not noise.
        self.tolerance = tolerance if tolerance is not None else max(0.002, seconds / 5)
        #: times the deadline moved on because the loop, not the body, was late
        self.extensions = 0
        self.expired = False
        #: cut while waiting for a connection, because the gate saw Redis fail
        self.cut_by_gate = False
        #: ended, by the allowance, while still waiting for a connection
        self.expired_waiting = False
        self._gate = gate
        self._local_waits = 0
        self._token: Any = None
        self._task: asyncio.Task[object] | None = None
        self._handle: asyncio.Handle | None = None
        self._cancelling = 0
        self._due = 0.0
        self._last_call = 0.0

    async def __aenter__(self) -> LoopFairDeadline:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("LoopFairDeadline must be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        now = loop.time()
        self._due = now + self.seconds
        self._last_call = self._due + self.lag_allowance_seconds
        self._handle = loop.call_at(self._due, self._on_due)
        self._token = _CURRENT_DEADLINE.set(self)
        return self

    @contextlib.contextmanager
    def waiting_locally(self) -> Iterator[None]:
        """Marks a wait for a connection: not held against Redis (class doc)."""
        if self.lag_allowance_seconds <= 0 or self.expired:
            yield
            return
        if self._local_waits == 0 and self._gate is not None:
            if not self._gate.is_open():
                self.cut()
            self._gate.add_local_waiter(self)
        self._local_waits += 1
        try:
            yield
        finally:
            self._local_waits -= 1
            if self._local_waits == 0:
                if self._gate is not None:
                    self._gate.remove_local_waiter(self)
                if not self.expired and self._handle is not None:
                    # The round trip itself gets the whole budget.
                    loop = asyncio.get_running_loop()
                    self._schedule(min(loop.time() + self.seconds, self._last_call))

    @contextlib.contextmanager
    def talking_to_redis(self, seconds: float) -> Iterator[None]:
        """Within a wait for a connection, the part that talks to Redis (opening the
        connection): judged like a round trip, by `seconds`, net of the loop's lag."""
        if not self._local_waits or self.expired:
            yield
            return
        waits, self._local_waits = self._local_waits, 0
        loop = asyncio.get_running_loop()
        self._schedule(min(loop.time() + seconds, self._last_call))
        try:
            yield
        finally:
            self._local_waits = waits
            if not self.expired:
                self._schedule(self._last_call)

    @property
    def task(self) -> asyncio.Task[object] | None:
        """The task whose body this deadline bounds."""
        return self._task

    def cut(self) -> None:
        """Ends a wait for a connection now: Redis was seen to fail meanwhile."""
        if self.expired or self._task is None or self._task.done():
            return
        if self._handle is not None:
            self._handle.cancel()
        self.cut_by_gate = True
        self._expire()

    def _schedule(self, due: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._due = due
        self._handle = asyncio.get_running_loop().call_at(due, self._on_due)

    def _on_due(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._local_waits and now < self._last_call:
            # Waiting for a connection, not for Redis: the allowance bounds it.
            self._schedule(self._last_call)
            return
        late = now - self._due
        if late > self.tolerance and now < self._last_call:
            # The loop was away: let it poll I/O once more before judging the body.
            self.extensions += 1
            self._due = min(now + self.tolerance, self._last_call)
            self._handle = loop.call_at(self._due, self._on_due)
            return
        if self.lag_allowance_seconds > 0:
            # One more turn first: a reply read in this very iteration wakes the
            # body before the cancellation would (on loops that poll I/O first).
            self._handle = loop.call_soon(self._expire)
        else:  # no allowance: exactly asyncio.timeout
            self._expire()

    def _expire(self) -> None:
        self._handle = None
        self.expired = True
        self.expired_waiting = self._local_waits > 0 and not self.cut_by_gate
        assert self._task is not None
        self._task.cancel()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._token is not None:
            _CURRENT_DEADLINE.reset(self._token)
            self._token = None
        if self._gate is not None:
            self._gate.remove_local_waiter(self)
        if not self.expired:
            return
        assert self._task is not None
        # Our cancellation, if it was delivered (some awaits swallow one that races
        # with their own completion), becomes a TimeoutError as in asyncio.timeout.
        if self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
            raise TimeoutError from exc
