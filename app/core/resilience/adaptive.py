"""How many calls an upstream may have in flight: a limit that follows the upstream.

A fixed concurrency cap is wrong twice: too low for a healthy upstream whose
answers take seconds (callers fall down the ladder while the upstream idles),
too high for one that is struggling (calls pile up on it). `GradientLimit`
measures instead, as TCP congestion control and Netflix's concurrency-limits
(`Gradient2Limit`) do:

- every call that got an answer is a sample of the round-trip time (RTT). A
  slow average (`long_rtt`, about `long_window` samples) is the upstream's
  baseline; a fast one (`short_rtt`) is its latency now;
- while the latency now stays within `tolerance` x the baseline, the limit
  grows by a headroom of sqrt(limit) per sample, smoothed: a limit in use grows
  about as fast as calls complete, so it follows a fast-scaling upstream within a
  few round trips (it does not grow while less than half of it is used);
- when the latency now exceeds that, the limit shrinks in proportion
  (`tolerance x long / short`, never below half per step, smoothed);
- a call that failed in a way that says "too much" (a timeout, a 429, a 5xx,
  a refused connection) shrinks the limit by `backoff_ratio` at once, at most
  once per round trip: a burst of failures from one overload is one signal,
  as one loss window is to TCP;
- the limit stays within `[min_limit, max_limit]`; `max_limit` is the hard
  ceiling that a runaway estimate can never pass (the SDK's connection pool is
  sized to it);
- our own event loop's lag (`lag`, `app.platform.loop_lag.LoopLag.seconds`)
  is part of every RTT: a CPU-bound worker reads a 5 ms reply 100 ms late. While
  the lag alone could explain a gradient (`LAG_TURNS` x lag above half the
  tolerance's margin over the baseline), a latency sample is no verdict on the
  upstream: the limit and the baseline hold, and only the latency now (the
  queue's wait estimate) follows. Overload errors still shrink the limit.

`FixedLimit` is the same interface with a constant (tests, and an operator who
sets the minimum and the ceiling equal). Time comes from an injected clock.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import Enum
from typing import Protocol

from app.platform.clock import SYSTEM_CLOCK, Clock

__all__ = ["LAG_TURNS", "ConcurrencyLimit", "FixedLimit", "GradientLimit", "Sample"]

#: Loop turns one upstream call waits through (a connection, the request sent, the
#: headers, the body): each adds the loop's lag to its RTT.
LAG_TURNS = 4


class Sample(Enum):
    """What one finished call says about the upstream's load."""

    OK = "ok"  # answered (or refused our request): its RTT is a latency sample
    DROPPED = "dropped"  # timed out, 429, 5xx, connection refused: overload
    IGNORED = "ignored"  # says nothing about the upstream (cut by our deadline, breaker)


class ConcurrencyLimit(Protocol):
    """The admission limit of one upstream, updated from each finished call."""

    @property
    def limit(self) -> int: ...

    @property
    def max_limit(self) -> int: ...

    @property
    def rtt(self) -> float | None:
        """The latency now (seconds), None before the first sample."""

    def record(self, rtt: float, in_flight: int, sample: Sample) -> None: ...


class FixedLimit:
    """A constant limit; records only the latency (for the queue's wait estimates)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self._limit = limit
        self._rtt: float | None = None

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def max_limit(self) -> int:
        return self._limit

    @property
    def rtt(self) -> float | None:
        return self._rtt

    def record(self, rtt: float, in_flight: int, sample: Sample) -> None:
        if sample is Sample.OK:
            self._rtt = rtt if self._rtt is None else 0.75 * self._rtt + 0.25 * rtt


class GradientLimit:
    """The limit of one upstream from its latency and overload errors (module doc)."""

    def __init__(
        self,
        *,
        initial: int,
        min_limit: int,
        max_limit: int,
        tolerance: float = 1.5,
        smoothing: float = 0.2,
        long_window: int = 600,
        backoff_ratio: float = 0.9,
        clock: Clock = SYSTEM_CLOCK,
        lag: Callable[[], float] | None = None,
    ) -> None:
        if not 1 <= min_limit <= max_limit:
            raise ValueError("need 1 <= min_limit <= max_limit")
        if tolerance < 1 or not 0 < smoothing <= 1 or not 0 < backoff_ratio < 1:
            raise ValueError("need tolerance >= 1, 0 < smoothing <= 1, 0 < backoff_ratio < 1")
        if long_window < 1:
            raise ValueError("long_window must be >= 1")
        self.min_limit = min_limit
        self._max_limit = max_limit
        self.tolerance = tolerance
        self.smoothing = smoothing
        self.backoff_ratio = backoff_ratio
        self._long_alpha = 2.0 / (long_window + 1)
        self._clock = clock
        self._lag = lag
        #: latency samples held as no verdict because the loop lagged (module doc)
        self.lagged_samples = 0
        self._estimate = float(min(max(initial, min_limit), max_limit))
        self._short_rtt: float | None = None
        self._long_rtt: float | None = None
        self._next_backoff_at = -math.inf

    @property
    def limit(self) -> int:
        return int(self._estimate)

    @property
    def max_limit(self) -> int:
        return self._max_limit

    @property
    def rtt(self) -> float | None:
        return self._short_rtt

    @property
    def baseline_rtt(self) -> float | None:
        return self._long_rtt

    def record(self, rtt: float, in_flight: int, sample: Sample) -> None:
        if sample is Sample.DROPPED:
            self._back_off()
        elif sample is Sample.OK:
            self._latency(max(rtt, 1e-6), in_flight)

    def _back_off(self) -> None:
        now = self._clock.monotonic()
        if now < self._next_backoff_at:
            return  # the same overload, already answered within this round trip
        self._estimate = max(float(self.min_limit), self._estimate * self.backoff_ratio)
        self._next_backoff_at = now + (self._short_rtt or 0.0)

    def _latency(self, rtt: float, in_flight: int) -> None:
        if self._short_rtt is None or self._long_rtt is None:
            self._short_rtt = self._long_rtt = rtt
        else:
            self._short_rtt = 0.75 * self._short_rtt + 0.25 * rtt
            if self._loop_explains(self._long_rtt):
                self.lagged_samples += 1
                return
            self._long_rtt += self._long_alpha * (rtt - self._long_rtt)
        short, long = self._short_rtt, self._long_rtt
        if long / short > 2:
            # Latency is back to normal after a long slow spell: let the baseline
            # follow faster than its slow average would.
            self._long_rtt = long = long * 0.9
        if in_flight < self._estimate / 2:
            return  # not using the limit: no evidence that more would be fine
        gradient = max(0.5, min(1.0, self.tolerance * long / short))
        target = self._estimate * gradient + math.sqrt(self._estimate)
        estimate = (1 - self.smoothing) * self._estimate + self.smoothing * target
        self._estimate = min(float(self._max_limit), max(float(self.min_limit), estimate))

    def _loop_explains(self, baseline: float) -> bool:
        """Whether our loop's lag alone could move the RTT past the tolerance."""
        if self._lag is None:
            return False
        return LAG_TURNS * self._lag() > (self.tolerance - 1) * baseline / 2
