"""The adaptive concurrency limit: grows while the upstream keeps up, shrinks when it does not."""

from __future__ import annotations

import pytest

from app.core.resilience import FixedLimit, GradientLimit, Sample
from app.core.resilience.testing import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def limit(clock: FakeClock, **overrides: int | float) -> GradientLimit:
    options: dict[str, int | float] = {"initial": 20, "min_limit": 4, "max_limit": 200}
    options.update(overrides)
    return GradientLimit(clock=clock, **options)  # type: ignore[arg-type]


def feed(target: GradientLimit, rtt: float, samples: int, *, busy: bool = True) -> None:
    for _ in range(samples):
        in_flight = target.limit if busy else 0
        target.record(rtt, in_flight, Sample.OK)


def test_a_steady_upstream_in_full_use_raises_the_limit_to_the_ceiling(clock: FakeClock) -> None:
    target = limit(clock)
    seen = [target.limit]
    for _ in range(20):
        feed(target, 2.0, 10)
        seen.append(target.limit)

    assert seen == sorted(seen)  # never shrinks while latency holds
    assert seen[1] > seen[0]
    assert target.limit == 200  # the ceiling, and not one more


def test_the_limit_grows_about_as_fast_as_calls_complete(clock: FakeClock) -> None:
    # One round trip of completions at limit 20 (20 samples) gains a good part of it.
    target = limit(clock)
    feed(target, 2.0, 20)

    assert target.limit >= 30


def test_a_limit_not_in_use_does_not_grow(clock: FakeClock) -> None:
    target = limit(clock)
    feed(target, 2.0, 100, busy=False)

    assert target.limit == 20


def test_rising_latency_shrinks_the_limit_but_not_below_the_minimum(clock: FakeClock) -> None:
    target = limit(clock, initial=100)
    feed(target, 1.0, 5)
    grown = target.limit
    feed(target, 10.0, 10)  # the upstream is queueing: ten times slower
    shrunk = target.limit
    feed(target, 10.0, 500)

    assert shrunk < grown
    assert target.limit >= 4


def test_latency_within_the_tolerance_does_not_shrink_the_limit(clock: FakeClock) -> None:
    target = limit(clock, tolerance=1.5)
    feed(target, 2.0, 5)
    before = target.limit
    feed(target, 2.6, 5)  # 1.3x the baseline

    assert target.limit >= before


def test_overload_errors_shrink_the_limit_once_per_round_trip(clock: FakeClock) -> None:
    target = limit(clock, initial=100, backoff_ratio=0.9)
    feed(target, 2.0, 1, busy=False)  # a latency estimate: 2 s
    for _ in range(50):  # one burst of timeouts from one overload
        target.record(2.0, 100, Sample.DROPPED)
    after_burst = target.limit
    clock.advance(2.5)  # a round trip later, the overload goes on
    target.record(2.0, 100, Sample.DROPPED)

    assert after_burst == 90
    assert target.limit == 81


def test_overload_errors_never_take_the_limit_below_the_minimum(clock: FakeClock) -> None:
    target = limit(clock, initial=10, min_limit=4)
    for _ in range(100):
        target.record(1.0, 10, Sample.DROPPED)
        clock.advance(10.0)

    assert target.limit == 4


def test_ignored_samples_change_nothing(clock: FakeClock) -> None:
    target = limit(clock)
    for _ in range(100):
        target.record(30.0, 20, Sample.IGNORED)

    assert target.limit == 20
    assert target.rtt is None


def test_the_limit_recovers_when_the_upstream_does(clock: FakeClock) -> None:
    target = limit(clock, initial=100)
    feed(target, 1.0, 5)
    feed(target, 10.0, 40)
    low = target.limit
    feed(target, 1.0, 200)

    assert target.limit > low


def test_settings_out_of_bounds_are_refused(clock: FakeClock) -> None:
    with pytest.raises(ValueError, match="min_limit <= max_limit"):
        GradientLimit(initial=10, min_limit=20, max_limit=10)
    with pytest.raises(ValueError, match="tolerance >= 1"):
        GradientLimit(initial=10, min_limit=1, max_limit=10, tolerance=0.5)
    with pytest.raises(ValueError, match="limit must be >= 1"):
        FixedLimit(0)


def test_the_initial_limit_is_clamped_to_the_bounds(clock: FakeClock) -> None:
    assert limit(clock, initial=1000).limit == 200
    assert limit(clock, initial=1).limit == 4


def test_a_fixed_limit_stays_and_tracks_latency() -> None:
    fixed = FixedLimit(8)
    fixed.record(2.0, 8, Sample.OK)
    fixed.record(30.0, 8, Sample.DROPPED)

    assert fixed.limit == fixed.max_limit == 8
    assert fixed.rtt == 2.0


class Lag:
    """The loop's lag, as `app.platform.loop_lag.LoopLag.seconds` reports it."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self) -> float:
        return self.seconds


def test_latency_our_own_loop_explains_is_no_verdict_on_the_upstream(clock: FakeClock) -> None:
    # A 5 ms check read 100 ms late by a CPU-bound worker: the upstream is idle.
    lag = Lag()
    lagged = GradientLimit(initial=100, min_limit=4, max_limit=200, clock=clock, lag=lag)
    blind = limit(clock, initial=100)
    for target in (lagged, blind):
        feed(target, 0.005, 20)
    before = lagged.limit
    lag.seconds = 0.03
    for target in (lagged, blind):
        feed(target, 0.1, 50)

    assert blind.limit < before  # without the lag, the same samples shrink it
    assert lagged.limit == before
    assert lagged.lagged_samples == 50
    assert lagged.rtt is not None
    assert lagged.rtt > 0.05  # the queue's waits are estimated as they really are
    assert lagged.baseline_rtt == pytest.approx(0.005, rel=0.01)


def test_a_small_lag_against_a_slow_upstream_still_lets_latency_decide(clock: FakeClock) -> None:
    # 20 ms of lag cannot explain a story call going from 2 s to 10 s.
    lag = Lag()
    target = GradientLimit(initial=100, min_limit=4, max_limit=200, clock=clock, lag=lag)
    feed(target, 2.0, 5)
    grown = target.limit
    lag.seconds = 0.02
    feed(target, 10.0, 10)

    assert target.limit < grown
    assert target.lagged_samples == 0


def test_overload_errors_shrink_the_limit_whatever_the_lag(clock: FakeClock) -> None:
    lag = Lag()
    lag.seconds = 1.0
    target = GradientLimit(initial=100, min_limit=4, max_limit=200, clock=clock, lag=lag)
    feed(target, 0.005, 1, busy=False)
    target.record(0.005, 100, Sample.DROPPED)

    assert target.limit == 90
