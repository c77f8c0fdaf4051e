"""Where time comes from, injected wherever a decision depends on it.

Every timed decision in the service (breaker open times, retry budgets, the
Redis budget's retry interval, cache expiry) reads a `Clock`, so tests drive it
with `app.core.resilience.testing.FakeClock` and never sleep.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """`monotonic()` for durations, `time()` for wall time (Unix seconds)."""

    def monotonic(self) -> float: ...

    def time(self) -> float: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()


SYSTEM_CLOCK: Clock = SystemClock()
