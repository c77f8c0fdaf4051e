"""The bulkhead: a cap on concurrent calls to one upstream.

Without it, a slow upstream lets calls pile up until they hold every connection
and task the process has, and the whole service stalls for one dependency. A
`Bulkhead` admits `max_concurrent` calls, queues a few more briefly (never past
the request's deadline), and refuses the rest at once with `BulkheadFullError`,
which the caller can answer cheaply (a fallback, or 503 with `Retry-After`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import NoReturn

from app.core.resilience.deadline import current_deadline
from app.core.resilience.errors import BulkheadFullError
from app.core.resilience.observer import DEFAULT_OBSERVER, ResilienceObserver, notify_observer

__all__ = ["Bulkhead"]


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
