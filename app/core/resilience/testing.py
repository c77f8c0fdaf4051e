"""Test doubles for time and waiting, so no test of a timed guard ever sleeps.

Every guard reads time from an injected `app.platform.clock.Clock` and waits with
an injected sleep; tests inject these instead. They live apart from the guards,
and the package does not re-export them, so production code cannot reach for a
clock that never moves by mistake: import them from this module, in tests only.
"""

from __future__ import annotations

import asyncio
from typing import Any

from app.core.resilience.retry import RetryPolicy

__all__ = ["FakeClock", "instant_retry_policy", "no_wait"]


class FakeClock:
    """A `Clock` that moves only when told to.

    `sleep` records the requested delay and advances the clock by it without
    waiting, so it can be injected wherever a `Sleep` is accepted.
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
        await asyncio.sleep(0)  # still a suspension point, as a real sleep would be


async def no_wait(seconds: float) -> None:
    """A `Sleep` that returns at once (still yielding to the event loop)."""
    await asyncio.sleep(0)


def instant_retry_policy(**overrides: Any) -> RetryPolicy:
    """A `RetryPolicy` whose sleeps return at once; other fields as given."""
    options: dict[str, Any] = {"sleep": no_wait, **overrides}
    return RetryPolicy(**options)
