"""The request's deadline: one point in time that every guard below it respects.

A `deadline_scope` puts a `Deadline` in a ContextVar, so it reaches every call
made for the request (tasks included) without being passed around: retries give
up rather than sleep past it, the bulkhead never queues past it, and `run_within`
cuts an upstream call at it. Nested scopes can only shorten it, so a helper
cannot grant itself more time than the request has.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TypeVar

from app.core.resilience.errors import DeadlineExceededError
from app.platform.clock import SYSTEM_CLOCK, Clock

__all__ = ["Deadline", "current_deadline", "deadline_scope", "run_within"]

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
