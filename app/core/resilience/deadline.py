"""The request's deadline: one point in time that every guard below it respects.

A `deadline_scope` puts a `Deadline` in a ContextVar, so it reaches every call
made for the request (tasks included) without being passed around: retries give
up rather than sleep past it, the bulkhead never queues past it, and `run_within`
cuts a call at it, even a call that loses the cancellation sent to it. Nested
scopes can only shorten it, so a helper cannot grant itself more time than the
request has.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeVar

from app.core.resilience.errors import DeadlineExceededError
from app.platform.clock import SYSTEM_CLOCK, Clock

__all__ = ["Deadline", "abandon", "current_deadline", "deadline_scope", "run_within"]

T = TypeVar("T")


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
    """Await `factory()` for at most the deadline's remaining time, whatever it awaits.

    `deadline=None` means `current_deadline()`; with no deadline at all the call is
    not bounded. Raises `DeadlineExceededError` (without calling `factory` when the
    deadline has already passed). Errors of the call itself propagate unchanged.

    The call runs in a task of its own, and the caller waits for that task with a
    timeout instead of cancelling itself: a cancellation can be lost inside the
    call (CPython 3.11's `asyncio.wait_for`, which redis-py uses to send every
    command, returns normally when the cancellation races with the command's
    completion), and `asyncio.timeout` fires only once. Here the caller gets its
    answer at the deadline regardless; the call is cancelled, and cancelled again
    until it ends, in the background. A caller cancelled meanwhile (the client hung
    up) cancels the call the same way.
    """
    deadline = deadline if deadline is not None else current_deadline()
    if deadline is None:
        return await factory()
    remaining = deadline.remaining()
    if remaining <= 0:
        raise DeadlineExceededError()
    task = asyncio.ensure_future(factory())
    try:
        done, _ = await asyncio.wait({task}, timeout=remaining)
    except BaseException:
        abandon(task)
        raise
    if not done:
        abandon(task)
        raise DeadlineExceededError()
    return task.result()


# Work given up on at a deadline: referenced here until it has really stopped.
_abandoned: set[asyncio.Future[Any]] = set()
# How often work that ignored its cancellation is cancelled again.
_RECANCEL_SECONDS = 0.05


def abandon(task: asyncio.Future[Any]) -> None:
    """Cancel `task` without waiting for it; cancel it again until it ends."""
    if task.done():
        _retrieve(task)
        return
    _abandoned.add(task)
    task.add_done_callback(_retrieve)
    _cancel_until_done(task)


def _cancel_until_done(task: asyncio.Future[Any]) -> None:
    if task.done():
        return
    task.cancel()
    asyncio.get_running_loop().call_later(_RECANCEL_SECONDS, _cancel_until_done, task)


def _retrieve(task: asyncio.Future[Any]) -> None:
    _abandoned.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: asyncio does not log it as never retrieved
